"""SGD with (Nesterov) momentum and per-group weight decay: the NFNet recipe's optimizer, as lean multi-tensor
updates on the CPU.

It computes what `torch.optim.SGD(..., foreach=True)` computes, op for op (the same `torch._foreach_*` calls in
the same order, so the same bits: tests/test_nfnet_optim.py), without that class's per-step machinery. Why:
- the start: `torch.optim.Optimizer` imports `torch._dynamo` on first use (its methods are wrapped to be skipped
  by the compiler), ~1.2-1.9 s of CPU in every process that trains: each Tune trial's process, each test
  process;
- the step: on the laptop study's model (NF-ResNet width 8, one CPU thread) `torch.optim.SGD.step` took 0.20 ms
  and this one 0.14 ms (its hooks, profiler scopes and regrouping of tensors by device and dtype at every step are
  not here), of an ~11-13 ms step at batch 64: within the noise of a whole training run.
Its state_dict is `torch.optim.SGD`'s (momentum buffers by parameter index, the groups' settings), so a
checkpoint of either loads into the other. On CUDA the training loop keeps torch's fused SGD (one kernel)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_DEFAULTS = {"dampening": 0, "maximize": False, "foreach": True, "differentiable": False, "fused": None}


class SGD:
    """`param_groups` as torch's optimizers take them (dicts with "params" and, optionally, their own
    "weight_decay"); `param_groups[i]["lr"]` may be set between steps (the schedule does)."""

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            params = list(g["params"])
            if any(p.is_sparse for p in params):
                raise ValueError("sparse parameters are not supported")
            self.param_groups.append({"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                      "nesterov": nesterov, **_DEFAULTS,
                                      **{k: v for k, v in g.items() if k != "params"}, "params": params})
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, momentum, lr = g["weight_decay"], g["momentum"], g["lr"]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if momentum != 0:
                bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
                if all(b is not None for b in bufs):
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads, alpha=1 - g["dampening"])
                else:  # the first step: each buffer starts as its gradient
                    for i, (p, gr) in enumerate(zip(params, grads)):
                        if bufs[i] is None:
                            bufs[i] = gr.detach().clone()
                        else:
                            bufs[i].mul_(momentum).add_(gr, alpha=1 - g["dampening"])
                        self.state.setdefault(p, {})["momentum_buffer"] = bufs[i]
                if g["nesterov"]:
                    torch._foreach_add_(grads, bufs, alpha=momentum)
                else:
                    grads = bufs
            torch._foreach_add_(params, grads, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters by their index over all groups."""
        index, groups, state = {}, [], {}
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                ids.append(index.setdefault(id(p), len(index)))
                if p in self.state:
                    state[index[id(p)]] = dict(self.state[p])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the optimizer state's parameter groups do not match this model's")
        by_index = {}
        for mine, theirs in zip(self.param_groups, saved):
            by_index.update(zip(theirs["params"], mine["params"]))
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: (v.to(device=p.device, dtype=p.dtype) if torch.is_tensor(v) else v)
                             for k, v in s.items()}
