"""Adam with per-task state, so a task that sits out a step does not move.

`torch.optim.Adam` would still move a task whose gradient is zero (its momentum carries on) and
would count the step in its bias correction; both break "T tasks together == each alone". Here
dimension 0 of every parameter is the task, each task keeps its own step count, and only the
tasks marked active are updated. The update is torch's Adam (no weight decay, no amsgrad):
`p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TaskAdam:
    def __init__(
        self,
        params: Sequence[nn.Parameter],
        num_tasks: int,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        for p in params:
            if p.size(0) != num_tasks:
                raise ValueError(f"parameter of shape {tuple(p.shape)} has no task dimension of {num_tasks}")
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = torch.zeros(num_tasks, dtype=torch.float64)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update the tasks where `active` ([T] bool) is set; the others keep params and state."""
        tasks = active.nonzero().squeeze(1)
        if tasks.numel() == 0:
            return
        beta1, beta2 = self.betas
        self.steps[tasks] += 1
        t = self.steps[tasks]
        step_size = self.lr / (1 - beta1**t)  # [k], float64 like torch's python-float math
        bias_correction2_sqrt = (1 - beta2**t).sqrt()
        every = tasks.numel() == self.steps.numel()
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            scale = step_size.to(p).view(shape)
            correction = bias_correction2_sqrt.to(p).view(shape)
            if every:  # the common step: the same arithmetic in place, without gathers and scatters
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                m = exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                v = exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.sub_((m / (v.sqrt() / correction).add_(self.eps)) * scale)
                continue
            index = tasks.to(p.device)
            grad = torch.zeros_like(p[index]) if p.grad is None else p.grad[index]
            m = exp_avg[index].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = exp_avg_sq[index].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg.index_copy_(0, index, m)
            exp_avg_sq.index_copy_(0, index, v)
            denom = (v.sqrt() / correction).add_(self.eps)
            # index_copy_ rather than index_add_: the latter is orders of magnitude slower on CPU.
            p.index_copy_(0, index, p[index] - (m / denom) * scale)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
