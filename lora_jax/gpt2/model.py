"""GPT-2 in flax.linen, with Hugging Face's module names and an optional KV cache.

The parameter tree mirrors ``GPT2LMHeadModel`` (see ``docs/architecture.md``): a dotted
Flax module path such as ``transformer.h.0.attn.c_attn`` is the same string as the
PyTorch module name, and every projection is a ``flax.linen.Dense`` whose kernel is the HF
``Conv1D.weight`` as is, shape (in, out). LoRA relies on both facts: it intercepts
``nn.Dense.__call__`` by module path.

The model has no dropout. It always runs with eval semantics, which is what LoRA needs
from a frozen base; dropout on the LoRA branch lives in the LoRA transform.

Every ``transformers.GPT2Config`` option that changes the forward pass is implemented the way
``models/gpt2/modeling_gpt2.py`` implements it: ``n_inner``, ``activation_function`` (the
``ACTIVATIONS`` table), ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``,
``reorder_and_upcast_attn`` and ``layer_norm_epsilon``. ``docs/gpt2_flax.md`` has the table.

Example:
    >>> import jax, jax.numpy as jnp
    >>> config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    >>> params = init_gpt2_params(config, jax.random.key(0))
    >>> jax.jit(GPT2(config).apply)({"params": params}, jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 11)
"""

from __future__ import annotations

import dataclasses
import math
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_format.json_files import read_json_object
from lora_jax.gpt2.activations import ACTIVATIONS, LEARNED_ACTIVATIONS, UNSUPPORTED_ACTIVATIONS, PReLU
from lora_jax.gpt2.attention import causal_attention

Params = dict[str, Any]

# GPT-2's initialiser: normal(0.02) for embeddings and kernels.
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GPT2Config:
    """Shape of a GPT-2. Validated when built, so errors surface before any tracing.

    Attributes:
        vocab_size: Number of tokens (V).
        n_positions: Longest sequence the position table covers (P).
        n_embd: Model width (D).
        n_layer: Number of transformer blocks.
        n_head: Attention heads; must divide ``n_embd``.
        layer_norm_epsilon: LayerNorm epsilon.
        n_inner: Width of the MLP's hidden layer; ``None`` means ``4 * n_embd``.
        activation_function: The MLP's activation, a transformers ``ACT2FN`` name: a key of
            ``ACTIVATIONS``, or ``"prelu"`` (one learned slope per layer, ``mlp.act.weight``).
        scale_attn_weights: Divide attention scores by ``sqrt(head_dim)``.
        scale_attn_by_inverse_layer_idx: Also divide the scores of block ``i`` by ``i + 1``.
        reorder_and_upcast_attn: transformers' eager-attention flag that computes ``q k^T`` and
            the softmax in float32 under mixed precision. This model always does (see
            ``docs/gpt2_flax.md``), so the flag changes nothing here; it is kept so that
            ``save_gpt2`` writes it back.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}.")
        if self.n_inner is not None and (
            not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool) or self.n_inner < 1
        ):
            raise ValueError(f"GPT2Config.n_inner must be None (4 * n_embd) or a positive int, got {self.n_inner!r}.")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be True or False, got {getattr(self, name)!r}.")
        _check_activation(self.activation_function)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "pick a head count that divides the width."
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}.")

    @property
    def head_dim(self) -> int:
        """Size of one attention head (hs)."""
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP's hidden layer (I): ``n_inner``, or ``4 * n_embd`` when unset."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def attention_scale(self, layer_idx: int) -> float:
        """The factor block ``layer_idx`` multiplies ``q k^T`` by, computed as transformers does.

        Example:
            >>> GPT2Config(n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True).attention_scale(1)
            0.125
        """
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale

    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | PathLike) -> GPT2Config:
        """Builds a config from a HF ``config.json`` (a dict, the file, or its directory).

        Raises:
            ValueError: The config describes a GPT-2 variant this model does not implement.

        Example:
            >>> GPT2Config.from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 4}).head_dim
            16
        """
        hf = _read_hf_config(source)
        _reject_unsupported_variants(hf)
        fields = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
        return cls(**fields)


def _read_hf_config(source: dict[str, Any] | str | PathLike) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No GPT-2 config at {path}; expected a HF config.json.")
    return read_json_object(path)


def _check_activation(name: Any) -> None:
    if name in ACTIVATIONS or name in LEARNED_ACTIVATIONS:
        return
    if name in UNSUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"GPT2Config.activation_function {name!r} is not implemented in the Flax GPT-2: "
            f"{UNSUPPORTED_ACTIVATIONS[name]}. Use a checkpoint with another activation, "
            "or run it with transformers."
        )
    supported = ", ".join(sorted([*ACTIVATIONS, *LEARNED_ACTIVATIONS]))
    raise ValueError(f"GPT2Config.activation_function {name!r} is unknown; choose one of: {supported}.")


def _reject_unsupported_variants(hf: dict[str, Any]) -> None:
    """Refuses HF options that change the math and that this implementation does not have.

    Options that only matter for training (dropout), initialisation, other heads (``summary_*``),
    generation defaults or the choice of attention kernel are accepted and ignored.
    """
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(
            f"model_type is {hf['model_type']!r}: this is not a GPT-2 checkpoint; load it with its own model"
        )
    if hf.get("add_cross_attention", False):
        problems.append(
            "add_cross_attention is true: this Flax GPT-2 has no cross-attention layers "
            "(crossattention.*, ln_cross_attn.*); use a decoder-only checkpoint (add_cross_attention false) "
            "or run the encoder-decoder model with transformers"
        )
    if problems:
        raise ValueError("Unsupported GPT-2 config: " + "; ".join(problems) + ".")


def gpt2_small() -> GPT2Config:
    """GPT-2 124M: width 768, 12 layers, 12 heads."""
    return GPT2Config()


def gpt2_medium() -> GPT2Config:
    """GPT-2 355M: width 1024, 24 layers, 16 heads."""
    return GPT2Config(n_embd=1024, n_layer=24, n_head=16)


def gpt2_xl() -> GPT2Config:
    """GPT-2 1.5B: width 1600, 48 layers, 25 heads."""
    return GPT2Config(n_embd=1600, n_layer=48, n_head=25)


class KVCache(NamedTuple):
    """Keys and values of every layer for a fixed-size window, plus how much of it is filled.

    Attributes:
        keys: One (B, S, nh, hs) array per layer.
        values: One (B, S, nh, hs) array per layer.
        length: int32 scalar, the number of positions already written (also the next position).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array


