"""Every GPU claim of nfnet-lab measured side by side in one run, one `RESULT` line per figure (issue 13).

    python benchmarks/gpu.py [--out DIR] [--budget-s 420]   # on one GPU, <= 8 min including torch.compile
    python benchmarks/gpu.py --smoke                        # tiny sizes on CPU: rehearses every code path

1. NFNet-F0 training step (forward + backward + AGC + SGD, bf16 autocast, channels_last, the largest batch that
   fits at 192 px): ours vs timm's dm_nfnet_f0, eager, then both under torch.compile in a child process that is
   killed at its time cap (a stuck compile costs that section only).
2. MFU: the step's FLOPs (FlopCounterMode) / step time / the device's dense bf16 peak (PEAK_BF16).
3. AGC over F0's real gradients, ours vs timm's adaptive_clip_grad; AGC's share of the step; host syncs in a step.
4. The CIFAR-size study: nf_resnet_cifar at batch 1024, data resident on the device; trials/hour for a λ grid
   run one at a time vs 4 processes sharing the GPU.
5. bf16 vs fp32 on the laptop model: loss curves, and the diverged/trained verdicts at the frontier lrs.
A section that fails prints `NOT MEASURED <name>: <reason>` and the run goes on; NCCL needs >= 2 GPUs and is
never measured here. The last line is a RESULT line: how many of the figures were measured.
"""

import argparse
import collections
import contextlib
import gc
import io
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import agc_vs_timm, sync, time_many
from torch.utils.flop_counter import FlopCounterMode

import storage
from nfnet import adaptive_grad_clip_, agc_parameters, create_model
from studies.training.config import TrainConfig
from studies.training.loop import train
from studies.training.state import WorkerContext

LAMBDA = 0.01  # AGC threshold of the NFNet recipe

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from NVIDIA's product datasheets. First match wins.
PEAK_BF16 = [
    ("H200", 989e12, "NVIDIA H200 datasheet, SXM, dense bf16"),
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet, PCIe, dense bf16"),
    ("H100", 989e12, "NVIDIA H100 datasheet, SXM, dense bf16"),
    ("A100", 312e12, "NVIDIA A100 datasheet, dense bf16"),
]
# CPU rehearsal only: lets --smoke run the MFU arithmetic. Not a measured or published figure.
SMOKE_PEAK = ("cpu smoke", 1e12, "nominal 1 TFLOP/s, NOT a datasheet figure: CPU rehearsal of the arithmetic")

# Stability frontier of the laptop model (40-step runs, base lr per 256): (batch, clipping, largest stable lr).
FRONTIER = [(64, "none", 3.2), (256, "none", 0.8), (1024, "none", 0.4),
            (64, "agc", 6.4), (256, "agc", 3.2), (1024, "agc", 1.6)]
BF16_LOSS_TOL = 0.02  # max relative per-step difference of the bf16 and fp32 loss curves

FULL = dict(f0={}, size=192, batches=(1024, 768, 512, 384, 256, 192, 128, 64, 32), oom_above=0, warmup=3, reps=4,
            inner=2, agc_reps=20, compile_backend="inductor", caps=dict(compile=300, bf16=100, pack=110),
            bf16_batch=256, bf16_steps=50, verdict_steps=40, cells=FRONTIER,
            laptop_data=dict(n_train=16384, n_val=2048, image_size=16),
            pack=dict(trials=4, steps=80, batch=1024, model={"width": 64, "depth": 2},
                      data=dict(n_train=16384, n_val=2048)))
# Smoke: an F0-shaped pair small enough for CPU (one block per stage, narrow), same overrides on both sides.
F0_TINY = dict(ours=dict(depths=(1, 1, 1, 1), widths=(64, 128, 128, 128), group_width=32, stem_widths=(8, 16, 32, 64)),
               timm=dict(depths=(1, 1, 1, 1), channels=(64, 128, 128, 128), group_size=32, stem_chs=64,
                         num_features=256))
