"""The per-worker training loop. Plain PyTorch (+ torch.distributed when world_size > 1): no Ray here, so it runs
in-process, under a Tune trial, or on every Ray Train worker, and is unit-tested on CPU.

Read `train` top to bottom: set up, then per epoch `train_step` (forward, backward, clip, step), the divergence
monitor every log window, and `end_of_epoch` (metrics, evaluation, checkpoint, report)."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nfnet
import storage
from studies.config import TrainConfig
from studies.schema import RunSummary
from studies.verdict import tail_stats

CHECKPOINT_FILE = "state.pt"


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # report(metrics, checkpoint_dir or None): once per epoch and at the end, on every rank (Ray's barrier).
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, ckpt: None
    # Step metrics every log_every_steps (rank 0 only, e.g. to MLflow).
    log_step: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    resume_from: str | None = None  # a checkpoint directory
    print: Callable[[str], None] = print
    on_step: Callable[[int], None] | None = None  # test hook: called before each step (fault injection)


class GradNoiseScale:
    """B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, App. A) from gradients at two batch sizes.

    |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big); both EMA-smoothed before dividing.
    """

    def __init__(self, decay: float = 0.9):
        self.decay, self.g2, self.s, self.n = decay, 0.0, 0.0, 0

    def update(self, g_small_sq: float, b_small: int, g_big_sq: float, b_big: int) -> None:
        g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        s = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
        self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
        self.s = self.decay * self.s + (1 - self.decay) * s
        self.n += 1

    @property
    def value(self) -> float:
        # Bias corrections of the two EMAs cancel in the ratio.
        return self.s / self.g2 if self.n and self.g2 > 0 else float("nan")

    def state_dict(self):
        return {"g2": self.g2, "s": self.s, "n": self.n}

    def load_state_dict(self, d):
        self.g2, self.s, self.n = d["g2"], d["s"], d["n"]


class DivergenceMonitor:
    """Diverged = a non-finite loss, or one above divergence_factor × the first step's loss. Losses stay on the
    device and are checked once per log window (one host sync), all-reduced so every rank stops together."""

    def __init__(self, factor: float, world_size: int):
        self.factor, self.world_size = factor, world_size
        self.pending: list[torch.Tensor] = []
        self.losses: list[float] = []  # every step's loss, for final_train_loss
        self.initial: float | None = None
        self.step: int | None = None
        self.reason: str | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    def check(self, next_step: int) -> bool:
        if not self.pending:
            return self.step is not None
        losses = all_reduce_mean(torch.stack(self.pending).float(), self.world_size).tolist()
        self.pending = []
        first = next_step - len(losses)
        if self.initial is None:
            self.initial = losses[0]
        for i, lv in enumerate(losses):
            self.losses.append(lv)
            if not math.isfinite(lv):
                self.step, self.reason = first + i, "non-finite loss"
            elif lv > self.factor * self.initial:
                self.step, self.reason = first + i, f"loss {lv:.3g} > {self.factor}x initial {self.initial:.3g}"
            if self.step is not None:
                return True
        return False

    @property
    def diverged(self) -> bool:
        return self.step is not None

    def final_train_loss(self) -> tuple[float | None, float | None]:
        """(mean, standard error) of the last tenth of the steps' losses."""
        return tail_stats(self.losses)

    def state_dict(self):
        return {"initial": self.initial, "losses": self.losses}

    def load_state_dict(self, d):
        self.initial, self.losses = d["initial"], list(d["losses"])


def param_groups(model: torch.nn.Module, weight_decay: float):
    # No weight decay on gains, biases and skip gains (NFNet recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("gain") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine decay to 0 at `total` (or, `constant`, the peak held)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, t)))


def run_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """(steps to run, lr schedule length, warmup steps)."""
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    schedule = max(total, cfg.schedule_steps or 0)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    return total, schedule, min(schedule, warmup)


