"""The per-worker training loop. Plain PyTorch (+ torch.distributed when world_size > 1): no Ray here, so it runs
in-process, under a Tune trial, or on every Ray Train worker, and is unit-tested on CPU.

Read `train` top to bottom: set up, then per epoch `train_step` (forward, backward, clip, step), the divergence
monitor every log window, and `end_of_epoch` (metrics, evaluation, checkpoint, report). The run's state types
(WorkerContext, Step, EpochTally, Training) are in studies/training/state.py; `loop.WorkerContext` still names the
context that `train` takes."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nfnet
import storage
from studies.training.checkpoint import (
    checkpoint_due,
    restore_checkpoint,
    resume_mid_epoch,
    save_checkpoint,
    save_mid_epoch,
)
from studies.training.config import TrainConfig
from studies.training.data import resident_split, stream_loader, val_chunks
from studies.training.monitors import all_reduce_mean, update_gns
from studies.training.schedule import lr_at, run_length
from studies.training.state import EpochTally, Step, Training, WorkerContext
from studies.training.summary import RunSummary


def param_groups(model: torch.nn.Module, weight_decay: float):
    # No weight decay on gains, biases and skip gains (NFNet recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("gain") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grad_sq(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


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
def evaluate(model, chunks, augment, ctx: WorkerContext, batch: int, channels_last: bool, amp, step: int = 0):
    # `chunks` yields this rank's share of the validation set as (images, labels) on the device, all at once
    # (resident) or a shard at a time (streaming); the sums are all-reduced.
    model.eval()
    totals = torch.zeros(3, device=ctx.device, dtype=torch.float64)
    for xs, ys in chunks:
        ctx.beat(step, "eval (a validation shard)")
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


def optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """The run's SGD: one fused kernel for the whole update on the GPU; on CPU torch's multi-tensor path, as
    nfnet.optim.SGD (the same bits, without torch.optim's per-process import of torch._dynamo)."""
    groups = param_groups(model, cfg.weight_decay)
    if device.type == "cuda":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    return nfnet.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def build(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext):
    """Model, optimizer, data and augmentation for one worker."""
    device = ctx.device
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts it anyway)
    data = storage.open_dataset(dataset_uri)
    man = data.manifest
    model = nfnet.create_model(cfg.model, num_classes=man.num_classes, **cfg.model_overrides).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optimizer(model, cfg, device)
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


def setup(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext):
    """The run's Training (restored from ctx.resume_from, if given) and its training-data loader."""
    model, net, opt, loader, augment, val = build(cfg, dataset_uri, ctx)
    total, schedule, warmup = run_length(cfg, loader.steps_per_epoch)
    tr = Training(cfg, ctx, model, net, opt, augment, val, total, schedule, warmup,
                  n_epochs=math.ceil(total / loader.steps_per_epoch),
                  gns_on=cfg.gns_every_steps > 0 and cfg.local_batch_size >= 2 and not has_batchnorm(model))
    if ctx.resume_from:
        restore_checkpoint(ctx.resume_from, tr)
        ctx.print(f"resumed from epoch {tr.state['epoch']} (step {tr.state['step']})")
    return tr, loader


def train(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext) -> RunSummary:
    t_start = time.perf_counter()
    ctx.beat(0, "set-up and data read")
    tr, loader = setup(cfg, dataset_uri, ctx)
    train_time = 0.0
    for epoch in range(tr.state["epoch"], tr.n_epochs):
        train_time += train_epoch(tr, loader, epoch)
        if tr.monitor.diverged or tr.state["step"] >= tr.total:
            break
    loader.close()  # a streamed split stops decoding what the run will not use (the rest of a scan's epoch)
    return summarize(tr, train_time, time.perf_counter() - t_start)


def train_epoch(tr: Training, loader, epoch: int) -> float:
    """One epoch (or what is left of it after a mid-epoch checkpoint). Returns its training time."""
    cfg, ctx, step = tr.cfg, tr.ctx, tr.state["step"]
    # Every random stream is re-seeded from (seed, epoch, rank): a run resumed at an epoch boundary continues
    # exactly as the uninterrupted one (mid-epoch: from the saved streams, see resume_mid_epoch).
    torch.manual_seed(storage.derive_seed(cfg.seed, epoch, ctx.rank))
    gen = torch.Generator().manual_seed(storage.derive_seed(cfg.seed, epoch, ctx.rank, 1))  # augmentation
    tally, noise = EpochTally(ctx.device), []
    skip = resume_mid_epoch(tr, tally, gen)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    ctx.beat(step, "data read")
    for i, (xb, yb) in enumerate(loader.epoch(epoch)):
        if i < skip:  # trained before the mid-epoch checkpoint
            continue
        if step >= tr.total:
            break
        ctx.beat(step, ctx.step_where())
        if ctx.on_step:
            ctx.on_step(step)
        lr = lr_at(step, tr.schedule, tr.warmup, cfg.lr, cfg.lr_schedule)
        for g in tr.opt.param_groups:
            g["lr"] = lr
        x, y_soft = tr.augment(xb, yb, generator=gen)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        log_now = (step + 1) % cfg.log_every_steps == 0 or step + 1 == tr.total
        s = train_step(tr.net, tr.opt, x, y_soft, cfg, tr.amp, tr.params, tr.agc_params, world_size=ctx.world_size,
                       measure_gns=tr.gns_on and step % cfg.gns_every_steps == 0, want_metrics=log_now)
        tr.monitor.add(s.loss)
        tally.add(s, yb)
        tally.last.update(s.metrics)
        if s.grad_sq_small is not None:
            noise.append((s.grad_sq_small, s.grad_sq_big))
        step += 1
        if log_now:
            if log_window(tr, step, lr, tally, noise):
                break
            noise = []
            if step < tr.total and checkpoint_due(tr):
                save_mid_epoch(tr, epoch, i + 1, step, tally, gen)
        ctx.beat(step, "data read")
    return end_of_epoch(tr, epoch, step, tally)