SMOKE = dict(f0=F0_TINY, size=32, batches=(4, 2), oom_above=2, warmup=1, reps=2, inner=1, agc_reps=3,
             compile_backend="eager", caps=dict(compile=90, bf16=60, pack=150), bf16_batch=64, bf16_steps=4,
             verdict_steps=3, cells=FRONTIER[:1], laptop_data=dict(n_train=1024, n_val=128, image_size=16),
             pack=dict(trials=2, steps=3, batch=64, model={"width": 8, "depth": 1},
                       data=dict(n_train=512, n_val=64, image_size=16)))
FIGURES = ["gpu_model_step", "gpu_mfu", "gpu_agc", "gpu_agc_share", "gpu_step_host_syncs",
           "gpu_model_step_compiled", "gpu_mfu_compiled", "gpu_bf16_loss", "gpu_bf16_verdicts", "gpu_packing"]


class Log:
    """Prints (flushed, so a killed run keeps what it printed) and appends to DIR/gpu.log with --out."""

    def __init__(self, out: str | None, note: str):
        self.path = Path(out) / "gpu.log" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.note = note
        # The real stdout, kept: train() calls run under redirect_stdout while a reader thread may be logging.
        self.stdout = sys.stdout
        self.lock = threading.Lock()
        self.results: dict[str, float] = {}
        self.missing: dict[str, str] = {}

    def line(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stdout, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(text + "\n")

    def result(self, name: str, ratio: float, target: str) -> None:
        self.results[name] = ratio
        self.line(f"RESULT {name} ratio={ratio:.4g} target{target}" + (f" {self.note}" if self.note else ""))

    def not_measured(self, name: str, reason: str) -> None:
        self.missing[name] = reason
        self.line(f"NOT MEASURED {name}: {reason}")


def section(log: Log, names: list[str], fn, *args) -> None:
    # One failing section must not cost the others: whatever it did not print becomes NOT MEASURED.
    t0 = time.monotonic()
    try:
        fn(*args)
    except Exception as e:  # reported as NOT MEASURED, never swallowed silently
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        for n in names:
            if n not in log.results and n not in log.missing:
                log.not_measured(n, reason)
    finally:
        log.line(f"  ({fn.__name__}: {time.monotonic() - t0:.0f} s)")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def peak_entry(device: torch.device) -> tuple[str, float, str] | None:
    if device.type != "cuda":
        return SMOKE_PEAK
    name = torch.cuda.get_device_name(device)
    return next((e for e in PEAK_BF16 if e[0] in name), None)


# ---------------------------------------------------------------- 1-3: the NFNet-F0 step

def f0_pair(device: torch.device, fmt, shrink: dict):
    """Ours and timm's F0 with the same regularization (dropout 0.2, stochastic depth 0.25), same layout.
    `shrink`: {} or the same smaller shape for both (F0_TINY)."""
    import timm
    from timm.utils import adaptive_clip_grad

    torch.manual_seed(0)
    ours = create_model("nfnet_f0", **shrink.get("ours", {})).to(device).to(memory_format=fmt)
    peer = timm.create_model("dm_nfnet_f0", pretrained=False, drop_rate=0.2, drop_path_rate=0.25,
                             **shrink.get("timm", {}))
    peer = peer.to(device).to(memory_format=fmt)
    named = agc_parameters(ours)  # everything but the classifier, for both
    head = {id(p) for p in peer.get_classifier().parameters()}
    peer_params = [p for p in peer.parameters() if id(p) not in head]
    return (ours, lambda: adaptive_grad_clip_(named, LAMBDA)), (peer, lambda: adaptive_clip_grad(peer_params, LAMBDA))


class Step:
    """zero_grad, forward + backward under bf16 autocast (on CUDA), AGC, SGD; random inputs made once."""

    def __init__(self, model, clip, batch: int, size: int, device: torch.device, fmt):
        self.model, self.fwd, self.clip, self.device = model, model, clip, device
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (batch,), device=device)

    def backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.fwd(self.x), self.y)
        loss.backward()

    def __call__(self, clip: bool = True) -> None:
        self.backward()
        if clip:
            self.clip()
        self.opt.step()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def too_big(e: BaseException) -> bool:
    # Out of memory, or cuDNN/cuBLAS failing to allocate a workspace (how a too-large batch also shows up).
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(
        k in text for k in ("out of memory", "ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED")))