def grad_sq(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


def all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
        t = t / world_size
    return t


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def clip_gradients(cfg: TrainConfig, agc_params, all_params, want_metrics: bool) -> dict[str, Any]:
    """Clip in place after backward (so after DDP's all-reduce) and before the optimizer step. Returns device
    tensors (no sync) when `want_metrics`."""
    out: dict[str, Any] = {}
    if cfg.clipping == "agc":
        stats = nfnet.adaptive_grad_clip_(agc_params, cfg.clip_threshold)
        if want_metrics:
            out = {"grad_norm_before": stats.grad_norm_before, "grad_norm_after": stats.grad_norm_after,
                   "agc_clipped_frac": stats.fraction_clipped(),
                   **{f"agc_clipped_frac.{k}": v for k, v in stats.per_stage().items()}}
    elif cfg.clipping == "norm":
        gn = torch.nn.utils.clip_grad_norm_(all_params, cfg.clip_threshold)
        if want_metrics:
            out = {"grad_norm_before": gn, "grad_norm_after": gn.clamp(max=cfg.clip_threshold)}
    elif want_metrics:
        gn = grad_sq(all_params).sqrt()
        out = {"grad_norm_before": gn, "grad_norm_after": gn}
    return out


@dataclass
class Step:
    loss: torch.Tensor
    logits: torch.Tensor
    grad_sq_small: torch.Tensor | None = None  # gradient noise scale inputs, when measured this step
    grad_sq_big: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def forward_backward(net, x, y_soft, cfg: TrainConfig, amp, scale: float = 1.0):
    with amp():
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=cfg.label_smoothing)
    (loss * scale).backward()
    return loss.detach(), logits.detach()


def train_step(net, opt, x, y_soft, cfg: TrainConfig, amp, params, agc_params, *, measure_gns: bool,
               world_size: int, want_metrics: bool) -> Step:
    opt.zero_grad(set_to_none=True)
    if not measure_gns:
        loss, logits = forward_backward(net, x, y_soft, cfg, amp)
        small = big = None
    else:
        # The same batch as two micro-batches (gradients accumulate to the full-batch gradient): the first half's
        # local gradient is the small-batch estimate, the all-reduced sum the big one. Only for models whose
        # forward does not depend on the batch (no BatchNorm), so the training step itself is unchanged.
        h, b = len(x) // 2, len(x)
        sync_off = net.no_sync() if world_size > 1 else contextlib.nullcontext()
        with sync_off:
            l1, o1 = forward_backward(net, x[:h], y_soft[:h], cfg, amp, h / b)
        small = grad_sq(params) * (b / h) ** 2
        l2, o2 = forward_backward(net, x[h:], y_soft[h:], cfg, amp, (b - h) / b)
        big = grad_sq(params)
        loss, logits = (l1 * h + l2 * (b - h)) / b, torch.cat([o1, o2])
    metrics = clip_gradients(cfg, agc_params, params, want_metrics)
    opt.step()
    return Step(loss, logits, small, big, metrics)


@torch.no_grad()
def evaluate(model, chunks, augment, ctx: WorkerContext, batch: int, channels_last: bool, amp):
    # `chunks` yields this rank's share of the validation set as (images, labels) on the device, all at once
    # (resident) or a shard at a time (streaming); the sums are all-reduced.
    model.eval()
    totals = torch.zeros(3, device=ctx.device, dtype=torch.float64)
    for xs, ys in chunks:
        for i in range(0, len(xs), batch):
            x = augment.eval_transform(xs[i : i + batch])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = ys[i : i + batch]
            with amp():
                logits = model(x)
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    loss, correct, n = totals.tolist()
    return loss / max(n, 1), correct / max(n, 1)


@dataclass
class EpochTally:
    """Device-side sums over one epoch (no sync until the epoch ends)."""

    device: torch.device
    loss: torch.Tensor = None
    correct: torch.Tensor = None
    seen: int = 0
    t0: float = field(default_factory=time.perf_counter)
    last: dict[str, Any] = field(default_factory=dict)  # the last logged step metrics

    def __post_init__(self):
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)

    def add(self, s: Step, labels: torch.Tensor) -> None:
        self.loss += s.loss
        self.correct += (s.logits.argmax(1) == labels).sum()
        self.seen += len(labels)


