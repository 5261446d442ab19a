"""The Tune side of a study, without a cluster: the searcher hands out one phase after another, a trial runs the
TrainConfig its Spec carries (built once, on the driver), and a retried trial skips the runs that have a row."""
from ray.tune.search import Searcher

from studies.sweep import design, tables, tune
from studies.training import runner
from studies.training.config import TrainConfig
from studies.training.summary import RunSummary


def test_a_phase_is_handed_out_only_once_the_one_before_has_ended():
    handed = []

    def phase(name, n):
        def make():
            handed.append(name)
            return [[f"{name}{i}"] for i in range(n)]
        return make

    s = tune.PhaseSearcher([tune.Phase(phase("scan", 2)), tune.Phase(phase("full", 1))])
    assert s.suggest("a") == {"specs": ["scan0"]} and s.suggest("b") == {"specs": ["scan1"]}
    assert s.suggest("c") is None and handed == ["scan"]  # the scan still runs: the full phase is not computed
    s.on_trial_complete("a")
    assert s.suggest("c") is None
    s.on_trial_complete("b")
    assert s.suggest("c") == {"specs": ["full0"]} and handed == ["scan", "full"]
    s.on_trial_complete("c")
    assert s.suggest("d") == Searcher.FINISHED


def test_a_repeated_phase_is_asked_again_after_each_round_until_it_has_nothing():
    rounds = [[["rep0"], ["rep1"]], [["rep2"]], []]
    asked = []

    def replicate():
        asked.append("replicate")
        return rounds.pop(0)

    s = tune.PhaseSearcher([tune.Phase(replicate, repeat=True), tune.Phase(lambda: [["full0"]])])
    assert s.suggest("a") == {"specs": ["rep0"]} and s.suggest("b") == {"specs": ["rep1"]}
    assert s.suggest("c") is None  # the round runs: the next one is not computed yet
    s.on_trial_complete("a")
    s.on_trial_complete("b")
    assert s.suggest("c") == {"specs": ["rep2"]} and asked == ["replicate"] * 2
    s.on_trial_complete("c")
    assert s.suggest("d") == {"specs": ["full0"]} and asked == ["replicate"] * 3  # the empty round ended it
    s.on_trial_complete("d")
    assert s.suggest("e") == Searcher.FINISHED


def test_a_trial_runs_the_config_its_spec_carries_and_skips_runs_with_a_row(tmp_path, monkeypatch):
    cfgs = [TrainConfig(base_lr=lr, max_steps=4) for lr in (0.1, 0.2, 0.4)]
    specs = [design.Spec("scan", "batch_size=256", c) for c in cfgs]
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
    monkeypatch.setattr(runner, "train_and_track",
                        lambda cfg, **kw: seen.append(kw["reuse_key"]) or RunSummary(status="completed", steps=1))
    spec = design.Spec("scan", "batch_size=256", TrainConfig(max_steps=4))
    for study_id in ("id-a", "id-b"):
        env = tune.TrialEnv("s", study_id, "s", "file:///data", "sqlite:////tmp/x.db", "parent",
                            str(tmp_path / study_id), str(tmp_path / "train"))
        tune.train_spec(spec, env, env.table())
    assert seen == [f"id-a:{spec.key}", f"id-b:{spec.key}"]


def test_groups_keep_a_cell_together_costliest_first():
    small, big = TrainConfig(batch_size=64, max_steps=10), TrainConfig(batch_size=1024, max_steps=10)
    specs = [design.Spec("scan", "a", small.replace(base_lr=lr)) for lr in (0.1, 0.2, 0.4)] + \
        [design.Spec("scan", "b", big.replace(base_lr=lr)) for lr in (0.1, 0.2)]
    groups = design.group_specs(specs, 2)
    assert [[s.cell for s in g] for g in groups] == [["b", "b"], ["a", "a"], ["a"]]