def init_cache(config: GPT2Config, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache able to hold ``max_length`` positions.

    Example:
        >>> cache = init_cache(GPT2Config(n_embd=8, n_head=2, n_layer=3), 1, 5)
        >>> len(cache.keys), cache.keys[0].shape, int(cache.length)
        (3, (1, 5, 2, 4), 0)
    """
    if not 1 <= max_length <= config.n_positions:
        raise ValueError(
            f"max_length must be in [1, n_positions={config.n_positions}], got {max_length}; "
            "GPT-2 has no position embedding beyond n_positions."
        )
    shape = (batch_size, max_length, config.n_head, config.head_dim)  # (B, S, nh, hs)
    empty = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(keys=empty, values=empty, length=jnp.zeros((), jnp.int32))


def _residual_std(config: GPT2Config) -> float:
    # GPT-2 scales the projections that write into the residual stream by depth, so the
    # stream's variance stays put as 2 * n_layer of them are summed.
    return _INIT_STD / math.sqrt(2 * config.n_layer)


def _dense(features: int, name: str, dtype: Any, param_dtype: Any, std: float) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``c_attn`` packs q, k, v along its output axis.

    Both paths form ``q k^T`` with float32 accumulation and output and take the softmax in float32,
    whatever the compute dtype: the "upcast" of transformers' ``reorder_and_upcast_attn``, always on.
    Without a cache (training, scoring) it is ``lora_jax.gpt2.attention.causal_attention``, whose
    backward pass is written for speed; with a cache (generation) ``jax.nn.dot_product_attention``
    with a position mask.
    """

    config: GPT2Config
    layer_idx: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None, start: jax.Array | None):
        cfg = self.config
        d = x.shape[-1]
        scale = cfg.attention_scale(self.layer_idx)
        qkv = _dense(3 * d, "c_attn", self.dtype, self.param_dtype, _INIT_STD)(x)  # (B, T, 3D)
        if layer_cache is None:
            y, new_layer_cache = causal_attention(qkv, cfg.n_head, scale), None  # (B, T, D)
        else:
            y, new_layer_cache = _cached_attention(qkv, cfg, scale, layer_cache, start)
        return _dense(d, "c_proj", self.dtype, self.param_dtype, _residual_std(cfg))(y), new_layer_cache


def _cached_attention(qkv: jax.Array, cfg: GPT2Config, scale: float, layer_cache: tuple[jax.Array, jax.Array],
                      start: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of the new positions over the cache with their keys and values written in at ``start``."""
    b, t, three_d = qkv.shape
    q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))  # (B, T, nh, hs)
    k_all, v_all = (
        jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0, 0))
        for buf, new in zip(layer_cache, (k, v))
    )  # (B, S, nh, hs)
    # Query i sits at position start + i and may see every cached position up to itself.
    q_pos = start + jnp.arange(t)  # (T,)
    kv_pos = jnp.arange(k_all.shape[1])  # (S,)
    mask = (kv_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    y = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), scale=scale, mask=mask)
    return y.reshape(b, t, three_d // 3), (k_all, v_all)  # (B, T, D)


class MLP(nn.Module):
    """Position-wise feed-forward: D -> I -> activation -> D (I = ``config.inner_dim``)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.inner_dim, "c_fc", self.dtype, self.param_dtype, _INIT_STD)(x)  # (B, T, I)
        if cfg.activation_function == "prelu":
            h = PReLU(self.dtype, self.param_dtype, name="act")(h)  # HF's path: mlp.act.weight
        else:
            h = ACTIVATIONS[cfg.activation_function](h)
        return _dense(cfg.n_embd, "c_proj", self.dtype, self.param_dtype, _residual_std(cfg))(h)  # (B, T, D)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None, start: jax.Array | None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln_kw = dict(epsilon=self.config.layer_norm_epsilon, **kw)
        a, new_layer_cache = CausalSelfAttention(self.config, self.layer_idx, name="attn", **kw)(
            nn.LayerNorm(name="ln_1", **ln_kw)(x), layer_cache, start
        )
        x = x + a
        x = x + MLP(self.config, name="mlp", **kw)(nn.LayerNorm(name="ln_2", **ln_kw)(x))
        return x, new_layer_cache


