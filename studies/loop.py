# The per-worker training loop. Plain PyTorch (+ torch.distributed when world_size > 1): no Ray here,
# so it runs in-process, under a Tune trial, or on every Ray Train worker, and is unit-tested on CPU.
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nfnet
import storage
from studies.config import TrainConfig

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
    # Streaming under Ray Train: (n_train_rows) -> loader over this worker's get_dataset_shard("train").
    train_loader: Callable[[int], Any] | None = None
    print: Callable[[str], None] = print


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


def param_groups(model: torch.nn.Module, weight_decay: float):
    # No weight decay on gains, biases and skip gains (NFNet recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("gain") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, t)))


def _grad_sq(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


def _all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
        t = t / world_size
    return t


def _seed_for(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (1 << 63)
    return h


@torch.no_grad()
def evaluate(model, images, labels, augment, ctx: WorkerContext, batch: int, channels_last: bool, amp):
    # Each rank takes a strided slice of the validation set; sums are all-reduced.
    model.eval()
    xs, ys = images[ctx.rank :: ctx.world_size], labels[ctx.rank :: ctx.world_size]
    totals = torch.zeros(3, device=ctx.device, dtype=torch.float64)
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


def train(cfg: TrainConfig, dataset_uri: str, ctx: WorkerContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = ctx.device
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts it anyway)
    data = storage.open_dataset(dataset_uri)
    man = data.manifest
    num_classes = man.num_classes

    model = nfnet.create_model(cfg.model, num_classes=num_classes, **cfg.model_overrides).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    agc_params = nfnet.agc_parameters(model) if cfg.clipping == "agc" else None
    all_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )
    net = model
    if ctx.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if man.image_shape is None and cfg.image_size is None:
        raise ValueError(f"{dataset_uri} holds images of varying size; set image_size (--image-size) to train")
    if ctx.train_loader is not None:
        loader = ctx.train_loader(man.splits["train"])
    else:
        loader = storage.make_loader(
            data, "train", batch_size=cfg.batch_size, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
            device=device, mode=cfg.loader, image_size=cfg.image_size,
        )
    # image_size None: pad-and-crop at the native (CIFAR-size) resolution; else random-resized crops to it.
    augment = nfnet.Augment(cfg.augment_strength, num_classes, image_size=cfg.image_size).to(device)
    val_x, val_y = data.load_split("val", image_size=cfg.image_size)
    val_x, val_y = val_x.to(device), val_y.to(device)

    steps_per_epoch = loader.steps_per_epoch
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(total / steps_per_epoch)
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    use_amp = cfg.precision == "bf16"

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    gns = GradNoiseScale()
    state = {"epoch": 0, "step": 0, "initial_loss": None, "history": [], "best_val_acc": float("nan"),
             "best_val_loss": float("nan"), "status": "running", "diverged_step": None, "diverged_reason": None}
    if ctx.resume_from:
        ck = torch.load(Path(ctx.resume_from) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gns.load_state_dict(ck["gns"])
        state.update(ck["state"])
        ctx.print(f"resumed from epoch {state['epoch']} (step {state['step']})")

    step = state["step"]
    b_local = cfg.local_batch_size
    metrics: dict[str, Any] = {}
    train_time = 0.0
    for epoch in range(state["epoch"], n_epochs):
        # Every random stream is re-seeded from (seed, epoch, rank): a run resumed at an epoch boundary
        # continues exactly as the uninterrupted one.
        torch.manual_seed(_seed_for(cfg.seed, epoch, ctx.rank))
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, epoch, ctx.rank, 1))  # CPU: drives augmentation
        pending_loss, pending_small, pending_big = [], [], []
        correct = torch.zeros((), device=device)
        seen = 0
        loss_sum = torch.zeros((), device=device)
        last = {}
        t_epoch = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        for xb, yb in loader.epoch(epoch):
            if step >= total:
                break
            if cfg.crash_at_step is not None and step == cfg.crash_at_step and cfg.crash_marker:
                if not os.path.exists(cfg.crash_marker):
                    Path(cfg.crash_marker).write_text(str(step))
                    os._exit(1)  # a killed worker, as far as Ray can tell
            lr = lr_at(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y_soft = augment(xb, yb, generator=gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            measure_gns = cfg.gns_every_steps and step % cfg.gns_every_steps == 0 and b_local >= 2
            if measure_gns:
                # Two half micro-batches: the first half's local gradient is the small-batch estimate,
                # the accumulated all-reduced gradient the big one.
                h = b_local // 2
                ctxm = net.no_sync() if ctx.world_size > 1 else contextlib.nullcontext()
                with ctxm:
                    with amp():
                        out1 = net(x[:h])
                        l1 = F.cross_entropy(out1.float(), y_soft[:h], label_smoothing=cfg.label_smoothing)
                    (l1 * h / b_local).backward()
                g_small = _grad_sq(all_params) * (b_local / h) ** 2
                with amp():
                    out2 = net(x[h:])
                    l2 = F.cross_entropy(out2.float(), y_soft[h:], label_smoothing=cfg.label_smoothing)
                ((l2 * (b_local - h)) / b_local).backward()
                loss = (l1.detach() * h + l2.detach() * (b_local - h)) / b_local
                logits = torch.cat([out1.detach(), out2.detach()])
                pending_small.append(g_small)
                pending_big.append(_grad_sq(all_params))
            else:
                with amp():
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=cfg.label_smoothing)
                loss.backward()
                loss = loss.detach()
            log_now = (step + 1) % cfg.log_every_steps == 0 or step + 1 == total
            # AGC after backward (so after DDP's all-reduce) and before the optimizer step.
            if cfg.clipping == "agc":
                stats = nfnet.adaptive_grad_clip_(agc_params, cfg.clip_threshold)
                if log_now:
                    last["grad_norm_before"] = stats.grad_norm_before
                    last["grad_norm_after"] = stats.grad_norm_after
                    last["agc_clipped_frac"] = stats.fraction_clipped()
                    last.update({f"agc_clipped_frac.{k}": v for k, v in stats.per_stage().items()})
            elif cfg.clipping == "norm":
                gn = torch.nn.utils.clip_grad_norm_(all_params, cfg.clip_threshold)
                if log_now:
                    last["grad_norm_before"] = gn
                    last["grad_norm_after"] = gn.clamp(max=cfg.clip_threshold)
            elif log_now:
                gn = _grad_sq(all_params).sqrt()
                last["grad_norm_before"] = last["grad_norm_after"] = gn
            opt.step()
            pending_loss.append(loss)
            loss_sum += loss
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            step += 1

            if log_now:
                # One host sync per log_every_steps: divergence check on the all-reduced losses.
                losses = _all_reduce_mean(torch.stack(pending_loss).float(), ctx.world_size).tolist()
                if pending_small:
                    s = _all_reduce_mean(torch.stack(pending_small), ctx.world_size).tolist()
                    b = torch.stack(pending_big).tolist()
                    for gs, gb in zip(s, b):
                        gns.update(gs, b_local // 2, gb, cfg.batch_size)
                first = step - len(losses)
                if state["initial_loss"] is None:
                    state["initial_loss"] = losses[0]
                for i, lv in enumerate(losses):
                    if not math.isfinite(lv):
                        state.update(status="diverged", diverged_step=first + i, diverged_reason="non-finite loss")
                        break
                    if lv > cfg.divergence_factor * state["initial_loss"]:
                        state.update(status="diverged", diverged_step=first + i,
                                     diverged_reason=f"loss {lv:.3g} > {cfg.divergence_factor}x initial "
                                                     f"{state['initial_loss']:.3g}")
                        break
                pending_loss, pending_small, pending_big = [], [], []
                if ctx.rank == 0:
                    sm = {"train_loss_step": losses[-1], "lr": lr, "gns": gns.value}
                    sm.update({k: float(v) for k, v in last.items()})
                    ctx.log_step({k: v for k, v in sm.items() if math.isfinite(v)}, step)
                if state["status"] == "diverged":
                    break

        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t_epoch
        train_time += dt
        epoch_steps = seen // max(1, b_local)
        totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)])
        tl, tc, ts = _all_reduce_mean(totals, ctx.world_size).tolist()
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_at(max(0, step - 1), total, warmup, cfg.lr),
            "train_loss": tl / max(1, epoch_steps),
            "train_acc": tc / max(1.0, ts),
            "images_per_sec": seen * ctx.world_size / dt if dt > 0 else float("nan"),
            "step_time_ms": 1000 * dt / max(1, epoch_steps),
            "gns": gns.value,
        }
        metrics.update({k: float(v) for k, v in last.items()})
        diverged = state["status"] == "diverged"
        final = diverged or step >= total
        if not diverged and ((epoch + 1) % cfg.eval_every_epochs == 0 or final):
            vl, va = evaluate(net, val_x, val_y, augment, ctx, max(256, b_local), cfg.channels_last, amp)
            metrics.update(val_loss=vl, val_acc=va)
            if not va <= state["best_val_acc"]:  # nan-safe max
                state["best_val_acc"] = va
            if not vl >= state["best_val_loss"]:
                state["best_val_loss"] = vl
        if final:
            state["status"] = state["status"] if diverged else "completed"
        state["epoch"] = epoch + 1
        state["step"] = step
        if not math.isnan(state["best_val_acc"]):
            metrics["best_val_acc"] = state["best_val_acc"]
        metrics.update(status=state["status"], diverged_step=state["diverged_step"])
        state["history"].append({k: v for k, v in metrics.items() if k not in ("status", "diverged_step")})
        if ctx.rank == 0:
            ctx.print(_progress_line(metrics, n_epochs))

        ckpt_dir = None
        if cfg.checkpoint_every_epochs and not final and (epoch + 1) % cfg.checkpoint_every_epochs == 0:
            ckpt_dir = _save_checkpoint(model, opt, gns, state) if ctx.rank == 0 else None
        ctx.report(metrics, ckpt_dir)
        if final:
            break

    hist = state["history"]
    last_val = next((h for h in reversed(hist) if "val_acc" in h), {})
    return {
        "status": state["status"],
        "diverged_step": state["diverged_step"],
        "diverged_reason": state["diverged_reason"],
        "final_val_acc": last_val.get("val_acc"),
        "final_val_loss": last_val.get("val_loss"),
        "best_val_acc": None if math.isnan(state["best_val_acc"]) else state["best_val_acc"],
        "best_val_loss": None if math.isnan(state["best_val_loss"]) else state["best_val_loss"],
        "final_train_loss": hist[-1]["train_loss"] if hist else None,
        "steps": step,
        "epochs": state["epoch"],
        "images_per_sec": (sum(h["images_per_sec"] for h in hist) / len(hist)) if hist else None,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "gns": gns.value if gns.n else None,
        "history": hist,
    }


def _progress_line(m: dict[str, Any], n_epochs: int) -> str:
    val = f" val_acc {m['val_acc']:.3f} val_loss {m['val_loss']:.3f}" if "val_acc" in m else ""
    return (
        f"epoch {m['epoch']}/{n_epochs} step {m['step']} loss {m['train_loss']:.4f} acc {m['train_acc']:.3f}"
        f"{val} lr {m['lr']:.4g} {m['images_per_sec']:.0f} img/s [{m['status']}]"
    )


def _save_checkpoint(model, opt, gns, state) -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="nfnet-ckpt-")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "gns": gns.state_dict(), "state": state},
        Path(d) / CHECKPOINT_FILE,
    )
    return d

