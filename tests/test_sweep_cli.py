"""The study command line: bad input refused before any trial, with one line naming the fix."""
import time

import pytest

from studies import agc_lambda, batch_scaling
from studies.sweep import design
from studies.sweep.run import run_study
from studies.training.config import TrainConfig
from tests.helpers import common_flags


@pytest.mark.parametrize("flags, msg", [
    (["--batch-sizes", "100000"], "larger than the training split"),
    (["--lambdas", "-0.1"], "λ must be > 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 1"),
    (["--max-failures", "-1"], "--max-failures must be >= 0"),
    (["--gns-every-steps", "-1"], "--gns-every-steps must be >= 0"),
    (["--image-size", "-5"], "--image-size must be > 0, got -5"),
    (["--base-lr", "0.3"], "--base-lr does nothing in this study"),
    (["--clipping", "none"], "--clipping does nothing"),
    (["--name", "lr's test"], "--name"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--dataset", "cifar10", "--dataset-params", '{"path": "/no/such/dir"}'], "/no/such/dir"),
    (["--use-gpu", "true"], "GPU"),
    (["--batch-sizes", "100", "--num-workers", "8"], "not divisible by num_workers 8"),
    (["--dataset-params", '{"num_train": 5000}'], "did you mean n_train"),
    (["--model-overrides", '{"widht": 16}'], "widht"),
    (["--data-root", "data"], "relative path"),
    (["--output", "s3:/bucket"], "s3:/bucket"),
    (["--output", "/proc/no-such-dir"], "cannot write"),
    (["--tracking-uri", "sqlite://mlflow.db"], "three slashes"),
    (["--tracking-uri", "mlflow.db"], "looks like a SQLite file"),
])
def test_bad_study_input_fails_before_any_trial(tmp_path, flags, msg, ray_cluster, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bad path taken for a relative one would land here
    base = ["--smoke-test", *common_flags(tmp_path)]
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(base + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 30 and time.time() - t0 < 30  # one clear line, at once
    assert not (tmp_path / "out" / "s" / "results").exists()
    assert not (tmp_path / "out" / "s" / "study.json").exists()  # the fixed command is not told to --resume
    assert not (tmp_path / "s3:").exists()  # 's3:/bucket' was not taken for a relative folder


def test_a_cell_whose_model_cannot_be_built_is_refused_before_any_trial(tmp_path):
    study = design.Study(
        name="fails", preset=design.Preset(grid={"model_overrides": [{"width": 8, "depth": 1},
                                                                     {"width": -4, "depth": 1}]}, fixed={}),
        fixed=TrainConfig(max_steps=4, batch_size=32, dataset_params={"n_train": 256, "n_val": 64},
                          data_root=str(tmp_path / "data")),
        output=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", max_concurrent=2)
    with pytest.raises(ValueError, match="width must be >= 1, got -4"):
        run_study(study)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_second_study_on_the_same_output_is_refused(tmp_path, ray_cluster, capsys):
    import storage

    held = storage.acquire_lock(str(tmp_path / "out" / "s"), owner="study s", heartbeat=False)  # the first study
    try:
        with pytest.raises(SystemExit) as e:
            agc_lambda.main(["--smoke-test", *common_flags(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is in use by study s" in err and "another --output" in err
        assert not (tmp_path / "out" / "s" / "results").exists()
    finally:
        held.release()


@pytest.mark.parametrize("module, flags, line", [
    (agc_lambda, ["--lambdas", "0.02", "0.02"], "--lambdas lists a value twice ([0.02, 0.02]); list each once"),
    (agc_lambda, ["--batch-sizes", "64", "64"], "--batch-sizes lists a value twice ([64, 64]); list each once"),
    (batch_scaling, ["--variants", "nf_resnet", "nf_resnet"],
     "--variants lists a value twice (['nf_resnet', 'nf_resnet']); list each once"),
    (agc_lambda, ["--lambda", "0.1"], "--lambda does nothing in this study: clip_threshold is a grid axis (use "
                                     "--lambdas); remove it"),
])
def test_a_refused_flag_is_named_as_the_user_typed_it(tmp_path, capsys, module, flags, line):
    with pytest.raises(SystemExit) as e:
        module.main(["--smoke-test", *common_flags(tmp_path), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(" error: ", 1)[1] == line


CREDENTIALS = "credentials in a URI end up in logs, the process list and Ray job entrypoints; remove them and use " \
    "the environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"
NAME_RULE = "use letters, digits, '_', '-' and '.' only (it names an MLflow experiment, a folder and a filter)"


@pytest.mark.parametrize("flags, line", [
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1), got -0.5"),
    (["--nesterov", "true", "--momentum", "0"],
     "--nesterov needs a momentum > 0, got momentum 0.0; turn nesterov off or use a momentum in (0, 1)"),
    (["--weight-decay", "-0.0001"], "--weight-decay must be >= 0, got -0.0001"),
    (["--epochs", "0"], "--epochs must be > 0, got 0.0"),  # the smoke preset sets max_steps: epochs was ignored
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, got nan"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--checkpoint-every-minutes", "inf"], "--checkpoint-every-minutes must be a finite number, got inf"),
    (["--lr-range", "0.8", "0.05"], "--lr-range 0.8 0.05: LOW is above HIGH; use --lr-range 0.05 0.8"),
    (["--lr-range", "0", "1"],
     "--lr-range 0 1: a log grid cannot start at 0; LOW must be > 0, e.g. --lr-range 0.05 0.8"),
    (["--lr-range", "0.05", "inf"],
     "--lr-range 0.05 inf: LOW and HIGH must be finite numbers, e.g. --lr-range 0.05 0.8"),
    (["--lrs", "0.1", "0.1"], "--lrs lists a value twice ([0.1, 0.1]); list each once"),
    (["--lrs", "0.1", "inf"], "--lrs must be finite numbers > 0, got [0.1, inf]"),
    (["--tracking-uri", "mlflow.internal:5000"], "--tracking-uri 'mlflow.internal:5000' is a server without its "
     "scheme (MLflow would make a local folder of it); use http://mlflow.internal:5000"),
    (["--tracking-uri", "http://alice:s3cret@mlflow.internal:5000/"],
     f"--tracking-uri http://***@mlflow.internal:5000/: {CREDENTIALS}"),
    (["--tracking-uri", "htps://alice:s3cret@host"], f"--tracking-uri htps://***@host: {CREDENTIALS}"),
    (["--name", "s\n"], f"--name 's\\n': {NAME_RULE}"),
    (["--name", "s\x1b[2J"], f"--name 's\\x1b[2J': {NAME_RULE}"),
    (["--name", "../s"], f"--name '../s': {NAME_RULE}"),
    (["--grid", "augment_strength"],
     "--grid augment_strength: write FIELD=V1,V2,… e.g. --grid augment_strength=0,0.5,1"),
    (["--grid", "augmnt_strength=0,1"], "--grid augmnt_strength=0,1: 'augmnt_strength' is not a training setting; use "
     "a TrainConfig field, e.g. augment_strength, weight_decay, model (the training flags in --help, without '--')"),
    (["--grid", "augment_strength=0,2"], "--grid augment_strength: augment_strength must be in [0, 1], got 2.0"),
    (["--grid", "augment_strength=0,x"], "--grid augment_strength=0,x: not values of augment_strength (could not "
     "convert string to float: 'x'); e.g. --grid augment_strength=0,0.5,1"),
    (["--grid", "augment-strength=0,0"], "--grid augment-strength=0,0: lists a value twice; list each once"),
    (["--grid", "weight_decay=nan"], "--grid weight_decay: weight_decay must be a finite number, got nan"),
    (["--grid", "cpus_per_worker=1,2"], "--grid cpus_per_worker=1,2: cpus_per_worker says where a run goes, not "
     "what it computes, so its cells would be the same runs; set it once with --cpus-per-worker"),
    (["--grid", "base_lr=0.1,0.2"], "--grid base_lr=0.1,0.2: base_lr cannot be a grid axis here (the lr design sets "
     "it per trial (use --lrs or --lr-range)); remove it"),
    (["--grid", "batch_size=32,64", "--batch-sizes", "16"], "--grid batch_size=32,64: batch_size is given twice; "
     "give its values once"),
    (["--augment-strength", "0.5", "--grid", "augment_strength=0,1"], "--augment-strength does nothing in this "
     "study: augment_strength is a grid axis (use --grid augment_strength=…); remove it"),
])
def test_bad_input_is_refused_in_one_line_naming_the_flag_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                       flags, line):
    monkeypatch.chdir(tmp_path)  # 'mlflow.internal:5000' taken for a folder would land here
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(["--smoke-test", *common_flags(tmp_path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "s3cret" not in err
    assert err.endswith("\n") and err.strip().splitlines()[-1].split(" error: ", 1)[1] == line
    assert line.startswith(flags[0]) and "\n" not in line  # one line, naming the flag as typed
    assert list(tmp_path.iterdir()) == []  # no output folder, no study.json, no MLflow store, no stray folder


def test_any_training_setting_is_a_grid_axis_and_a_cell_is_one_combination(tmp_path):
    import argparse

    from studies.sweep.cli import add_study_args, build_study
    from studies.training.flags import add_train_args

    p = argparse.ArgumentParser()
    add_study_args(p, list(agc_lambda.PRESETS), agc_lambda.GRID_FLAGS)
    add_train_args(p, skip=("seed",))
    args = p.parse_args(["--smoke-test", *common_flags(tmp_path), "--batch-sizes", "32", "64",
                         "--grid", "augment_strength=0,0.5", "--grid", "model_overrides={\"width\": 8},{\"width\": 4}"])
    study = build_study("agc_lambda", agc_lambda.PRESETS, args, agc_lambda.GRID_FLAGS)
    assert list(study.preset.grid) == ["batch_size", "clip_threshold", "augment_strength", "model_overrides"]
    cells = study.cells()
    assert len(cells) == 2 * 1 * 2 * 2
    cfgs = {(c.batch_size, c.augment_strength, c.model_overrides["width"]) for c in map(study.config, cells)}
    assert cfgs == {(b, a, w) for b in (32, 64) for a in (0.0, 0.5) for w in (8, 4)}
    assert cells[1].label == 'batch_size=32 lambda=0.04 augment_strength=0.0 model_overrides={"width": 4}'
    assert cells[2].short == 'b32 λ0.04 aug0.5 model_overrides={"width":8}'
    assert design.design_params(study, 1)["grid.augment_strength"] == "0.0, 0.5"


def test_a_tpe_search_refuses_a_grid_of_several_cells(tmp_path, capsys):
    from studies import hpo

    with pytest.raises(SystemExit) as e:  # it searched one cell and failed unpacking two, mid-study
        hpo.main(["--smoke-test", *common_flags(tmp_path), "--batch-sizes", "64", "128"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith("a TPE search runs in one cell; give each grid axis one value (or use "
                                              "a grid study)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, line", [
    (["--resume"], "--resume: there is no study to resume at {out}/s ({out} does not exist); check --output and "
                   "--name, or leave out --resume to start a new study"),
    (["--dataset", "cifar10", "--dataset-params", '{"path": "/nonexistent/cifar"}'],
     "/nonexistent/cifar/cifar-10-batches-py: not found; pass the directory holding cifar-10-batches-py/ as path=, "
     "or download=True to fetch it"),
])
def test_a_refused_study_leaves_nothing_behind(tmp_path, capsys, flags, line):
    # --resume with nothing to resume is refused before anything is written; a refused dataset preparation takes
    # back its shards-*/ dir, its .lock and the folders it made, and the study its own .lock and folders (issue 31,
    # item 4).
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(["--smoke-test", *common_flags(tmp_path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].split(" error: ", 1)[1] == line.format(out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the data root nor the output


def test_a_study_refused_after_its_data_is_prepared_leaves_only_the_data(tmp_path, capsys):
    # The prepared set is kept (reused by the next study); the output gets nothing, not even its folder or .lock.
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(["--smoke-test", *common_flags(tmp_path), "--batch-sizes", "100000"])
    assert e.value.code == 2 and "larger than the training split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (ds,) = (tmp_path / "data").iterdir()
    assert (ds / "manifest.json").exists()


# One value and one bad value per design knob, and the MLflow param text the value gives (issue 34, item 5).
KNOB_CASES = {
    "seed": (["7"], None, "7"),
    "max_concurrent": (["3"], (["0"], "--max-concurrent must be >= 1, got 0"), "3"),
    "seeds": (["2"], (["0"], "--seeds must be >= 1, got 0"), "2"),
    "replicates": (["3"], (["0"], "--replicates must be >= 1 (1 = no replication), got 0"), "3"),
    "best_k": (["1"], (["2"], "--best-k must be in [1, seeds=1], got 2"), "1"),
    "lrs": (["0.2", "0.4"], (["0.2", "0.2"], "--lrs lists a value twice ([0.2, 0.2]); list each once"), "0.2, 0.4"),
    "scan_steps": (["5"], (["0"], "--scan-steps must be >= 1, got 0"), "5"),
    "scan_examples": (["640"], (["-1"], "--scan-examples must be >= 0, got -1"), "640"),
    "full_top": (["3"], (["0"], "--full-top must be >= 1, got 0"), "3"),
    "trials": (["4"], (["0"], "--trials must be >= 1, got 0"), "4"),
}


def _knob_parser(name):
    """The study that has the knob (TPE trials: hpo; every other: agc_lambda) and its full command line."""
    import argparse

    from studies import hpo
    from studies.sweep.cli import add_study_args
    from studies.training.flags import add_train_args

    module, grid_flags = (hpo, {"batch_size": (int, "")}) if name == "trials" else (agc_lambda, agc_lambda.GRID_FLAGS)
    p = argparse.ArgumentParser()
    add_study_args(p, list(module.PRESETS), grid_flags)
    add_train_args(p, skip=("seed",))
    return module, grid_flags, p


def test_a_design_knob_declared_once_gives_its_flag_its_check_its_override_and_its_param(tmp_path):
    # A knob is one field declaration (knobs.knob on Preset or Study): its flag, the value the flag puts in the
    # study, the one line refusing a bad value, and the study run's MLflow param all come from it.
    from studies.sweep import knobs
    from studies.sweep.cli import build_study

    declared = [*knobs.declared(design.Preset), *knobs.declared(design.Study)]
    assert sorted(name for name, _ in declared) == sorted(KNOB_CASES)
    for name, k in declared:
        module, grid_flags, p = _knob_parser(name)
        option = "--" + name.replace("_", "-")
        assert p._option_string_actions[option].help == k.help, name
        good, bad, shown = KNOB_CASES[name]
        args = p.parse_args(["--smoke-test", *common_flags(tmp_path), option, *good])
        st = build_study(module.__name__.split(".")[-1], module.PRESETS, args, grid_flags)
        value = getattr(st.preset if hasattr(st.preset, name) else st, name)
        assert value == (tuple(map(float, good)) if name == "lrs" else int(good[0])), name
        assert design.design_params(st, st.max_concurrent or 1)[k.param] == shown, name
        if bad:
            args = p.parse_args(["--smoke-test", *common_flags(tmp_path), option, *bad[0]])
            with pytest.raises(ValueError) as e:
                build_study(module.__name__.split(".")[-1], module.PRESETS, args, grid_flags)
            assert str(e.value) == bad[1]
    assert list(tmp_path.iterdir()) == []  # build_study writes nothing
