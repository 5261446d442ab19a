"""One run's session (studies/training/session.py): the set-up and teardown both launch paths share, and Ray's
report, checkpoint and restore given as callables (a Reports value), checked here without Ray."""
import os
import shutil

import torch

from studies.training.session import Reports, Session, silent
from studies.training.summary import OBJECTIVE
from tests.helpers import tiny_cfg


class Saved:
    """A checkpoint as Ray hands one back: a directory copied out by to_directory()."""

    def __init__(self, path):
        self.path, self.copies = path, []

    def to_directory(self, dest):
        self.copies.append(shutil.copytree(self.path, dest, dirs_exist_ok=True))
        return dest


def fake_reports(tmp_path, latest=None):
    reported = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None:  # the loop removes its directory once reported: keep a copy, as Ray would
            checkpoint = Saved(shutil.copytree(checkpoint, tmp_path / f"kept{id(reported)}-{metrics['step']}"))
        reported.append((metrics, checkpoint))

    return Reports(report, checkpoint=lambda d: d, latest=lambda: latest, node_id=lambda: "node-1"), reported


def test_reports_go_to_the_given_session_and_a_restart_resumes_from_its_checkpoint(tmp_path, tiny_data):
    cfg = tiny_cfg(seed=2, max_steps=24, checkpoint_every_epochs=1)  # 8 steps per epoch: 3 epochs
    reports, reported = fake_reports(tmp_path)
    threads = torch.get_num_threads()
    ref = Session(cfg, reports=reports, print=silent).train(tiny_data)
    assert torch.get_num_threads() == threads and ref.node_id == "node-1"
    assert [m["step"] for m, _ in reported] == [8, 16, 24] and all(OBJECTIVE in m for m, _ in reported)
    assert [c is not None for _, c in reported] == [True, True, False]  # none after the last epoch

    latest = reported[0][1]  # a trial restarted after its first epoch's checkpoint
    again, _ = fake_reports(tmp_path, latest=latest)
    lines = []
    resumed = Session(cfg, reports=again, print=lines.append).train(tiny_data)
    assert lines[0] == "resumed from epoch 1 (step 8)"
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in ref.history]
    assert resumed.final_val_acc == ref.final_val_acc
    assert len(latest.copies) == 1 and not os.path.exists(latest.copies[0])  # the restored copy is removed


def test_without_a_session_a_run_reports_nowhere_and_keeps_no_checkpoint(tmp_path, tiny_data):
    out = Session(tiny_cfg(max_steps=8, checkpoint_every_epochs=1), print=silent).train(tiny_data)
    assert out.status == "completed" and out.node_id is None
