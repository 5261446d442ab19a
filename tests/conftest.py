import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_configure(config):
    """Torch threads of this pytest process: its share of the cores. `make test` runs 2 processes on 2 cores;
    with torch's default (a thread per core) each one's in-process tensor work ran 2 threads beside the other's
    work, and every parallel region waited on a thread the other process held. The in-process tensor tests
    (loop, loaders, AGC, augmentation, models, signal, checkpoint, compare, optim) took 63-69 s with 2 threads each
    (92-103 s of CPU), 50 s with 1 (64 s of CPU). Runs in a study's trial set their own (cpus_per_worker)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers:  # an xdist worker; the controller runs no test
        import torch

        from studies.sweep.cluster import usable_cores

        torch.set_num_threads(max(1, usable_cores() // workers))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    if not ray.is_initialized():
        from studies.training.runner import start_local_ray  # started once more if Ray's first start fails

        start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic shard set shared by the training and study tests."""
    import storage

    root = tmp_path_factory.mktemp("data")
    return storage.prepare_dataset("synthetic", str(root), seed=0, n_train=512, n_val=128).uri


# The longest tests that share no module-scoped set-up, longest first (each 30 s to 4 min on 2 busy cores).
SLOW_FIRST = (
    "tests/test_sweep_run.py::test_three_phase_study_end_to_end_and_independent_of_concurrency",
    "tests/test_gpu_bench.py::test_smoke_prints_every_result_on_cpu",
    "tests/test_training_runner.py::test_in_process_equals_torch_trainer_and_resume_after_kill",
    "tests/test_training_runner.py::test_one_rank_stuck_before_the_all_reduce_ends_the_whole_group_which_resumes",
    "tests/test_training_runner.py::test_train_py_prints_only_what_a_user_needs",
    "tests/test_faults.py::test_a_shard_read_that_never_returns_ends_the_run_and_is_recorded_hung",
    "tests/test_sweep_run.py::test_a_new_output_gets_its_own_mlflow_runs",
)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: --dist loadgroup) the tests of a file that share a module-scoped set-up
    (a two-node cluster, a reference study, an S3 server) stay in one process, so it is built once; every other
    test is scheduled on its own, which keeps both processes busy to the end.

    xdist hands out the groups first (most tests first), then the single tests in collection order, each to the
    process that is free; the suite's wall time is the busier process's sum, so the longest single tests are
    collected first (SLOW_FIRST): a 4-minute test handed out last would leave the other process idle that long.
    Only tests outside a group move, so a file's module-scoped set-up is still built once without xdist too."""
    groups = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d[-1].scope for n, d in (defs.name2fixturedefs.items() if defs else ()) if d}
        if scopes & {"module", "class", "package"}:
            groups[item.nodeid] = item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))

    def rank(item):
        name = item.nodeid.split("[")[0]
        return SLOW_FIRST.index(name) if name in SLOW_FIRST and item.nodeid not in groups else len(SLOW_FIRST)

    items.sort(key=rank)
    yield  # xdist's own hook (in each worker) names a grouped test "<nodeid>@<group>": its scheduler groups by that
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.nodeid in groups:
                _name_group(item, groups[item.nodeid])


def _name_group(item, group: str) -> None:
    """xdist 3.8 writes the "@group" suffix to `item._nodeid`, where pytest 9 no longer keeps a node's id (`_id`, a
    NodeId): the suffix was lost and every test scheduled alone, so each process rebuilt a file's module-scoped
    set-up (the faults' reference study, the two-node platform, the UI's study) for each run of its tests."""
    from _pytest.nodeid import NodeId

    item._id = NodeId.parse(f"{item.nodeid}@{group}")
