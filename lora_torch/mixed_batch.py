"""Mixed batches: example ``i`` runs through adapter ``names[i]``, or through none (``"__base__"``).

PEFT 0.21 calls this ``adapter_names=`` (``LoraLayer._mixed_batch_forward``). Each adapter runs on its
own sub-batch only, never on the whole batch: the rows of one adapter are gathered with
``index_select``, sent through that adapter's branch, and added back with ``index_add``. The base
layer runs once on the whole batch. Both are differentiable, so in training each adapter's
gradient comes from its own examples and no other.

A name a layer does not hold adds nothing there (an adapter may target other modules), as in PEFT;
``lora_torch.adapters.adapter_names`` checks that every name exists somewhere in the model.

>>> routing = BatchRouting(("a", "__base__", "a"))
>>> [(name, rows.tolist()) for name, rows in routing.groups(torch.device("cpu"))]
[('a', [0, 2]), ('__base__', [1])]
>>> x, result = torch.arange(3.0).reshape(3, 1), torch.zeros(3, 1)
>>> route(result, x, routing, lambda name, sub: 10 * sub).flatten().tolist()  # row 1 gets nothing
[0.0, 0.0, 20.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BASE_ADAPTER", "BatchRouting", "check_batch_names", "route"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def check_batch_names(names: object) -> tuple[str, ...]:
    """``names`` as a tuple of str, after checking it is a list (or tuple) of non-empty strings.

    >>> check_batch_names(["a", "__base__"])
    ('a', '__base__')
    >>> check_batch_names("a")
    Traceback (most recent call last):
    ...
    TypeError: adapter_names must be a list with one adapter name per example ("__base__" for none), got the str 'a'.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f'adapter_names must be a list with one adapter name per example ("__base__" for none), '
                        f"got the {type(names).__name__} {names!r}.")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise TypeError(f"every entry of adapter_names must be an adapter name (a non-empty str), got {bad[:3]!r}.")
    if not names:
        raise ValueError('adapter_names is empty; give one adapter name per example ("__base__" for none).')
    return tuple(names)


@dataclass(frozen=True)
class BatchRouting:
    """The examples of each adapter name in a batch: ``names[i]`` is example ``i``'s adapter.

    The row index tensors are built once per device and reused by every layer of the forward pass.
    """

    names: tuple[str, ...]
    _rows: dict[torch.device, list[tuple[str, torch.Tensor]]] = field(default_factory=dict, repr=False,
                                                                       compare=False)

    def check_batch(self, batch_size: int) -> None:
        """Raises a ValueError unless there is exactly one name per example."""
        if batch_size != len(self.names):
            raise ValueError(f"adapter_names has {len(self.names)} names for a batch of {batch_size} examples; give "
                             'exactly one adapter name per example (in batch order, "__base__" for none).')

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``[(name, rows)]`` in order of first appearance; ``rows`` is an int64 tensor on ``device``."""
        if device not in self._rows:
            rows: dict[str, list[int]] = {}
            for index, name in enumerate(self.names):
                rows.setdefault(name, []).append(index)
            self._rows[device] = [(name, torch.tensor(r, dtype=torch.long, device=device)) for name, r in rows.items()]
        return self._rows[device]


def route(result: torch.Tensor, x: torch.Tensor, routing: BatchRouting,
          adapter_output: Callable[[str, torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """Adds ``adapter_output(name, x[rows])`` to ``result[rows]`` for each adapter's rows; returns the sum.

    Args:
        result: the base layer's output for the whole batch, (batch, ...).
        x: the layer's input for the whole batch, (batch, ...).
        routing: which rows use which adapter.
        adapter_output: the branch output of adapter ``name`` on its sub-batch, or None where this layer
            does not hold ``name``. Never called for ``"__base__"``.
    """
    routing.check_batch(x.shape[0])
    for name, rows in routing.groups(x.device):
        if name == BASE_ADAPTER:
            continue
        output = adapter_output(name, x.index_select(0, rows))
        if output is not None:
            result = result.index_add(0, rows, output.to(result.dtype))  # out of place: autograd sees both terms
    return result
