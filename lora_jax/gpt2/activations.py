"""GPT-2's activation functions: transformers' ``ACT2FN`` names, as JAX functions.

``ACTIVATIONS`` maps each name a ``GPT2Config.activation_function`` can carry to the same
function in JAX (transformers/activations.py). ``prelu`` has a learned slope, so the MLP builds a
``PReLU`` module for it. Names in ``UNSUPPORTED_ACTIVATIONS`` are refused with the reason.

Example:
    >>> import jax.numpy as jnp
    >>> [round(float(ACTIVATIONS[name](jnp.float32(1.0))), 4) for name in ("gelu_new", "gelu", "relu")]
    [0.8412, 0.8413, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

def _gelu_tanh(x: jax.Array) -> jax.Array:
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), OpenAI GPT-2's "gelu_new".
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x: jax.Array) -> jax.Array:
    # The exact GELU, x Phi(x); differs from the tanh form by up to ~5e-4, far above 1e-5.
    return jax.nn.gelu(x, approximate=False)


def _gelu_fast(x: jax.Array) -> jax.Array:
    # transformers' FastGELUActivation: the tanh form with its own rounded constant.
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _laplace(x: jax.Array) -> jax.Array:
    # transformers' LaplaceActivation with its default mu and sigma.
    return 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0))))


# transformers' ACT2FN name -> the same function in JAX (transformers/activations.py).
# "prelu" is absent: it has a learned slope, so the MLP builds a ``PReLU`` module for it.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),  # torch's default slope
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "hardswish": jax.nn.hard_swish,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "laplace": _laplace,
    "linear": lambda x: x,
}
LEARNED_ACTIVATIONS = ("prelu",)
# In ACT2FN but not here, with the reason given in the error.
UNSUPPORTED_ACTIVATIONS = {
    "xielu": "its learned parameters are stored and applied in bfloat16 inside a float32 model",
}


class PReLU(nn.Module):
    """torch's ``nn.PReLU()``: ``x`` where ``x >= 0``, else ``weight * x``, one learned slope."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.constant(0.25), (1,), self.param_dtype)  # torch's init
        return jnp.where(x >= 0, x, weight.astype(self.dtype) * x)
