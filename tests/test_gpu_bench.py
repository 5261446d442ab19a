"""benchmarks/gpu.py is the one command the GPU machine runs; its --smoke mode rehearses every section on CPU
so that nothing in it runs for the first time on the (rarely lent) GPU."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"^RESULT (\w+) ratio=(\S+) target(>=|<=)(\S+)( \(cpu smoke\))?$")
FIGURES = {"gpu_model_step", "gpu_mfu", "gpu_agc", "gpu_agc_share", "gpu_model_step_compiled", "gpu_mfu_compiled",
           "gpu_bf16_loss", "gpu_bf16_verdicts", "gpu_packing", "gpu_measured"}
CUDA_ONLY = {"gpu_step_host_syncs", "gpu_nccl_allreduce"}


def test_smoke_prints_every_result_on_cpu(tmp_path):
    pytest.importorskip("timm")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result_lines = [line for line in out if line.startswith("RESULT")]
    assert all(RESULT.match(line) for line in result_lines), result_lines  # the exact, parseable form
    ratios = {m[1]: float(m[2]) for m in map(RESULT.match, result_lines)}
    assert FIGURES <= ratios.keys(), proc.stdout[-3000:]
    assert all(math.isfinite(v) for v in ratios.values()), ratios
    assert all(line.endswith("(cpu smoke)") for line in result_lines)  # never mistaken for device figures

    not_measured = {line.split(":")[0].removeprefix("NOT MEASURED ") for line in out
                    if line.startswith("NOT MEASURED")}
    assert not_measured == CUDA_ONLY, proc.stdout[-3000:]
    assert RESULT.match(out[-1])
    assert ratios["gpu_measured"] == pytest.approx(9 / 10)  # all but the host-sync check, which needs CUDA
    log = (tmp_path / "gpu.log").read_text().splitlines()
    assert [line for line in log if line.startswith(("RESULT", "NOT MEASURED"))] == \
        [line for line in out if line.startswith(("RESULT", "NOT MEASURED"))]
