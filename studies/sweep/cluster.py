"""How big the Ray cluster is for a study: the resources it has now and, when it autoscales, the most it can grow
to; how many trials fit at once; and the multi-node rule: every path a trial reads or writes must be reachable
from every node (object storage, an MLflow server), not local to the driver's machine."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.training.config import TrainConfig

if TYPE_CHECKING:
    from studies.sweep.design import Study


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux: a container's or taskset's
    share, not the machine's), else every core (macOS has no sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class Capacity:
    """What the cluster has now and, on an autoscaling cluster, the most it can grow to (the autoscaler's node
    types × their max counts, as the autoscaler reports them to the GCS). `nodes` counts live nodes."""
    now: dict[str, float]
    max: dict[str, float] | None = None
    nodes: int = 1

    @property
    def autoscaling(self) -> bool:
        return self.max is not None

    def most(self) -> dict[str, float]:
        return {k: max(self.now.get(k, 0), (self.max or {}).get(k, 0)) for k in {*self.now, *(self.max or {})}}


def autoscaler_max(config: dict[str, Any]) -> dict[str, float]:
    """The most of each resource a `ray up` cluster config allows: head + worker types at their max counts,
    the cluster-wide max_workers filled with the richest types first."""
    types = config.get("available_node_types", {})
    head = types.get(config.get("head_node_type"), {})
    workers = [t for name, t in types.items() if name != config.get("head_node_type")]
    cap = config.get("max_workers", sum(t.get("max_workers", 0) for t in workers))
    out = {k: float(v) for k, v in head.get("resources", {}).items()}
    for key in {k for t in workers for k in t.get("resources", {})}:
        left, total = cap, 0.0
        for t in sorted(workers, key=lambda t: -t.get("resources", {}).get(key, 0)):
            n = min(left, t.get("max_workers", 0))
            total, left = total + n * t.get("resources", {}).get(key, 0), left - n
        out[key] = out.get(key, 0.0) + total
    return out


def _autoscaler_resources() -> dict[str, float] | None:
    try:  # what the autoscaler reports to the GCS (the reader Ray Train itself uses; private, so guarded)
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
        if most:
            return {k: float(v) for k, v in most.items()}
    except Exception:
        pass
    # `ray up` leaves the cluster config on the head, where a `ray job submit` driver runs.
    path = Path(os.environ.get("NFNET_LAB_AUTOSCALER_CONFIG", "~/ray_bootstrap_config.yaml")).expanduser()
    if path.is_file():
        import yaml

        return autoscaler_max(yaml.safe_load(path.read_text()))
    return None


def cluster_capacity() -> Capacity:
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Capacity(ray.cluster_resources(), _autoscaler_resources(), nodes)


def cluster_concurrency(cfg: TrainConfig, cap: Capacity | dict[str, float] | None = None) -> int:
    """Trials that fit the cluster at once, each needing num_workers × (cpus_per_worker [+ gpus_per_worker]).
    An autoscaling cluster is sized by what it can grow to, not by the nodes alive at start (often a head only):
    the trials' resource requests are what make the autoscaler add the nodes."""
    if cap is None:
        cap = cluster_capacity()
    if isinstance(cap, dict):
        cap = Capacity(cap)
    res = cap.most()
    where = "can grow to (autoscaler's maximum)" if cap.autoscaling else "has now"
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    n = int(res.get("CPU", 0) // need_cpu) if need_cpu else 1
    if cfg.use_gpu:
        gpus, need_gpu = res.get("GPU", 0), cfg.num_workers * cfg.gpus_per_worker
        if gpus < need_gpu:
            raise RuntimeError(
                f"the study asks for {need_gpu:g} GPU(s) per trial but the Ray cluster {where} {gpus:g} GPU(s); "
                "lower --num-workers, drop --use-gpu, connect to a GPU cluster (RAY_ADDRESS), or give "
                "--max-concurrent (trials then wait for GPU nodes started by hand)")
        n = min(n, int(gpus / need_gpu + 1e-9))
    if n < 1:
        raise RuntimeError(
            f"one trial needs {need_cpu:g} CPUs ({cfg.num_workers} workers × {cfg.cpus_per_worker:g}) but the Ray "
            f"cluster {where} {res.get('CPU', 0):g}; lower --num-workers/--cpus-per-worker or use a bigger cluster")
    return n


def check_cluster_paths(study: Study, nodes: int, autoscaling: bool = False) -> None:
    """On a multi-node cluster every worker must reach the data, the results and the tracking store: local
    paths and local MLflow stores resolve on one machine only. An autoscaling cluster counts as multi-node even
    while only its head is up: the trials will run on nodes it adds."""
    if nodes <= 1 and not autoscaling:
        return
    shared_fs = os.environ.get("NFNET_LAB_SHARED_FS") == "1"  # e.g. the same NFS mount on every node
    local = [(what, v) for what, v in (("--output", study.output), ("--data-root", study.fixed.data_root))
             if ("://" not in v or v.startswith("file://")) and not (shared_fs and os.path.isabs(v))]
    if study.tracking_uri.startswith(("sqlite:", "file:")):
        local.append(("--tracking-uri", study.tracking_uri))
    if local:
        where = ("this Ray cluster autoscales (trials run on nodes it adds)" if autoscaling else
                 f"this Ray cluster has {nodes} nodes")
        raise ValueError(
            where + ", but " + ", ".join(f"{w} {v}" for w, v in local)
            + " is local to one machine; use s3:// or gs:// URIs for --output/--data-root (or NFNET_LAB_RESULTS/"
              "NFNET_LAB_DATA; or NFNET_LAB_SHARED_FS=1 for a filesystem mounted on every node) and an MLflow server "
              "(http://…) for --tracking-uri; see platform/README.md")