def fit_batch(pairs, S, device, fmt, log: Log) -> tuple[int, list[Step]]:
    """Largest candidate batch at which both models train a step (same batch for both: same settings)."""
    for b in S["batches"]:
        steps = None
        try:
            if S["oom_above"] and b > S["oom_above"]:  # CPU rehearsal of the out-of-memory path
                raise torch.cuda.OutOfMemoryError(f"simulated: batch {b} > {S['oom_above']}")
            steps = [Step(m, c, b, S["size"], device, fmt) for m, c in pairs]
            for s in steps:
                s()
            sync(device)
            return b, steps
        except RuntimeError as e:
            if not too_big(e):
                raise
            log.line(f"  batch {b}: does not fit ({str(e).splitlines()[0][:100]}), trying smaller")
        steps = None
        for m, _ in pairs:
            m.zero_grad(set_to_none=True)
        free(device)
    raise RuntimeError(f"no batch in {S['batches']} fits")


def model_sections(log: Log, S, device, state) -> None:
    gpu = device.type == "cuda"
    fmt = torch.channels_last if gpu else torch.contiguous_format
    torch.backends.cudnn.benchmark = gpu  # both models: pick the fastest conv kernels (warm-up absorbs the search)
    pairs = f0_pair(device, fmt, S["f0"])
    batch, steps = fit_batch(pairs, S, device, fmt, log)
    ours, peer = steps
    t = time_many({"ours": ours, "ours_no_agc": lambda: ours(clip=False), "timm": peer}, S["reps"], device,
                  warmup=S["warmup"], inner=S["inner"])
    t = {k: statistics.median(v) for k, v in t.items()}
    state.update(batch=batch, t_ours=t["ours"])
    prec = "bf16 autocast, channels_last, cudnn.benchmark" if gpu else "fp32, contiguous (CPU)"
    shape = " (smaller F0-shaped pair, F0_TINY)" if S["f0"] else ""
    log.line(f"F0 train step{shape}, batch {batch} at {S['size']} px, {prec}, SGD momentum, AGC λ={LAMBDA} "
             f"(classifier excluded on both):")
    for k, label in (("ours", "ours nfnet_f0"), ("timm", "timm dm_nfnet_f0"), ("ours_no_agc", "ours, no AGC")):
        log.line(f"  {label:18s} {t[k] * 1e3:9.2f} ms/step {batch / t[k]:10.1f} img/s")
    log.result("gpu_model_step", t["timm"] / t["ours"], ">=1.2")

    section(log, ["gpu_agc", "gpu_agc_share", "gpu_step_host_syncs"], agc_section, log, S, device, ours, peer, t)
    section(log, ["gpu_mfu"], mfu_section, log, device, ours, state)


def mfu_section(log: Log, device, ours: Step, state) -> None:
    with FlopCounterMode(display=False) as fc:
        ours.backward()
    flops = state["flops"] = fc.get_total_flops()
    entry = peak_entry(device)
    if entry is None:
        log.not_measured("gpu_mfu", f"no dense bf16 peak known for {torch.cuda.get_device_name(device)}")
        return
    achieved = flops / state["t_ours"]
    log.line(f"MFU: {flops / 1e12:.3f} TFLOP per step counted ({flops / state['batch'] / 1e9:.2f} GFLOP/image, "
             f"forward + backward), {achieved / 1e12:.2f} TFLOP/s achieved; peak entry '{entry[0]}' = "
             f"{entry[1] / 1e12:.0f} TFLOP/s ({entry[2]})")
    log.result("gpu_mfu", achieved / entry[1], ">=0.40")


