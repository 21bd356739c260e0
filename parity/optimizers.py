"""One AdamW recipe, built twice: ``torch.optim.AdamW`` and ``optax.adamw``.

Both decay decoupled by ``lr * weight_decay`` and divide by ``sqrt(v_hat) + eps`` (eps
*outside* the square root; optax's ``eps_root`` stays 0). Clipping is by global norm in
both (torch ``clip_grad_norm_`` divides by ``norm + 1e-6``, optax by ``norm``; the
difference is 1e-6 relative to the norm, far inside the training tolerance). The learning
rate schedule is one optax schedule, read by the torch loop step by step, so both sides
see the very same float per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The shared AdamW recipe of the training check.

    Attributes:
        steps: Number of optimizer steps (>= 1).
        lr: Peak learning rate.
        warmup_steps: Linear warmup from ``lr / 10`` to ``lr``, then cosine decay to 0 at ``steps``.
        b1: Adam beta1.
        b2: Adam beta2.
        eps: Adam epsilon, added to ``sqrt(v_hat)``.
        weight_decay: Decoupled weight decay (multiplied by the current lr).
        max_grad_norm: Global-norm clipping threshold.
        loraplus_ratio: LoRA+: B's learning rate is ``ratio`` times A's (None: one learning rate for all).

    >>> TrainSettings(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: TrainSettings.steps must be an int >= 1, got 0; the training check needs at least one step (10 recommended).
    """

    steps: int = 10
    lr: float = 1e-2
    warmup_steps: int = 2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    loraplus_ratio: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"TrainSettings.steps must be an int >= 1, got {self.steps!r}; the training check "
                             "needs at least one step (10 recommended).")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainSettings.warmup_steps must be in [0, steps), got {self.warmup_steps!r} "
                             f"with steps={self.steps}.")
        for name in ("lr", "eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainSettings.{name} must be > 0, got {getattr(self, name)!r}.")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.weight_decay >= 0):
            raise ValueError("TrainSettings needs 0 <= b1, b2 < 1 and weight_decay >= 0, got "
                             f"b1={self.b1}, b2={self.b2}, weight_decay={self.weight_decay}.")
        check_loraplus_ratio(self.loraplus_ratio)


def check_loraplus_ratio(ratio: float | None) -> None:
    """Raises unless ``ratio`` is None or a finite number > 0.

    >>> check_loraplus_ratio(16.0)
    >>> check_loraplus_ratio(0.0)
    Traceback (most recent call last):
    ...
    ValueError: loraplus_ratio must be a finite number > 0 (lr_B / lr_A; the LoRA+ paper suggests 16), got 0.0.
    """
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"loraplus_ratio must be a finite number > 0 (lr_B / lr_A; the LoRA+ paper suggests 16), "
                         f"got {ratio!r}.")


def lr_schedule(settings: TrainSettings, peak: float | None = None) -> Callable:
    """Warmup then cosine decay, as an optax schedule ``step -> lr``, peaking at ``peak`` (default ``settings.lr``).

    Warmup starts at ``peak / 10``, not 0, so that the first step already moves A and B.

    >>> s = lr_schedule(TrainSettings(steps=10, lr=1.0, warmup_steps=2))
    >>> [round(float(s(i)), 3) for i in (0, 1, 2, 10)]
    [0.1, 0.55, 1.0, 0.0]
    """
    import optax

    peak = settings.lr if peak is None else peak
    return optax.warmup_cosine_decay_schedule(peak / 10, peak, settings.warmup_steps, settings.steps)


def optax_adamw(settings: TrainSettings):
    """Global-norm clipping, then ``optax.adamw`` on the schedule (eps outside the root).

    With ``loraplus_ratio``, the AdamW is ``lora_jax.loraplus_optimizer``'s: B's schedule peaks at ``lr * ratio``.
    """
    import optax

    def adamw(peak: float):
        return optax.adamw(lr_schedule(settings, peak), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                           eps_root=0.0, weight_decay=settings.weight_decay)

    if settings.loraplus_ratio is None:
        inner = adamw(settings.lr)
    else:
        from lora_jax import loraplus_optimizer

        inner = loraplus_optimizer(adamw, settings.lr, ratio=settings.loraplus_ratio)
    return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), inner)


def torch_adamw(model: Any, settings: TrainSettings):
    """``torch.optim.AdamW`` over the model's LoRA parameters, same betas, eps and decay; the loop sets lr per step.

    With ``loraplus_ratio`` the groups are ``lora_torch.create_loraplus_param_groups``' (B at ``lr * ratio``).
    ``foreach=False`` keeps the plain per-tensor kernels so the arithmetic order is the
    textbook one on every device.
    """
    import torch
    from lora_torch import create_loraplus_param_groups, lora_parameters

    if settings.loraplus_ratio is None:
        groups = [{"params": [param for _, param in lora_parameters(model)]}]
    else:
        groups = create_loraplus_param_groups(model, settings.lr, settings.loraplus_ratio,
                                              weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.b1, settings.b2), eps=settings.eps,
                             weight_decay=settings.weight_decay, foreach=False)


def lr_factors(optimizer: Any, settings: TrainSettings) -> list[float]:
    """Each param group's learning rate over ``settings.lr`` as built (LoRA+: 1 for A, ``ratio`` for B).

    A torch loop sets ``group["lr"] = schedule(step) * factor``, so every group follows the shared
    schedule at its own scale, as optax's partition does.

    >>> import types
    >>> lr_factors(types.SimpleNamespace(param_groups=[{"lr": 1e-3}, {"lr": 1.6e-2}]), TrainSettings(lr=1e-3))
    [1.0, 16.0]
    """
    return [group["lr"] / settings.lr for group in optimizer.param_groups]
