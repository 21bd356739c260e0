"""One AdamW recipe, built twice: ``torch.optim.AdamW`` and ``optax.adamw``.

Both decay decoupled by ``lr * weight_decay`` and divide by ``sqrt(v_hat) + eps`` (eps
*outside* the square root; optax's ``eps_root`` stays 0). Clipping is by global norm in
both (torch ``clip_grad_norm_`` divides by ``norm + 1e-6``, optax by ``norm``; the
difference is 1e-6 relative to the norm, far inside the training tolerance). The learning
rate schedule is one optax schedule, read by the torch loop step by step, so both sides
see the very same float per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


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


def lr_schedule(settings: TrainSettings) -> Callable:
    """Warmup then cosine decay, as an optax schedule ``step -> lr``.

    Warmup starts at ``lr / 10``, not 0, so that the first step already moves A and B.

    >>> s = lr_schedule(TrainSettings(steps=10, lr=1.0, warmup_steps=2))
    >>> [round(float(s(i)), 3) for i in (0, 1, 2, 10)]
    [0.1, 0.55, 1.0, 0.0]
    """
    import optax

    return optax.warmup_cosine_decay_schedule(settings.lr / 10, settings.lr, settings.warmup_steps, settings.steps)


def optax_adamw(settings: TrainSettings):
    """Global-norm clipping, then ``optax.adamw`` on the schedule (eps outside the root)."""
    import optax

    return optax.chain(
        optax.clip_by_global_norm(settings.max_grad_norm),
        optax.adamw(lr_schedule(settings), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                    eps_root=0.0, weight_decay=settings.weight_decay),
    )


def torch_adamw(params: Iterable, settings: TrainSettings):
    """``torch.optim.AdamW`` with the same betas, eps and decay; the loop sets lr per step.

    ``foreach=False`` keeps the plain per-tensor kernels so the arithmetic order is the
    textbook one on every device.
    """
    import torch

    return torch.optim.AdamW(list(params), lr=settings.lr, betas=(settings.b1, settings.b2), eps=settings.eps,
                             weight_decay=settings.weight_decay, foreach=False)