def agc_section(log: Log, S, device, ours: Step, peer: Step, t) -> None:
    from timm.utils import adaptive_clip_grad

    ours.backward()  # fresh, unclipped gradients of a real step
    named = agc_parameters(ours.model)
    params = [p for _, p in named]
    stats, restore, bad = agc_vs_timm(named, params, LAMBDA, rtol=1e-3)
    if bad:  # timing two functions that compute different things would mean nothing
        raise RuntimeError(f"ours and timm's AGC disagree on {bad} of {len(params)} tensors")
    ta = time_many({"ours": lambda: adaptive_grad_clip_(named, LAMBDA),
                    "timm": lambda: adaptive_clip_grad(params, LAMBDA)}, S["agc_reps"], device, restore, warmup=2)
    ta = {k: statistics.median(v) for k, v in ta.items()}
    n = sum(p.numel() for p in params)
    log.line(f"AGC over F0's gradients ({len(params)} tensors, {n / 1e6:.1f}M elements, {stats.fraction_clipped():.2f}"
             f" of units clipped): ours {ta['ours'] * 1e3:.3f} ms, timm {ta['timm'] * 1e3:.3f} ms")
    log.result("gpu_agc", ta["timm"] / ta["ours"], ">=5")
    log.line(f"AGC share: AGC alone {ta['ours'] * 1e3:.3f} ms / step {t['ours'] * 1e3:.2f} ms; step with vs "
             f"without AGC differs by {(t['ours'] - t['ours_no_agc']) / t['ours']:+.2%} (overlap with the backward)")
    log.result("gpu_agc_share", ta["ours"] / t["ours"], "<=0.02")
    if device.type != "cuda":
        log.not_measured("gpu_step_host_syncs", "torch.cuda.set_sync_debug_mode needs CUDA")
        return
    restore()
    in_agc = host_syncs(lambda: adaptive_grad_clip_(named, LAMBDA))
    in_step = host_syncs(ours)
    log.line(f"host syncs (torch.cuda.set_sync_debug_mode('warn')): {len(in_agc)} in AGC, {len(in_step)} in a whole "
             "step (zero_grad, forward, backward, AGC, SGD)" + (f"; first: {in_step[0][:160]}" if in_step else ""))
    log.result("gpu_step_host_syncs", len(in_step), "<=0")


def host_syncs(fn) -> list[str]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