def summarize(tr: Training, train_time: float, wall_time: float) -> RunSummary:
    state, monitor = tr.state, tr.monitor
    hist = state["history"]
    last_val = next((h for h in reversed(hist) if "val_acc" in h), {})

    def finite(v):
        return None if v is None or math.isnan(v) else v

    final_loss, final_se = monitor.final_train_loss()
    low, high = monitor.loss_range()
    return RunSummary(
        status="diverged" if monitor.diverged else "completed", steps=state["step"], epochs=state["epoch"],
        diverged_step=monitor.step, diverged_reason=monitor.reason,
        best_val_acc=finite(state["best_val_acc"]), final_val_acc=last_val.get("val_acc"),
        best_val_loss=finite(state["best_val_loss"]), final_val_loss=last_val.get("val_loss"),
        initial_train_loss=monitor.initial, final_train_loss=final_loss, final_train_loss_se=final_se,
        lowest_train_loss=low, highest_train_loss=high,
        images_per_sec=(sum(h["images_per_sec"] for h in hist) / len(hist)) if hist else None,
        train_time_s=train_time, wall_time_s=wall_time, gns=tr.gns.value if tr.gns.n else None, history=hist)


def log_window(tr: Training, step: int, lr: float, tally: EpochTally, noise) -> bool:
    """Once per log_every_steps: the divergence check (one sync), the noise scale, step metrics. True: stop."""
    cfg, ctx = tr.cfg, tr.ctx
    stop = tr.monitor.check(step)
    update_gns(tr.gns, noise, cfg.local_batch_size, cfg.batch_size, ctx.world_size)
    if ctx.rank == 0:
        sm = {"train_loss_step": tr.monitor.losses[-1], "lr": lr, "gns": tr.gns.value,
              **{k: float(v) for k, v in tally.last.items()}}
        ctx.log_step({k: v for k, v in sm.items() if math.isfinite(v)}, step)
    return stop


def end_of_epoch(tr: Training, epoch: int, step: int, tally: EpochTally) -> float:
    """Epoch metrics (one sync), validation, checkpoint and report. Returns the epoch's training time."""
    cfg, ctx, state, monitor = tr.cfg, tr.ctx, tr.state, tr.monitor
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - tally.t0
    epoch_steps = tally.seen // max(1, cfg.local_batch_size)
    totals = torch.stack([tally.loss.float(), tally.correct.float(),
                          torch.tensor(float(tally.seen), device=ctx.device)])
    ctx.beat(step, "epoch metrics" if ctx.world_size == 1 else "collective (epoch metrics' all-reduce)")
    tl, tc, ts = all_reduce_mean(totals, ctx.world_size).tolist()
    m: dict[str, Any] = {
        "epoch": epoch + 1, "step": step,
        "lr": lr_at(max(0, step - 1), tr.schedule, tr.warmup, cfg.lr, cfg.lr_schedule),
        "train_loss": tl / max(1, epoch_steps), "train_acc": tc / max(1.0, ts),
        "images_per_sec": tally.seen * ctx.world_size / dt if dt > 0 else math.nan,
        "step_time_ms": 1000 * dt / max(1, epoch_steps), "gns": tr.gns.value,
        **{k: float(v) for k, v in tally.last.items()},
    }
    if monitor.diverged:  # the epoch's sum also holds the steps after the divergence, up to the check
        m["train_loss"] = diverging_epoch_loss(monitor.losses[step - epoch_steps:])
    final = monitor.diverged or step >= tr.total
    if tr.val is not None and not monitor.diverged and ((epoch + 1) % cfg.eval_every_epochs == 0 or final):
        vl, va = evaluate(tr.net, tr.val(), tr.augment, ctx, max(256, cfg.local_batch_size), cfg.channels_last,
                          tr.amp, step)
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
        ctx.print(progress_line(m, tr.n_epochs))
    ckpt_dir = None
    if cfg.checkpoint_every_epochs and not final and (epoch + 1) % cfg.checkpoint_every_epochs == 0 and ctx.rank == 0:
        ckpt_dir = save_checkpoint(tr)
    ctx.beat(step, "report" if ctx.world_size == 1 else "collective (the epoch report, a barrier of all ranks)")
    ctx.report(m, ckpt_dir)
    return dt


def diverging_epoch_loss(losses: list[float]) -> float:
    """The loss of the epoch a run diverged in: the mean of its finite step losses up to the divergence. The
    epoch's own sum also holds the steps after it until the check: inf or NaN (the epoch was left out of
    `loss/train`, whose chart then fell to the end and hid the spike `loss/train_step` shows), or finite but
    absurd (3e18 after a divergence at 164, which flattened the chart)."""
    seen = [v for v in losses if math.isfinite(v)]
    return sum(seen) / len(seen) if seen else math.nan


def progress_line(m: dict[str, Any], n_epochs: int) -> str:
    val = f" val_acc {m['val_acc']:.3f} val_loss {m['val_loss']:.3f}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']}/{n_epochs} step {m['step']} loss {m['train_loss']:.4f} acc {m['train_acc']:.3f}"
            f"{val} lr {m['lr']:.4g} {m['images_per_sec']:.0f} img/s [{m['status']}]")


