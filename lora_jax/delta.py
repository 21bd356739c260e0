"""The change LoRA makes to a kernel, ``s A B``, computed once for merging and for DoRA's norm.

>>> import numpy as np
>>> lora_delta(np.ones((2, 1)), np.full((1, 3), 0.5), 2.0).tolist()
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_delta(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``scaling * A @ B`` in float32 at full matmul precision, shape (in, out)."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return scaling * jnp.matmul(a32, b32, precision=jax.lax.Precision.HIGHEST)