class BlockStack(nn.Module):
    """The ``h`` list: blocks named "0".."n-1", as in HF's ``ModuleList``."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        block_cls = nn.remat(Block) if self.remat else Block
        start = None if cache is None else cache.length
        keys, values = [], []
        for i in range(self.config.n_layer):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            block = block_cls(self.config, self.dtype, self.param_dtype, layer_idx=i, name=str(i))
            x, new_layer_cache = block(x, layer_cache, start)
            if new_layer_cache is not None:
                keys.append(new_layer_cache[0])
                values.append(new_layer_cache[1])
        if cache is None:
            return x, None
        return x, KVCache(tuple(keys), tuple(values), cache.length + x.shape[1])


class GPT2Transformer(nn.Module):
    """HF's ``GPT2Model``: embeddings, blocks, final LayerNorm, and the tied output head."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed_init = nn.initializers.normal(_INIT_STD)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init, **kw)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=embed_init, **kw)
        self.h = BlockStack(cfg, remat=self.remat, **kw)
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, **kw)

    def __call__(self, input_ids: jax.Array, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        start = 0 if cache is None else cache.length
        positions = start + jnp.arange(input_ids.shape[1])  # (T,)
        x = self.wte(input_ids) + self.wpe(positions)[None]  # (B, T, D)
        x, new_cache = self.h(x, cache)
        return self.ln_f(x), new_cache  # (B, T, D)

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied head: ``h @ wte.embedding.T``, returned in float32."""
        return self.wte.attend(h).astype(jnp.float32)  # (B, T, V)


class GPT2(nn.Module):
    """GPT-2 language model (HF ``GPT2LMHeadModel``) without dropout.

    Attributes:
        config: Model shape.
        dtype: Compute dtype (e.g. ``jnp.bfloat16``); logits are always float32.
        param_dtype: Parameter dtype created by ``init``.
        remat: Recompute each block in the backward pass (``nn.remat``) to save memory.
            Parameter paths are unchanged.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        self.transformer = GPT2Transformer(self.config, self.dtype, self.param_dtype, self.remat)

    def __call__(self, input_ids: jax.Array, *, cache: KVCache | None = None):
        """Next-token logits.

        Args:
            input_ids: (B, T) integer token ids. With a cache they sit at positions
                ``cache.length .. cache.length + T - 1``; the caller must keep that below
                the cache size (``generate`` checks it before tracing).
            cache: Optional ``KVCache`` from ``init_cache`` or a previous call.

        Returns:
            float32 logits (B, T, V); with a cache, ``(logits, new_cache)``.
        """
        h, new_cache = self.transformer(self._checked(input_ids, cache), cache)
        logits = self.transformer.logits(h)
        return logits if cache is None else (logits, new_cache)

    def hidden(self, input_ids: jax.Array) -> jax.Array:
        """Final hidden states after ``ln_f``, (B, T, D) in the compute dtype.

        Lets a caller compute the loss against ``params["transformer"]["wte"]["embedding"]``
        in chunks instead of materialising (B, T, V) logits.
        """
        return self.transformer(self._checked(input_ids, None), None)[0]

    def _checked(self, input_ids: jax.Array, cache: KVCache | None) -> jax.Array:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be a (batch, time) integer array, got shape {input_ids.shape} "
                f"and dtype {input_ids.dtype}; add a batch axis with ids[None]."
            )
        limit = self.config.n_positions if cache is None else cache.keys[0].shape[1]
        if input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions but at most {limit} fit "
                f"({'n_positions' if cache is None else 'cache size'}); truncate the input."
            )
        return input_ids


def init_gpt2_params(config: GPT2Config, key: jax.Array, param_dtype: Any = jnp.float32) -> Params:
    """Random GPT-2 parameters (normal std 0.02, residual projections 0.02/sqrt(2 n_layer)).

    Returns the tree under ``"params"``, i.e. ``{"transformer": {...}}``.
    """
    model = GPT2(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(key, ids)["params"]