class Child:
    """A child process in its own process group (so its compile workers die with it). A reader thread keeps
    lines starting with one of `tags` for expect(), logs lines starting with '# ', and keeps the rest's tail
    for error messages."""

    def __init__(self, args: list[str], log: Log, label: str, tags: tuple[str, ...]):
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log, self.label, self.tags = log, label, tags
        self.lines: queue.Queue = queue.Queue()
        self.tail: collections.deque = collections.deque(maxlen=6)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(self.tags):
                self.lines.put(line)
            elif line.startswith("# "):
                self.log.line(f"  [{self.label}] {line[2:200]}")
            elif line.strip():
                self.tail.append(line[:200])
        self.lines.put(None)

    def expect(self, tag: str, deadline: float) -> str:
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"{self.label}: no {tag.strip()} before its time cap; killed") from None
            if line is None:
                raise RuntimeError(f"{self.label} exited with {self.proc.wait()} before {tag.strip()}: "
                                   + " | ".join(self.tail))
            if line.startswith(tag):
                return line[len(tag):]

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_compile(log: Log, S, device, state, workdir: Path) -> Child:
    # Compiling is CPU work: it runs while the bf16 section (nothing timed) uses the GPU; timing waits for GO.
    spec = dict(device=str(device), batch=state["batch"], size=S["size"], backend=S["compile_backend"], f0=S["f0"],
                warmup=1, reps=min(3, S["reps"]), inner=S["inner"],  # compiling leaves less time to time it
                oom_above=state["batch"] // 2 if S.get("rehearse_compile_oom") else 0)
    path = workdir / "compile.json"
    path.write_text(json.dumps(spec))
    return Child(["--compile-worker", str(path)], log, "compile", ("READY", "COMPILE_JSON "))


def finish_compile(log: Log, S, device, state, child: Child, deadline: float) -> None:
    try:
        child.expect("READY", deadline)
        child.send("GO")
        out = json.loads(child.expect("COMPILE_JSON ", deadline))
    finally:
        child.kill()
    b = out["batch"]
    log.line(f"torch.compile (backend {S['compile_backend']}), batch {b}: compile + first 2 steps ours "
             f"{out['compile_s_ours']:.1f} s, timm {out['compile_s_timm']:.1f} s (not in the timings); "
             f"ours {out['ours'] * 1e3:.2f} ms/step ({b / out['ours']:.1f} img/s), timm {out['timm'] * 1e3:.2f} "
             f"ms/step ({b / out['timm']:.1f} img/s)")
    log.result("gpu_model_step_compiled", out["timm"] / out["ours"], ">=1.2")
    entry = peak_entry(device)
    if entry is None:
        log.not_measured("gpu_mfu_compiled", "no dense bf16 peak known for this device")
    else:
        achieved = state["flops"] * b / state["batch"] / out["ours"]  # FLOPs scale with the batch
        log.line(f"MFU compiled: {achieved / 1e12:.2f} TFLOP/s of '{entry[0]}' {entry[1] / 1e12:.0f} TFLOP/s")
        log.result("gpu_mfu_compiled", achieved / entry[1], ">=0.40")


def compile_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as in the eager section
    batch, steps = spec["batch"], None
    while steps is None:  # the eager batch filled the device; halve it if compiling needs more room
        try:
            if batch > spec["oom_above"] > 0:  # CPU rehearsal of the out-of-memory path
                raise torch.cuda.OutOfMemoryError(f"simulated: batch {batch} > {spec['oom_above']}")
            steps = [Step(m, c, batch, spec["size"], device, fmt) for m, c in f0_pair(device, fmt, spec["f0"])]
            warm = {}
            for name, s in zip(("ours", "timm"), steps):
                s.fwd = torch.compile(s.model, backend=spec["backend"])
                t0 = time.perf_counter()
                for _ in range(2):
                    s()
                sync(device)
                warm[f"compile_s_{name}"] = time.perf_counter() - t0
                print(f"# {name} compiled and warmed up at batch {batch} in {warm[f'compile_s_{name}']:.1f} s",
                      flush=True)
        except RuntimeError as e:
            if batch < 2 or not too_big(e):
                raise
            print(f"# out of memory at batch {batch}; compiling again at {batch // 2}", flush=True)
            steps = None
        if steps is None:
            torch._dynamo.reset()
            free(device)
            batch //= 2
    print("READY", flush=True)
    sys.stdin.readline()
    t = time_many({"ours": steps[0], "timm": steps[1]}, spec["reps"], device, warmup=spec["warmup"],
                  inner=spec["inner"])
    print("COMPILE_JSON " + json.dumps({"batch": batch, **warm, **{k: statistics.median(v) for k, v in t.items()}}),
          flush=True)


# ---------------------------------------------------------------- 5: bf16 vs fp32 (laptop model)

def train_quiet(cfg: TrainConfig, uri: str, device: torch.device):
    losses: dict[int, float] = {}
    ctx = WorkerContext(device=device,
                        log_step=lambda m, step: losses.__setitem__(step, m.get("train_loss_step", math.nan)))
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-epoch progress lines
        out = train(cfg, uri, ctx)
    return out, [losses[k] for k in sorted(losses)]


def laptop_cfg(S, device, **changes) -> TrainConfig:
    cfg = TrainConfig(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                      dataset_params=dict(S["laptop_data"]), batch_size=S["bf16_batch"], base_lr=0.4, clipping="agc",
                      clip_threshold=LAMBDA, precision="fp32", max_steps=S["bf16_steps"], seed=0, log_every_steps=1,
                      warmup_epochs=0.5, gns_every_steps=2, use_gpu=device.type == "cuda")
    return cfg.replace(**changes)


def bf16_section(log: Log, S, device, cap: float, root: str) -> None:
    t_end = time.monotonic() + cap
    uri = storage.prepare_dataset("synthetic", root, seed=0, **S["laptop_data"]).uri
    curves = {p: train_quiet(laptop_cfg(S, device, precision=p), uri, device)[1] for p in ("fp32", "bf16")}
    a, b = curves["fp32"], curves["bf16"]
    if len(a) != len(b) or not a:
        raise RuntimeError(f"loss curves of different lengths: fp32 {len(a)}, bf16 {len(b)}")
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    log.line(f"bf16 vs fp32, laptop model (nf_resnet_cifar w8 d1, 16 px, batch {S['bf16_batch']}, base lr 0.4, "
             f"AGC λ={LAMBDA}), {len(a)} steps from seed 0: loss {a[0]:.4f} -> fp32 {a[-1]:.4f} / bf16 {b[-1]:.4f}; "
             f"max relative difference per step {max(rel):.2e} (tolerance {BF16_LOSS_TOL})")
    log.result("gpu_bf16_loss", max(rel), f"<={BF16_LOSS_TOL}")
    agree, total = 0, 0
    for batch, mode, lr, mult in [(*cell, m) for cell in S["cells"] for m in (1, 2)]:
        if time.monotonic() > t_end:
            log.line(f"  (section cap reached: verdicts from {total} of {2 * len(S['cells'])} lrs)")
            break
        v = {p: train_quiet(laptop_cfg(S, device, precision=p, batch_size=batch, base_lr=lr * mult,
                                       clipping=mode, max_steps=S["verdict_steps"], log_every_steps=2),
                            uri, device)[0].status for p in ("fp32", "bf16")}
        total += 1
        agree += v["fp32"] == v["bf16"]
        log.line(f"  batch {batch:5d} {mode:4s} base lr {lr * mult:5.2f} ({'frontier' if mult == 1 else '2x'}): "
                 f"fp32 {v['fp32']}, bf16 {v['bf16']}")
    if not total:
        raise TimeoutError("no verdict run fit in the section cap")
    log.result("gpu_bf16_verdicts", agree / total, ">=1")


# ---------------------------------------------------------------- 4: the CIFAR-size study on one GPU

def pack_section(log: Log, S, device, cap: float, root: str) -> None:
    P = S["pack"]
    uri = storage.prepare_dataset("synthetic", root, seed=0, **P["data"]).uri
    lams = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32][:P["trials"]]
    base = dict(model="nf_resnet_cifar", model_overrides=P["model"], dataset="synthetic", batch_size=P["batch"],
                base_lr=0.1, clipping="agc", precision="bf16" if device.type == "cuda" else "fp32", seed=0,
                max_steps=P["steps"], log_every_steps=10, warmup_epochs=0.5, gns_every_steps=10,
                use_gpu=device.type == "cuda")
    trials = [dict(base, clip_threshold=lam) for lam in lams]
    probe = storage.make_loader(uri, "train", batch_size=P["batch"], seed=0, device=device)  # what train() will use
    where = f"{type(probe).__name__} on {getattr(probe, 'images', torch.empty(0)).device}"
    del probe
    t_end = time.monotonic() + cap
    seq = run_workers(log, [trials], uri, device, t_end)
    par = run_workers(log, [[tr] for tr in trials], uri, device, t_end)
    ips = statistics.mean(r["images_per_sec"] for r in seq["results"])
    w = P["model"]
    log.line(f"CIFAR-size study: nf_resnet_cifar w{w['width']} d{w['depth']}, batch {P['batch']}, {base['precision']}, "
             f"data loader {where} (resident: one uint8 tensor, batches are index gathers, no host->device copy "
             f"per step): {ips:.0f} images/s (loop's own per-epoch figure)")
    per_h = {k: len(trials) * 3600 / r["wall_s"] for k, r in (("seq", seq), ("par", par))}
    log.line(f"AGC λ grid {lams}, {P['steps']} steps each: one at a time (1 process, whole GPU per trial) "
             f"{seq['wall_s']:.1f} s = {per_h['seq']:.0f} trials/h; {len(trials)} processes sharing the GPU "
             f"{par['wall_s']:.1f} s = {per_h['par']:.0f} trials/h (process start-up and a warm-up run excluded "
             "from both)")
    log.result("gpu_packing", per_h["par"] / per_h["seq"], ">=2")


