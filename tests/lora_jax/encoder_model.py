"""A small non-GPT-2 Flax model for testing the model-agnostic LoRA core.

Param tree: ``embed``, ``encoder.layers.{i}.{norm,query,key,value,out,ffn_in,ffn_out}``, ``head``.
It differs from GPT-2 on purpose: separate q/k/v projections, ``layers`` instead of ``h``,
an untied ``head`` Dense outside any layer, and an optional ``nn.remat`` over each layer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class EncoderLayer(nn.Module):
    width: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h = nn.LayerNorm(name="norm", dtype=self.dtype)(x)
        q, k, v = (nn.Dense(d, name=n, dtype=self.dtype)(h).reshape(b, t, self.heads, -1) for n in ("query", "key", "value"))
        attn = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d)  # (B, T, D)
        x = x + nn.Dense(d, name="out", dtype=self.dtype)(attn)
        ffn = nn.Dense(2 * d, name="ffn_in", dtype=self.dtype)(x)
        return x + nn.Dense(d, name="ffn_out", dtype=self.dtype)(nn.gelu(ffn))


class LayerStack(nn.Module):
    width: int
    heads: int
    depth: int
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(self.depth):
            x = layer_cls(self.width, self.heads, self.dtype, name=str(i))(x)
        return x


class Stack(nn.Module):
    width: int
    heads: int
    depth: int
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return LayerStack(self.width, self.heads, self.depth, self.remat, self.dtype, name="layers")(x)


class Encoder(nn.Module):
    """Token ids (B, T) -> class scores (B, T, n_out)."""

    vocab: int = 13
    width: int = 16
    heads: int = 2
    depth: int = 2
    n_out: int = 5
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed", dtype=self.dtype)(ids)
        x = Stack(self.width, self.heads, self.depth, self.remat, self.dtype, name="encoder")(x)
        return nn.Dense(self.n_out, name="head", dtype=self.dtype)(x).astype(jnp.float32)


def init_encoder(model: Encoder, seed: int = 0):
    """Random params, biases and LayerNorms included, so a dropped bias would change outputs.

    Drawn with numpy over ``jax.eval_shape``: no Flax init is compiled, which keeps tests fast.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = path[-1].key
        if name == "kernel":
            values = rng.normal(0.0, 1.0 / np.sqrt(shape.shape[0]), shape.shape)  # keeps activations O(1)
        elif name == "scale":
            values = 1.0 + 0.1 * rng.normal(size=shape.shape)
        elif name == "bias":
            values = 0.05 * rng.normal(size=shape.shape)
        else:
            values = rng.normal(size=shape.shape)
        return jnp.asarray(values, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_ids(seed: int, batch: int = 2, length: int = 6, vocab: int = 13):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def with_random_b(lora, seed: int = 7, scale: float = 0.1):
    """The same LoRA tree with non-zero ``lora_B`` (with B = 0 every LoRA check passes trivially)."""
    rng = np.random.default_rng(seed)

    def randomise(path, leaf):
        if path[-1].key != "lora_B":
            return leaf
        return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(randomise, lora)
