"""study.json: only a missing record means a new study; --resume is refused under another MLflow store, other
code or other settings, with one line naming the fix (issue 21, items 5 and 6)."""
import json

import pytest

import storage
from studies.sweep import design, record
from studies.training import tracking
from studies.training.config import TrainConfig


def _study(tmp_path, resume=False, **kw):
    kw.setdefault("tracking_uri", f"sqlite:///{tmp_path}/mlflow.db")
    return design.Study("s", design.Preset(grid={"batch_size": [32]}, fixed={}), TrainConfig(max_steps=4),
                        output=str(tmp_path / "out"), resume=resume, **kw)


def _written(tmp_path):
    st = _study(tmp_path)
    assert record.check_record(st) is None  # nothing there: a new study
    record.write_record(st, "abc123")
    return tmp_path / "out" / "s" / "study.json"


def test_a_recorded_study_resumes_with_its_id(tmp_path):
    path = _written(tmp_path)
    assert json.loads(path.read_text())["study_id"] == "abc123"
    assert record.check_record(_study(tmp_path, resume=True)) == "abc123"
    with pytest.raises(ValueError, match="already holds study 's'; continue it with --resume"):
        record.check_record(_study(tmp_path))


@pytest.mark.parametrize("fault", [storage.StorageUnavailable, storage.StorageError])
def test_an_unreadable_record_is_not_a_new_study(tmp_path, monkeypatch, fault):
    path = _written(tmp_path)
    before = path.read_bytes()

    def throttled(fs, p):
        raise fault(f"{p}: cannot read (AWS Error SLOW_DOWN / ACCESS_DENIED)") from OSError("503 Slow Down")
    monkeypatch.setattr(storage.uri, "read_bytes", throttled)
    with pytest.raises(fault) as e:  # today: "new study", and the record is overwritten once trials start
        record.check_record(_study(tmp_path))
    assert "whether a study is there is unknown" in str(e.value) and "nothing was written" in str(e.value)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before


def test_a_corrupt_record_is_refused(tmp_path):
    path = _written(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="study.json is not a study record .*move it aside"):
        record.check_record(_study(tmp_path, resume=True))


def test_resume_against_another_mlflow_store_is_refused(tmp_path):
    _written(tmp_path)
    other = _study(tmp_path, resume=True, tracking_uri=f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(ValueError, match=r"--resume with another MLflow store \(sqlite:///.*mlflow.db → "
                                         r"sqlite:///.*other.db\): .*pass --tracking-uri sqlite:///"):
        record.check_record(other)


def test_resume_under_other_code_is_refused_unless_allowed(tmp_path, monkeypatch):
    _written(tmp_path)
    monkeypatch.setattr(design, "code_version", lambda: "0ther0c0de000")
    with pytest.raises(ValueError, match=r"--resume under other code .*→ 0ther0c0de000.*--allow-code-change"):
        record.check_record(_study(tmp_path, resume=True))
    assert record.check_record(_study(tmp_path, resume=True, allow_code_change=True)) == "abc123"


def test_a_record_without_a_study_id_is_refused(tmp_path):
    path = _written(tmp_path)
    old = json.loads(path.read_text())
    del old["study_id"]
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="written by an older nfnet-lab .*another --output or --name"):
        record.check_record(_study(tmp_path, resume=True))


def test_code_version_follows_the_numeric_source(tmp_path, monkeypatch):
    for d in tracking._NUMERIC_CODE:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(tracking, "PROJECT_DIR", tmp_path)
    tracking.code_version.cache_clear()
    try:
        v1 = tracking.code_version()
        (tmp_path / "nfnet" / "a.py").write_text("x = 2\n")
        tracking.code_version.cache_clear()
        assert tracking.code_version() != v1
    finally:
        tracking.code_version.cache_clear()


def test_resume_may_change_placement_but_not_what_decides_the_numbers(tmp_path):
    _written(tmp_path)

    def resumed(**fixed):
        st = _study(tmp_path, resume=True)
        st.fixed = st.fixed.replace(**fixed)
        return st
    assert record.check_record(resumed(cpus_per_worker=4.0, max_failures=2)) == "abc123"  # another cluster
    assert record.check_record(resumed(max_steps=4.0)) == "abc123"  # 4 and 4.0 alike
    with pytest.raises(ValueError, match=r"--resume with other settings .*fixed.base_lr: 0.1 → 0.2"):
        record.check_record(resumed(base_lr=0.2))


def test_resume_with_no_study_there_is_refused_naming_the_output_and_what_is_there(tmp_path):
    # A mistyped --output or --name used to start a whole new study, and call it a resume (issue 31, item 4).
    out = tmp_path / "out"
    fix = "check --output and --name, or leave out --resume to start a new study"

    def refusal():
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(ValueError) as e:
            record.check_record(_study(tmp_path, resume=True))
        assert sorted(tmp_path.rglob("*")) == before  # nothing written
        assert "\n" not in str(e.value) and str(e.value).endswith(fix)
        return str(e.value).removesuffix(fix)

    assert refusal() == f"--resume: there is no study to resume at {out}/s ({out} does not exist); "
    out.mkdir()
    assert refusal() == f"--resume: there is no study to resume at {out}/s ({out} is empty); "
    for name in ("s_v2", "agc_lambda"):  # other studies in the output: the name was mistyped
        record.write_record(design.Study(name, design.Preset(grid={"batch_size": [32]}, fixed={}), TrainConfig(),
                                         output=str(out)), "id")
    (out / "notes.txt").write_text("x")
    assert refusal() == f"--resume: there is no study to resume at {out}/s ({out} holds the studies agc_lambda, " \
        "s_v2); "
    (out / "s" / "results").mkdir(parents=True)  # a folder of that name, without its record
    assert refusal() == f"--resume: there is no study to resume at {out}/s (that folder has no study.json; it " \
        "holds results/); "
