"""The one-pass CPU AGC kernel (agc_cpu.c): compiled with the system C compiler on first use, cached, called
through ctypes (no torch headers, so the build takes about a second). Without a compiler AGC falls back to
torch ops, with one warning; NFNET_LAB_AGC_KERNEL=0 forces the fallback."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("agc_cpu.c")
# -fopenmp-simd: the source's `omp simd` pragmas vectorize its reductions; no OpenMP runtime is linked (threads
# are Python's, the call releases the GIL).
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
# Below this many elements (W and G) one thread does it all: a thread hand-off costs more than it saves.
_PARALLEL_MIN = 1 << 20
_CC_TIMEOUT_S = 120  # a compiler that hangs (a stuck license server, a dead NFS mount) must not hang training

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nfnet-lab"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (install gcc or clang, or set CC)")
    source = _SRC.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=_CC_TIMEOUT_S).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"agc_cpu-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target, then rename: Ray workers starting together never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SRC), "-lm"], capture_output=True, text=True,
                                  timeout=_CC_TIMEOUT_S)
            if done.returncode:
                raise RuntimeError(f"{cc} failed to build {_SRC.name}: {done.stderr.strip()[-500:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    i64, f32, ptrs = ctypes.c_int64, ctypes.c_float, ctypes.POINTER(ctypes.c_void_p)
    lib.agc_clip_f32.argtypes = [i64, ptrs, ptrs, ctypes.POINTER(i64), ctypes.POINTER(i64), i64, i64, f32, f32,
                                 ctypes.c_void_p, ctypes.c_void_p]
    lib.agc_clip_f32.restype = None
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, or None (disabled, or no compiler: warned once per process)."""
    if os.environ.get("NFNET_LAB_AGC_KERNEL", "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _state["lib"] = None
                warnings.warn(f"AGC on the CPU uses torch ops, about 1.1x slower than the one-pass kernel: {e}",
                              RuntimeWarning, stacklevel=3)
        return _state["lib"]


def _unit_layout(t: torch.Tensor, units: int) -> bool:
    # Every unit one contiguous run of floats: true for contiguous tensors and channels_last convs alike (the
    # output-channel dim stays outermost; a unit's norm does not care how its elements are ordered inside).
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    return t.is_contiguous() or (t.ndim == 4 and units == t.shape[0] and
                                 t.is_contiguous(memory_format=torch.channels_last))


def supports(params: list[torch.Tensor], grads: list[torch.Tensor], units: list[int]) -> bool:
    return all(_unit_layout(p, u) and _unit_layout(g, u) for p, g, u in zip(params, grads, units))


def clip_(lib: ctypes.CDLL, params, grads, units: list[int], clip_threshold: float, eps: float):
    """Clips `grads` in place; returns (‖G_i‖ before clipping, factor) per unit, fp32, in tensor order."""
    n = len(grads)
    lens = [g.numel() // u if u else 0 for g, u in zip(grads, units)]
    total_units = sum(units)
    g_norm = torch.empty(total_units)
    factor = torch.empty(total_units)
    i64s = ctypes.c_int64 * n
    ptrs = ctypes.c_void_p * n
    args = (n, ptrs(*[p.data_ptr() for p in params]), ptrs(*[g.data_ptr() for g in grads]), i64s(*units),
            i64s(*lens))
    tail = (ctypes.c_float(clip_threshold), ctypes.c_float(eps), g_norm.data_ptr(), factor.data_ptr())
    elements = sum(g.numel() for g in grads)
    threads = torch.get_num_threads()
    if threads == 1 or elements < _PARALLEL_MIN:
        lib.agc_clip_f32(*args, 0, total_units, *tail)
    else:
        bounds = _split(units, lens, threads)
        list(_pool(threads).map(lambda r: lib.agc_clip_f32(*args, r[0], r[1], *tail), zip(bounds[:-1], bounds[1:])))
    # Writes through a pointer are invisible to autograd's version counters: bump those of the tensors written.
    wrote = torch.segment_reduce((factor < 1).float(), "max", lengths=torch.tensor(units)).tolist()
    torch.autograd.graph.increment_version([g for g, w in zip(grads, wrote) if w])
    return g_norm, factor


def _split(units: list[int], lens: list[int], parts: int) -> list[int]:
    """Unit boundaries cutting the elements into `parts` nearly equal shares."""
    ends, start_units, acc, u = [], [], 0, 0
    for n_units, length in zip(units, lens):
        start_units.append(u)
        acc += n_units * length
        u += n_units
        ends.append(acc)
    bounds = [0]
    for k in range(1, parts):
        target = acc * k // parts
        t = bisect_right(ends, target)
        if t == len(units):
            bounds.append(u)
            continue
        before = ends[t] - units[t] * lens[t]
        bounds.append(max(bounds[-1], start_units[t] + (target - before) // max(lens[t], 1)))
    bounds.append(u)
    return bounds


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        if _state.get("threads") != threads:
            if "pool" in _state:
                _state["pool"].shutdown(wait=False)
            _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="agc")
            _state["threads"] = threads
        return _state["pool"]