def run_workers(log: Log, groups: list[list[dict]], uri: str, device: torch.device, t_end: float) -> dict:
    """One worker process per group; each warms up, then all start their trials together on GO."""
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        try:
            for i, trials in enumerate(groups):
                spec = Path(tmp) / f"w{i}.json"
                spec.write_text(json.dumps(dict(uri=uri, device=str(device), trials=trials)))
                children.append(Child(["--worker", str(spec)], log, f"trial worker {i}", ("READY", "PACK_JSON ")))
            for c in children:
                c.expect("READY", t_end)
            t0 = time.perf_counter()
            for c in children:
                c.send("GO")
            results = [r for c in children for r in json.loads(c.expect("PACK_JSON ", t_end))]
            wall = time.perf_counter() - t0
        finally:
            for c in children:
                c.kill()
    return dict(wall_s=wall, results=results)


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    # Warm-up run (CUDA context, kernel choice) before READY: paid untimed by both schedules.
    train_quiet(TrainConfig(**dict(spec["trials"][0], max_steps=3)), spec["uri"], device)
    print("READY", flush=True)
    sys.stdin.readline()
    out = []
    for fields in spec["trials"]:
        r, _ = train_quiet(TrainConfig(**fields), spec["uri"], device)
        out.append({"images_per_sec": r.images_per_sec, "status": r.status, "wall_s": r.wall_time_s})
    print("PACK_JSON " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU rehearsal of every code path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget-s", type=float, default=420.0, help="whole run; sections are capped to fit")
    p.add_argument("--out", default=None, help="also append every line to OUT/gpu.log")
    p.add_argument("--size", type=int, default=0, help="F0 image size (default 192; smoke 32)")
    p.add_argument("--batches", default="", help="candidate F0 batches, largest first, e.g. 8,4,2")
    p.add_argument("--compile-backend", default="", help="torch.compile backend (default inductor; smoke eager)")
    p.add_argument("--f0-shape", choices=["full", "tiny"], help="F0 as published, or F0_TINY (default with --smoke)")
    p.add_argument("--rehearse-compile-oom", action="store_true", help="CPU rehearsal: the compile child OOMs once")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.compile_worker:
        return compile_worker(args.compile_worker)

    t_start = time.monotonic()
    device = torch.device(args.device)
    S = dict(SMOKE if args.smoke else FULL)
    if args.size:
        S["size"] = args.size
    if args.batches:
        S["batches"], S["oom_above"] = tuple(int(b) for b in args.batches.split(",")), 0
    S["compile_backend"] = args.compile_backend or S["compile_backend"]
    if args.f0_shape:
        S["f0"] = F0_TINY if args.f0_shape == "tiny" else {}
    S["rehearse_compile_oom"] = args.rehearse_compile_oom
    import timm

    log = Log(args.out, "" if device.type == "cuda" else ("(cpu smoke)" if args.smoke else "(cpu)"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    entry = peak_entry(device)
    log.line(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); timm {timm.__version__}; "
             f"python {sys.version.split()[0]}; budget {args.budget_s:.0f} s" + ("; SMOKE sizes" if args.smoke else ""))
    log.line(f"peak table entry: {entry[0]!r} = {entry[1] / 1e12:.0f} TFLOP/s ({entry[2]})" if entry else
             "peak table entry: none for this device (MFU will be NOT MEASURED)")
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    log.not_measured("gpu_nccl_allreduce", f"NCCL all-reduce across GPUs needs >= 2 GPUs; this run has {n_gpus} "
                     "(DDP/NCCL path untested on hardware; nothing faked)")

    def left() -> float:
        return args.budget_s - (time.monotonic() - t_start)

    caps, state = S["caps"], {}
    section(log, FIGURES[:5], model_sections, log, S, device, state)
    with tempfile.TemporaryDirectory(prefix="nfnet-gpu-") as tmp:
        section(log, FIGURES[9:], pack_section, log, S, device, min(caps["pack"], left() / 3), tmp)
        # torch.compile last, with the rest of the budget: it compiles (CPU) while the bf16 section runs (nothing
        # timed there), then times on the idle GPU; a stuck compile is killed at the deadline.
        compile_end = time.monotonic() + min(caps["compile"], left() - 5)
        child = None
        if "flops" not in state:
            for n in FIGURES[5:7]:
                log.not_measured(n, "the eager F0 section did not finish, so there is no batch/FLOP count to reuse")
        else:
            try:
                child = start_compile(log, S, device, state, Path(tmp))
            except Exception as e:  # reported, never swallowed silently
                for n in FIGURES[5:7]:
                    log.not_measured(n, f"could not start the compile child: {type(e).__name__}: {e}")
        section(log, FIGURES[7:9], bf16_section, log, S, device, min(caps["bf16"], left() / 3), tmp)
        if child is not None:
            section(log, FIGURES[5:7], finish_compile, log, S, device, state, child, compile_end)
    log.line(f"wall time {time.monotonic() - t_start:.0f} s; not measured: "
             + (", ".join(f"{k} ({v})" for k, v in log.missing.items()) or "nothing"))
    measured = sum(n in log.results for n in FIGURES)
    log.result("gpu_measured", measured / len(FIGURES), ">=1")


if __name__ == "__main__":
    main()