# The decoded splits this process holds, on their device: a Tune trial actor is reused for trial after trial
# (reuse_actors), so a CIFAR-size study copies its data to the GPU once per actor, not once per run.
_RESIDENT: dict[str, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def resident_split(data, split: str, image_size: int | None, device: torch.device,
                   rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a split (every world-th row from rank), decoded and on `device`; cached per split,
    one dataset at a time, so a process never holds two copies."""
    key = (data.uri, image_size, str(device), rank, world)
    hit = _RESIDENT.get(split)
    if hit is None or hit[0] != key:
        _RESIDENT.pop(split, None)  # free the old copy before making the new one
        x, y = data.load_split(split, image_size=image_size)
        if world > 1:
            x, y = x[rank::world].contiguous(), y[rank::world].contiguous()
        _RESIDENT[split] = key, (x.to(device), y.to(device, torch.int64))
    return _RESIDENT[split][1]


def build(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext):
    """Model, optimizer, data and augmentation for one worker."""
    device = ctx.device
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts it anyway)
    data = storage.open_dataset(dataset_uri)
    man = data.manifest
    model = nfnet.create_model(cfg.model, num_classes=man.num_classes, **cfg.model_overrides).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # One fused kernel for the whole update on the GPU; the multi-tensor (foreach) path on CPU.
    fused = device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, foreach=not fused, fused=fused)
    net = model
    if ctx.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    if man.image_shape is None and cfg.image_size is None:
        raise ValueError(f"{dataset_uri} holds images of varying size; set image_size (--image-size) to train")
    if storage.loaders.loader_mode(data, "train", cfg.loader, cfg.image_size) == "resident":
        x, y = resident_split(data, "train", cfg.image_size, device)
        loader = storage.ResidentLoader(x, y, batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank,
                                        world_size=ctx.world_size, device=device)
    else:
        loader = stream_loader(cfg, data, man.splits["train"], ctx)
    # image_size None: pad-and-crop at the native (CIFAR-size) resolution; else random-resized crops to it.
    augment = nfnet.Augment(cfg.augment_strength, man.num_classes, image_size=cfg.image_size).to(device)
    val = val_chunks(data, cfg, ctx) if cfg.eval_every_epochs else None
    return model, net, opt, loader, augment, val


def stream_loader(cfg: TrainConfig, data, n_rows: int, ctx: WorkerContext) -> storage.EpochStream:
    """This worker's own rows of a streamed split, in one Ray Data execution over all the run's epochs (CPU nodes
    decode, GPUs train); every rank gets the same number of rows, so runs the same number of steps."""
    steps = max(1, (n_rows // ctx.world_size) // cfg.local_batch_size)  # 0 is refused by EpochStream, with why
    total = run_length(cfg, steps)[0]
    return storage.EpochStream(data, "train", batch_size=cfg.local_batch_size, seed=cfg.seed,
                               epochs=-(-total // steps), rank=ctx.rank, world_size=ctx.world_size,
                               device=ctx.device, image_size=cfg.image_size)


def val_chunks(data, cfg: TrainConfig, ctx: WorkerContext) -> Callable[[], Iterable]:
    """Each rank evaluates its own 1/world of the validation split: every world-th image held on the device when
    the split fits (as the train split), else every world-th shard streamed, one decoded shard at a time."""
    if storage.loaders.loader_mode(data, "val", cfg.loader, cfg.image_size) == "resident":
        held = resident_split(data, "val", cfg.image_size, ctx.device, ctx.rank, ctx.world_size)
        return lambda: [held]

    def stream():
        for i in range(ctx.rank, len(data.shard_paths("val")), ctx.world_size):
            x, y = data.load_shard("val", i, image_size=cfg.image_size)
            yield x.to(ctx.device, non_blocking=True), y.to(ctx.device)

    return stream


@dataclass
class Run:
    """One worker's training run: what the loop and end_of_epoch share."""

    cfg: TrainConfig
    ctx: WorkerContext
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    augment: nfnet.Augment
    val: Callable[[], Iterable] | None  # -> this rank's (images, labels) chunks of the validation split
    total: int  # steps to run
    schedule: int  # lr schedule length
    warmup: int
    n_epochs: int
    gns: GradNoiseScale = field(default_factory=GradNoiseScale)
    monitor: DivergenceMonitor = None
    last_checkpoint: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "history": [],
                                                           "best_val_acc": math.nan, "best_val_loss": math.nan})

    def __post_init__(self):
        self.monitor = self.monitor or DivergenceMonitor(self.cfg.divergence_factor, self.ctx.world_size)

    def amp(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")


def train(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext) -> RunSummary:
    t_start = time.perf_counter()
    model, net, opt, loader, augment, val = build(cfg, dataset_uri, ctx)
    total, schedule, warmup = run_length(cfg, loader.steps_per_epoch)
    run = Run(cfg, ctx, model, net, opt, augment, val, total, schedule, warmup,
              n_epochs=math.ceil(total / loader.steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    agc_params = nfnet.agc_parameters(model) if cfg.clipping == "agc" else None
    gns_on = cfg.gns_every_steps > 0 and cfg.local_batch_size >= 2 and not has_batchnorm(model)
    monitor, state = run.monitor, run.state
    if ctx.resume_from:
        restore_checkpoint(ctx.resume_from, run)
        ctx.print(f"resumed from epoch {state['epoch']} (step {state['step']})")

    step, train_time = state["step"], 0.0
    for epoch in range(state["epoch"], run.n_epochs):
        # Every random stream is re-seeded from (seed, epoch, rank): a run resumed at an epoch boundary
        # continues exactly as the uninterrupted one (mid-epoch: from the saved streams, see resume_mid_epoch).
        torch.manual_seed(storage.derive_seed(cfg.seed, epoch, ctx.rank))
        gen = torch.Generator().manual_seed(storage.derive_seed(cfg.seed, epoch, ctx.rank, 1))  # augmentation
        tally, noise = EpochTally(ctx.device), []
        skip = resume_mid_epoch(run, tally, gen)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        for i, (xb, yb) in enumerate(loader.epoch(epoch)):
            if i < skip:  # trained before the mid-epoch checkpoint
                continue
            if step >= total:
                break
            if ctx.on_step:
                ctx.on_step(step)
            lr = lr_at(step, schedule, warmup, cfg.lr, cfg.lr_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y_soft = augment(xb, yb, generator=gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            log_now = (step + 1) % cfg.log_every_steps == 0 or step + 1 == total
            s = train_step(net, opt, x, y_soft, cfg, run.amp, params, agc_params, world_size=ctx.world_size,
                           measure_gns=gns_on and step % cfg.gns_every_steps == 0, want_metrics=log_now)
            monitor.add(s.loss)
            tally.add(s, yb)
            tally.last.update(s.metrics)
            if s.grad_sq_small is not None:
                noise.append((s.grad_sq_small, s.grad_sq_big))
            step += 1
            if log_now:
                if log_window(run, step, lr, tally, noise):
                    break
                noise = []
                if step < total and checkpoint_due(run):
                    save_mid_epoch(run, epoch, i + 1, step, tally, gen)
        train_time += end_of_epoch(run, epoch, step, tally)
        if monitor.diverged or step >= total:
            break
    loader.close()  # a streamed split stops decoding what the run will not use (the rest of a scan's epoch)

    hist = state["history"]
    last_val = next((h for h in reversed(hist) if "val_acc" in h), {})

    def finite(v):
        return None if v is None or math.isnan(v) else v

    final_loss, final_se = monitor.final_train_loss()

    return RunSummary(
        status="diverged" if monitor.diverged else "completed", steps=step, epochs=state["epoch"],
        diverged_step=monitor.step, diverged_reason=monitor.reason,
        best_val_acc=finite(state["best_val_acc"]), final_val_acc=last_val.get("val_acc"),
        best_val_loss=finite(state["best_val_loss"]), final_val_loss=last_val.get("val_loss"),
        initial_train_loss=monitor.initial, final_train_loss=final_loss, final_train_loss_se=final_se,
        images_per_sec=(sum(h["images_per_sec"] for h in hist) / len(hist)) if hist else None,
        train_time_s=train_time, wall_time_s=time.perf_counter() - t_start,
        gns=run.gns.value if run.gns.n else None, history=hist)


def log_window(run: Run, step: int, lr: float, tally: EpochTally, noise) -> bool:
    """Once per log_every_steps: the divergence check (one sync), the noise scale, step metrics. True: stop."""
    cfg, ctx = run.cfg, run.ctx
    stop = run.monitor.check(step)
    update_gns(run.gns, noise, cfg.local_batch_size, cfg.batch_size, ctx.world_size)
    if ctx.rank == 0:
        sm = {"train_loss_step": run.monitor.losses[-1], "lr": lr, "gns": run.gns.value,
              **{k: float(v) for k, v in tally.last.items()}}
        ctx.log_step({k: v for k, v in sm.items() if math.isfinite(v)}, step)
    return stop


def checkpoint_due(run: Run) -> bool:
    """Rank 0's clock decides, so every rank checkpoints at the same step."""
    minutes = run.cfg.checkpoint_every_minutes
    if not minutes:
        return False
    due = torch.tensor(float(time.monotonic() - run.last_checkpoint >= 60 * minutes), device=run.ctx.device)
    if run.ctx.world_size > 1:
        dist.broadcast(due, 0)
    return bool(due.item())


def save_mid_epoch(run: Run, epoch: int, epoch_step: int, step: int, tally: EpochTally, gen) -> None:
    """A checkpoint inside an epoch: where in it, its partial sums and the random streams, so a resumed run
    continues exactly."""
    rng = {"torch": torch.get_rng_state(), "augment": gen.get_state()}
    if run.ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.ctx.device)
    run.state.update(epoch=epoch, step=step, mid_epoch={
        "epoch_step": epoch_step, "loss": tally.loss.item(), "correct": tally.correct.item(), "seen": tally.seen,
        "last": {k: float(v) for k, v in tally.last.items()}, "rng": rng})
    ckpt = save_checkpoint(run) if run.ctx.rank == 0 else None
    run.state.pop("mid_epoch")
    run.ctx.report({"step": step, "epoch": epoch + 1, "status": "running", "mid_epoch_checkpoint": 1.0}, ckpt)


def resume_mid_epoch(run: Run, tally: EpochTally, gen) -> int:
    """Batches of this epoch to skip (already trained), with the sums and random streams restored."""
    mid = run.state.pop("mid_epoch", None)
    if not mid:
        return 0
    tally.loss += mid["loss"]
    tally.correct += mid["correct"]
    tally.seen = mid["seen"]
    tally.last.update(mid["last"])
    torch.set_rng_state(mid["rng"]["torch"])
    gen.set_state(mid["rng"]["augment"])
    if "cuda" in mid["rng"]:
        torch.cuda.set_rng_state(mid["rng"]["cuda"], run.ctx.device)
    return mid["epoch_step"]


def update_gns(gns: GradNoiseScale, noise, b_local: int, batch: int, world_size: int) -> None:
    if not noise:
        return
    small = all_reduce_mean(torch.stack([n[0] for n in noise]), world_size).tolist()
    big = torch.stack([n[1] for n in noise]).tolist()
    for gs, gb in zip(small, big):
        gns.update(gs, b_local // 2, gb, batch)


def end_of_epoch(run: Run, epoch: int, step: int, tally: EpochTally) -> float:
    """Epoch metrics (one sync), validation, checkpoint and report. Returns the epoch's training time."""
    cfg, ctx, state, monitor = run.cfg, run.ctx, run.state, run.monitor
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - tally.t0
    epoch_steps = tally.seen // max(1, cfg.local_batch_size)
    totals = torch.stack([tally.loss.float(), tally.correct.float(),
                          torch.tensor(float(tally.seen), device=ctx.device)])
    tl, tc, ts = all_reduce_mean(totals, ctx.world_size).tolist()
    m: dict[str, Any] = {
        "epoch": epoch + 1, "step": step,
        "lr": lr_at(max(0, step - 1), run.schedule, run.warmup, cfg.lr, cfg.lr_schedule),
        "train_loss": tl / max(1, epoch_steps), "train_acc": tc / max(1.0, ts),
        "images_per_sec": tally.seen * ctx.world_size / dt if dt > 0 else math.nan,
        "step_time_ms": 1000 * dt / max(1, epoch_steps), "gns": run.gns.value,
        **{k: float(v) for k, v in tally.last.items()},
    }
    final = monitor.diverged or step >= run.total
    if run.val is not None and not monitor.diverged and ((epoch + 1) % cfg.eval_every_epochs == 0 or final):
        vl, va = evaluate(run.net, run.val(), run.augment, ctx, max(256, cfg.local_batch_size), cfg.channels_last,
                          run.amp)
        m.update(val_loss=vl, val_acc=va)
        if not va <= state["best_val_acc"]:  # nan-safe max
            state["best_val_acc"] = va
        if not vl >= state["best_val_loss"]:
            state["best_val_loss"] = vl
    state["epoch"], state["step"] = epoch + 1, step
    if not math.isnan(state["best_val_acc"]):
        m["best_val_acc"] = state["best_val_acc"]
    state["history"].append(dict(m))
    m.update(status="diverged" if monitor.diverged else "completed" if final else "running",
             diverged_step=monitor.step)
    if ctx.rank == 0:
        ctx.print(progress_line(m, run.n_epochs))
    ckpt_dir = None
    if cfg.checkpoint_every_epochs and not final and (epoch + 1) % cfg.checkpoint_every_epochs == 0 and ctx.rank == 0:
        ckpt_dir = save_checkpoint(run)
    ctx.report(m, ckpt_dir)
    return dt


def progress_line(m: dict[str, Any], n_epochs: int) -> str:
    val = f" val_acc {m['val_acc']:.3f} val_loss {m['val_loss']:.3f}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']}/{n_epochs} step {m['step']} loss {m['train_loss']:.4f} acc {m['train_acc']:.3f}"
            f"{val} lr {m['lr']:.4g} {m['images_per_sec']:.0f} img/s [{m['status']}]")


def save_checkpoint(run: Run) -> str:
    import tempfile

    run.last_checkpoint = time.monotonic()
    d = tempfile.mkdtemp(prefix="nfnet-ckpt-")
    torch.save({"config_hash": run.cfg.fingerprint(), "model": run.model.state_dict(),
                "optimizer": run.opt.state_dict(), "gns": run.gns.state_dict(), "monitor": run.monitor.state_dict(),
                "state": run.state}, Path(d) / CHECKPOINT_FILE)
    return d


def restore_checkpoint(path: str, run: Run) -> None:
    # weights_only: a checkpoint from shared storage holds tensors and plain data, never code to run.
    ck = torch.load(Path(path) / CHECKPOINT_FILE, map_location=run.ctx.device, weights_only=True)
    if ck.get("config_hash") != run.cfg.fingerprint():
        raise ValueError(f"checkpoint {path} was written by a run with another config (hash "
                         f"{ck.get('config_hash')} ≠ {run.cfg.fingerprint()}); refusing to continue it under this one")
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.gns.load_state_dict(ck["gns"])
    run.monitor.load_state_dict(ck["monitor"])
    run.state.update(ck["state"])
