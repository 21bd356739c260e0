"""How a fresh LoRA branch is drawn: PEFT 0.21's ``init_lora_weights`` choices, in this package's layout.

PEFT (``peft/tuners/lora/layer.py``, ``reset_lora_parameters`` and ``Embedding.update_layer``) stores
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); here ``A`` is (in, r) and ``B`` (r, out), so
each distribution below is PEFT's, drawn on the transposed shape (element-wise draws, the same law).

Linear and Conv1D branches:

==============  ==========================================  =========================================
choice          A (in, r)                                    B (r, out)
==============  ==========================================  =========================================
``True``        U(-1/sqrt(in), 1/sqrt(in))                   0, so a fresh adapter is the identity
``"gaussian"``  N(0, (1/r)^2)                                0
``False``       U(-1/sqrt(in), 1/sqrt(in))                   U(-1/sqrt(r), 1/sqrt(r)): ``nn.Linear(r, out)``'s
                                                             default init, which PEFT leaves in place
==============  ==========================================  =========================================

``1/sqrt(in)`` is kaiming-uniform with ``a=sqrt(5)`` on PEFT's (r, in) weight, whose fan_in is ``in``.

Embedding branches (``A`` (num_embeddings, r), ``B`` (r, dim)): ``True`` and ``"gaussian"`` give A = 0
and B ~ N(0, 1); ``False`` gives both ~ N(0, 1) (PEFT's ``torch.randn``, left in place).

>>> import torch
>>> a, b = torch.empty(6, 2), torch.empty(2, 3)
>>> init_linear_branch(a, b, "gaussian")
>>> bool(b.eq(0).all()), check_init_lora_weights("Gaussian")
(True, 'gaussian')
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["INIT_CHOICES", "check_init_lora_weights", "init_embedding_branch", "init_linear_branch"]

INIT_CHOICES = (True, "gaussian", False)

InitLoraWeights = bool | str


def check_init_lora_weights(value: object) -> InitLoraWeights:
    """Returns ``value`` as one of ``INIT_CHOICES`` (``"gaussian"`` in any case, as PEFT compares it).

    Raises:
        ValueError: anything else, naming the choices.

    >>> check_init_lora_weights(False)
    False
    >>> check_init_lora_weights("pissa")
    Traceback (most recent call last):
    ...
    ValueError: init_lora_weights must be True, "gaussian" or False (PEFT's meanings; see lora_torch.initialize), got 'pissa'. PEFT's data-driven inits (pissa, olora, loftq, ...) are not implemented here.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() == "gaussian":
        return "gaussian"
    raise ValueError(f'init_lora_weights must be True, "gaussian" or False (PEFT\'s meanings; see '
                     f"lora_torch.initialize), got {value!r}. PEFT's data-driven inits (pissa, olora, loftq, ...) "
                     "are not implemented here.")


def _uniform_fan_in(tensor: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


def init_linear_branch(lora_a: torch.Tensor, lora_b: torch.Tensor, init_lora_weights: InitLoraWeights) -> None:
    """Draws ``A`` (in, r) and ``B`` (r, out) of a Linear/Conv1D branch in place (table in the module docstring)."""
    init = check_init_lora_weights(init_lora_weights)
    fan_in, rank = lora_a.shape
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(lora_a, std=1.0 / rank)
        else:
            _uniform_fan_in(lora_a, fan_in)
        if init is False:
            _uniform_fan_in(lora_b, rank)  # nn.Linear(r, out).weight: fan_in = r
        else:
            nn.init.zeros_(lora_b)



def init_embedding_branch(lora_a: torch.Tensor, lora_b: torch.Tensor, init_lora_weights: InitLoraWeights) -> None:
    """Draws ``A`` (num_embeddings, r) and ``B`` (r, dim) of an embedding branch in place (module docstring)."""
    init = check_init_lora_weights(init_lora_weights)
    with torch.no_grad():
        nn.init.normal_(lora_b)
        if init is False:
            nn.init.normal_(lora_a)
        else:
            nn.init.zeros_(lora_a)  # with B ~ N(0, 1): the fresh adapter is the identity
