"""Cluster sizing and the multi-node path rule."""

import pytest

from studies import agc_lambda
from studies.sweep import cluster, design
from studies.training.config import TrainConfig
from tests.helpers import ROOT


def test_local_paths_refused_on_a_multi_node_cluster(tmp_path):
    study = design.Study(name="x", preset=design.Preset(grid={"batch_size": [32]}, fixed={}),
                         fixed=TrainConfig(data_root="s3://bucket/data"), output="relative/results",
                         tracking_uri="sqlite:////abs/mlflow.db")
    cluster.check_cluster_paths(study, nodes=1)  # a laptop: fine
    with pytest.raises(ValueError, match="--output relative/results.*--tracking-uri") as e:
        cluster.check_cluster_paths(study, nodes=3)
    assert "--data-root s3://" not in str(e.value)  # remote data is fine


def test_fractional_gpus_pack_small_trials():
    cfg = TrainConfig(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2)
    assert cluster.cluster_concurrency(cfg, {"CPU": 16, "GPU": 1}) == 4  # four CIFAR-size trials share one GPU
    assert cluster.cluster_concurrency(cfg.replace(gpus_per_worker=1.0), {"CPU": 16, "GPU": 1}) == 1
    assert cluster.cluster_concurrency(cfg, {"CPU": 4, "GPU": 1}) == 2  # then the CPUs are the limit
    # platform/README.md's worked example: 8 GPU workers per trial on 4 × 8-GPU, 96-CPU nodes
    big = TrainConfig(use_gpu=True, num_workers=8, cpus_per_worker=8)
    assert cluster.cluster_concurrency(big, {"CPU": 384, "GPU": 32}) == 4
    with pytest.raises(RuntimeError, match="--max-concurrent"):  # a fixed CPU-only cluster
        cluster.cluster_concurrency(big, {"CPU": 8})
    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrainConfig(gpus_per_worker=1.5)


def test_autoscaling_cluster_is_sized_by_its_maximum_and_path_checked(tmp_path, monkeypatch):
    # platform/cluster/aws.yaml as `ray up` leaves it on the head: no GPU node is up at start (head only, CPU 0).
    monkeypatch.setenv("NFNET_LAB_AUTOSCALER_CONFIG", str(ROOT / "platform/cluster/aws.yaml"))
    most = cluster._autoscaler_resources()
    # max_workers 8 overall, richest first: 4 × p4d (8 GPU, 96 CPU) then 4 × g5 (1 GPU, 16 CPU)
    assert most["GPU"] == 4 * 8 + 4 * 1 and most["CPU"] == 4 * 96 + 4 * 16
    cap = cluster.Capacity(now={"CPU": 0.0}, max=most, nodes=1)
    imagenet = design.Study(name="i", preset=agc_lambda.PRESETS["imagenet"],
                            fixed=TrainConfig(**agc_lambda.PRESETS["imagenet"].fixed, data_root="/data"),
                            output="/results", tracking_uri="http://mlflow:5000")
    assert cluster.cluster_concurrency(imagenet.fixed, cap) == 4  # 4 trials × 8 GPUs, not "0 GPU(s)"
    with pytest.raises(RuntimeError, match="0 GPU"):  # the same cluster read from its live nodes alone
        cluster.cluster_concurrency(imagenet.fixed, cluster.Capacity(now={"CPU": 0.0}))
    with pytest.raises(ValueError, match="autoscales.*--output /results"):  # one node up, but it will grow
        cluster.check_cluster_paths(imagenet, cap.nodes, cap.autoscaling)
    cluster.check_cluster_paths(imagenet, cap.nodes, autoscaling=False)  # a fixed one-node cluster: local is fine
    gcp = cluster.autoscaler_max({"max_workers": 2, "head_node_type": "h",
                                 "available_node_types": {"h": {"resources": {"CPU": 4}},
                                                          "a": {"max_workers": 5, "resources": {"GPU": 1}},
                                                          "b": {"max_workers": 1, "resources": {"GPU": 8}}}})
    assert gcp == {"CPU": 4.0, "GPU": 8.0 + 1.0}  # cap 2 nodes: the 8-GPU one, then one 1-GPU


def test_usable_cores_reads_the_affinity_and_falls_back_where_there_is_none(monkeypatch):
    import os

    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert cluster.usable_cores() == 3  # the process's share, not the machine's cores
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert cluster.usable_cores() == 7  # macOS: no affinity call
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cluster.usable_cores() == 1
