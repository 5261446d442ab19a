"""The Tune side of a study, without a cluster: the searcher hands out one phase after another, a trial runs the
TrainConfig its Spec carries (built once, on the driver), and a retried trial skips the runs that have a row."""
from ray.tune.search import Searcher

from studies.sweep import design, phases, tables, tune
from studies.sweep.cells import Cell
from studies.training import runner
from studies.training.config import TrainConfig
from studies.training.summary import RunSummary

B256, A, B = Cell((("batch_size", 256),)), Cell((("batch_size", 64),)), Cell((("batch_size", 1024),))


class ScriptedPlan:
    """A plan that answers from a script, counting the boundaries at which it was asked."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), 0

    def next(self, rows):
        self.asked += 1
        return self.answers.pop(0)


def spec(name):
    return design.Spec(name, B256, TrainConfig(max_steps=4, seed=len(name)))


def test_a_phase_is_handed_out_only_once_the_one_before_has_ended_from_one_read():
    scan, full = phases.Phase("scan", None, runs_per_trial=1), phases.Phase("full", None)
    plan = ScriptedPlan([phases.Step(scan, [spec("a"), spec("bb")]), phases.Step(full, [spec("ccc")]),
                         phases.FINISHED])
    reads, announced = [], []
    s = tune.PhaseSearcher(plan, lambda: reads.append(1) or [], announced.append)
    assert s.suggest("a") == {"specs": [spec("a")]} and s.suggest("b") == {"specs": [spec("bb")]}
    assert s.suggest("c") is None and plan.asked == 1  # the scan still runs: the full phase is not computed
    s.on_trial_complete("a")
    assert s.suggest("c") is None
    s.on_trial_complete("b")
    assert s.suggest("c") == {"specs": [spec("ccc")]} and plan.asked == 2 and len(reads) == 2  # a read a boundary
    assert [a.phase.name for a in announced] == ["scan", "full"]
    s.on_trial_complete("c")
    assert s.suggest("d") == Searcher.FINISHED and s.suggest("e") == Searcher.FINISHED and plan.asked == 3


def test_runs_lost_before_a_boundary_end_the_search_and_say_so():
    scan = phases.Phase("scan", None)
    blocked = phases.Blocked("scan", [spec("a")])
    said = []
    s = tune.PhaseSearcher(ScriptedPlan([phases.Step(scan, [spec("a")]), blocked]), list, print, said.append)
    assert s.suggest("a") == {"specs": [spec("a")]}
    s.on_trial_complete("a", error=True)
    assert s.suggest("b") == Searcher.FINISHED and said == [blocked]


def test_a_trial_runs_the_config_its_spec_carries_and_skips_runs_with_a_row(tmp_path, monkeypatch):
    cfgs = [TrainConfig(base_lr=lr, max_steps=4) for lr in (0.1, 0.2, 0.4)]
    specs = [design.Spec("scan", B256, c) for c in cfgs]
    env = tune.TrialEnv("s", "id0", "s", "file:///data", "sqlite:////tmp/x.db", "parent", str(tmp_path / "results"),
                        str(tmp_path / "train"))
    ran, reported = [], []

    def fake_train(cfg, **kw):
        ran.append(cfg)
        return RunSummary(status="completed", steps=4, initial_train_loss=2.3, final_train_loss=1.0)

    monkeypatch.setattr(runner, "train_and_track", fake_train)
    monkeypatch.setattr(tune.tune, "report", reported.append)
    table = tables.open_table(env.results_uri)
    tune.train_spec(specs[0], env, table)  # a run that ended before the trial was retried
    ran.clear()
    tune.train_specs(specs, env)
    assert [id(c) for c in ran] == [id(cfgs[1]), id(cfgs[2])]  # the same objects: never re-parsed on the way
    keys = table.read().column("trial_key").to_pylist()
    assert sorted(keys) == sorted(s.key for s in specs) and len(keys) == 3  # one row per run, none twice
    assert [r["trial_key"] for r in reported] == [specs[1].key, specs[2].key]
    # a trial of one run (full, TPE) whose row exists is not trained again either (issue 21, item 4)
    ran.clear()
    tune.train_specs([specs[0]], env)
    assert ran == [] and table.read().num_rows == 3


def test_a_trials_mlflow_run_is_keyed_by_the_study_id(tmp_path, monkeypatch):
    # issue 21, item 3: the same study name in another output (another study.json, another id) gets new runs
    seen = []
    monkeypatch.setattr(runner, "train_and_track", lambda cfg, **kw: seen.append(kw["record"].reuse_key)
                        or RunSummary(status="completed", steps=1))
    spec = design.Spec("scan", B256, TrainConfig(max_steps=4))
    for study_id in ("id-a", "id-b"):
        env = tune.TrialEnv("s", study_id, "s", "file:///data", "sqlite:////tmp/x.db", "parent",
                            str(tmp_path / study_id), str(tmp_path / "train"))
        tune.train_spec(spec, env, env.table())
    assert seen == [f"id-a:{spec.key}", f"id-b:{spec.key}"]


def test_groups_keep_a_cell_together_costliest_first():
    small, big = TrainConfig(batch_size=64, max_steps=10), TrainConfig(batch_size=1024, max_steps=10)
    specs = [design.Spec("scan", A, small.replace(base_lr=lr)) for lr in (0.1, 0.2, 0.4)] + \
        [design.Spec("scan", B, big.replace(base_lr=lr)) for lr in (0.1, 0.2)]
    groups = design.group_specs(specs, 2)
    assert [[s.cell for s in g] for g in groups] == [[B, B], [A, A], [A]]
