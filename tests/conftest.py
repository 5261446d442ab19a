import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: --dist loadgroup) the tests of a file that share a module-scoped set-up
    (a two-node cluster, a reference study, an S3 server) stay in one process, so it is built once; every other
    test is scheduled on its own, which keeps both processes busy to the end."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d[-1].scope for n, d in (defs.name2fixturedefs.items() if defs else ()) if d}
        if scopes & {"module", "class", "package"}:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
