"""Load a Hugging Face GPT-2 checkpoint into the Flax GPT-2, and save one back.

HF's ``Conv1D.weight`` is already (in, out), the orientation of a Flax ``Dense`` kernel, so
conversion renames tensors and never transposes them. Every tensor is shape-checked against
the config, and every problem (missing, unexpected or mis-shaped key, untied head) is reported
before a single array is converted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.atomic_files import atomic_write, atomic_write_text
from lora_jax.gpt2.model import GPT2Config, Params, _read_hf_config
from lora_jax.gpt2.quantized_checkpoint import split_4bit_tensors
from lora_jax.lora_tree import nest
from lora_jax.nf4 import NF4Tensor, check_block_size
from lora_jax.qlora import quantize_params

_PREFIX = "transformer."
# Buffers HF may store: the causal mask and its fill value, rebuilt by every model.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hf_layout(config: GPT2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Maps each HF tensor name (without the ``transformer.`` prefix) to its Flax path and shape.

    Example:
        >>> layout = hf_layout(GPT2Config(n_embd=8, n_head=2, n_layer=1, vocab_size=5, n_positions=4))
        >>> layout["h.0.attn.c_attn.weight"]
        (('transformer', 'h', '0', 'attn', 'c_attn', 'kernel'), (8, 24))
    """
    d, flax_leaf = config.n_embd, {"weight": "kernel", "bias": "bias"}
    layout = {
        "wte.weight": (("wte", "embedding"), (config.vocab_size, d)),
        "wpe.weight": (("wpe", "embedding"), (config.n_positions, d)),
        "ln_f.weight": (("ln_f", "scale"), (d,)),
        "ln_f.bias": (("ln_f", "bias"), (d,)),
    }
    inner = config.inner_dim
    dense = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner), "mlp.c_proj": (inner, d)}
    for i in range(config.n_layer):
        for ln in ("ln_1", "ln_2"):
            layout[f"h.{i}.{ln}.weight"] = (("h", str(i), ln, "scale"), (d,))
            layout[f"h.{i}.{ln}.bias"] = (("h", str(i), ln, "bias"), (d,))
        if config.activation_function == "prelu":  # nn.PReLU's one learned slope
            layout[f"h.{i}.mlp.act.weight"] = (("h", str(i), "mlp", "act", "weight"), (1,))
        for name, (fan_in, fan_out) in dense.items():
            path = ("h", str(i), *name.split("."))
            layout[f"h.{i}.{name}.weight"] = ((*path, flax_leaf["weight"]), (fan_in, fan_out))
            layout[f"h.{i}.{name}.bias"] = ((*path, flax_leaf["bias"]), (fan_out,))
    return {key: (("transformer", *path), shape) for key, (path, shape) in layout.items()}


QUANTIZE_CHOICES = (None, "nf4")


def load_gpt2(path_or_hub_id: str | os.PathLike, *, dtype: Any = jnp.float32, quantize: str | None = None,
              block_size: int = 64, double_quant: bool = True) -> tuple[GPT2Config, Params]:
    """Loads a HF GPT-2 checkpoint as ``(config, params)`` for ``GPT2(config)``.

    Args:
        path_or_hub_id: A directory with ``config.json`` and ``model.safetensors`` (sharded or
            not) or ``pytorch_model.bin``; or a hub id such as ``"gpt2"`` (needs network).
        dtype: Parameter dtype of the returned tree (of the float leaves, and the dtype the NF4
            kernels are quantized from and dequantize to).
        quantize: None for float weights; ``"nf4"`` for a QLoRA base: every Dense kernel that
            transformers' 4-bit loading quantizes (``c_attn``, ``c_proj``, ``c_fc`` in each block) becomes
            ``lora_jax.qlora.quantize_params``' ``NF4Tensor`` of the (out, in) weight, bit for bit what
            bitsandbytes makes; embeddings (the tied head), LayerNorms and biases stay float. A checkpoint
            saved by transformers from a 4-bit model is read as stored (never re-quantized) after its
            statistics are checked against its codes (``lora_jax.gpt2.quantized_checkpoint``).
        block_size: NF4 block size (bitsandbytes' and transformers' 64).
        double_quant: quantize the block statistics again (``bnb_4bit_use_double_quant``).

    Raises:
        FileNotFoundError: The directory lacks a config or weights file.
        ValueError: The config uses an option this model lacks (see ``GPT2Config.from_hf``); keys
            are missing, unexpected or mis-shaped; the LM head is not tied; ``quantize`` is not one of
            ``QUANTIZE_CHOICES``, or a block size bitsandbytes refuses; a 4-bit checkpoint without
            ``quantize="nf4"``, stored with another block size or double quantization than asked, or
            whose statistics do not match its codes.
        OSError: A hub id could not be downloaded (offline, unknown id).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported; use None (float weights) or 'nf4' (QLoRA's "
                         "4-bit NormalFloat, as bitsandbytes makes it).")
    if quantize is not None:
        check_block_size(block_size)
    model_dir = resolve_model_dir(path_or_hub_id)
    hf = _read_hf_config(model_dir)
    config = GPT2Config.from_hf(hf)
    raw, stored_4bit = split_4bit_tensors(_read_weights(model_dir))
    if stored_4bit:
        _check_stored_4bit(stored_4bit, quantize, block_size, double_quant, model_dir)
    stored = {key.removeprefix(_PREFIX): q for key, q in stored_4bit.items()}
    # The shape check sees a stored 4-bit weight as the (in, out) kernel it stands for.
    shapes = {key: jax.ShapeDtypeStruct(q.shape[::-1], q.dtype) for key, q in stored.items()}
    tensors = _checked_tensors({**raw, **shapes}, config, tied=bool(hf.get("tie_word_embeddings", True)))
    params = nest({path: stored[key] if key in stored else jnp.asarray(tensors[key], dtype=dtype)
                   for key, (path, _) in hf_layout(config).items()})
    if quantize is not None and not stored:
        params = quantize_params(params, block_size=block_size, double_quant=double_quant)
    return config, params


def _check_stored_4bit(stored: Mapping[str, NF4Tensor], quantize: str | None, block_size: int, double_quant: bool,
                       model_dir: Path) -> None:
    if quantize is None:
        raise ValueError(f"{model_dir} holds a 4-bit (bitsandbytes NF4) checkpoint; load it with quantize='nf4' "
                         "(and lora_jax.dequantize_params(params) for float kernels).")
    for name, q in stored.items():
        if (q.block_size, q.double_quant) != (block_size, double_quant):
            raise ValueError(
                f"{model_dir} stores its 4-bit weight {name} with block_size={q.block_size}, "
                f"double_quant={q.double_quant}, but load_gpt2 was asked for block_size={block_size}, "
                f"double_quant={double_quant}; a 4-bit checkpoint is loaded as stored, so pass those values.")


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """Returns a local directory: the path itself, or a hub snapshot downloaded on demand."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name} is not a model directory; pass a directory holding config.json.")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise OSError(f"{repo_id!r} is not a local directory and huggingface_hub is not installed.") from err
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(local.glob("*.safetensors")):  # older repos ship only the pickle format
            local = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model.bin"]))
    except Exception as err:  # the hub client raises many types for offline / unknown ids
        raise OSError(
            f"Could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline? Pass a local checkpoint directory, or use lora_jax.embedded.ensure_base()."
        ) from err
    return local


def _read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    if (model_dir / "model.safetensors").is_file():
        return _read_safetensors([model_dir / "model.safetensors"])
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return _read_safetensors([model_dir / shard for shard in shards])
    if (model_dir / "pytorch_model.bin").is_file():
        return _read_torch_bin(model_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"No weights in {model_dir}; expected one of {', '.join(_WEIGHT_FILES)}.")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors = {}
    for file in files:
        # The "flax" framework understands bfloat16, which plain numpy cannot represent.
        with safe_open(file, framework="flax") as f:
            tensors.update({key: np.asarray(f.get_tensor(key)) for key in f.keys()})
    return tensors


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    import torch  # only this legacy format needs torch

    # weights_only=True refuses to run pickled code from an untrusted file.
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {key: value.detach().float().numpy() for key, value in state.items()}


def _checked_tensors(
    raw: Mapping[str, np.ndarray], config: GPT2Config, *, tied: bool = True
) -> dict[str, np.ndarray]:
    """Strips the prefix, drops buffers, checks the tied head, and validates every key and shape.

    ``tied`` is the checkpoint's ``tie_word_embeddings``. When it is false, transformers uses
    ``lm_head.weight`` as stored (or a random head if none is stored), so the checkpoint loads
    only if that head exists and equals ``wte``.
    """
    tensors = {key.removeprefix(_PREFIX): value for key, value in raw.items()}
    tensors = {key: value for key, value in tensors.items() if not key.endswith(_IGNORED_SUFFIXES)}
    head = tensors.pop("lm_head.weight", None)
    layout = hf_layout(config)
    problems = [f"missing {key}" for key in layout if key not in tensors]
    problems += [f"unexpected {key}" for key in tensors if key not in layout]
    problems += [
        f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}"
        for key, (_, shape) in layout.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    if problems:
        raise ValueError("Checkpoint does not match its config.json: " + "; ".join(problems) + ".")
    if not tied and head is None:
        raise ValueError(
            "config.json sets tie_word_embeddings false but stores no lm_head.weight, so transformers would "
            "start from a random output head. This Flax GPT-2 ties lm_head to wte; set tie_word_embeddings "
            "true if the head is meant to be tied."
        )
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise ValueError(
            "lm_head.weight differs from wte.weight (config.json tie_word_embeddings is "
            f"{str(tied).lower()}); this GPT-2 requires a tied output head (lm_head = wte), so it cannot "
            "hold this checkpoint. Use a checkpoint whose head is tied."
        )
    return tensors


def save_gpt2(
    params: Params, config: GPT2Config, out_dir: str | os.PathLike, *, extra_config: Mapping[str, Any] | None = None
) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads.

    Tensors are written as float32 under HF's names (``transformer.h.0.attn.c_attn.weight``...);
    the head is tied so no ``lm_head.weight`` is stored. Dropout probabilities are written as 0
    because this model was never trained with dropout. Each file is replaced atomically.

    Args:
        params: The tree from ``load_gpt2`` or ``init_gpt2_params``.
        config: Its config; every tensor is checked against it first.
        out_dir: Directory to create or update.
        extra_config: More ``config.json`` entries, e.g. ``{"bos_token_id": 0}``.
    """
    layout = hf_layout(config)
    tensors = {}
    for key, (path, shape) in layout.items():
        leaf = _leaf(params, path)
        if tuple(leaf.shape) != shape:
            raise ValueError(f"params leaf {'.'.join(path)} has shape {tuple(leaf.shape)}, expected {shape}.")
        tensors[_PREFIX + key] = np.ascontiguousarray(jax.device_get(leaf), dtype=np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda tmp: _save_safetensors(tensors, tmp))
    text = json.dumps({**_hf_config_dict(config), **(extra_config or {})}, indent=2, sort_keys=True)
    atomic_write_text(out / "config.json", text + "\n")
    return out


def _leaf(params: Params, path: tuple[str, ...]) -> Any:
    node: Any = params
    for i, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"params has no {'.'.join(path[: i + 1])}; is this a GPT-2 tree for this config?")
        node = node[part]
    return node


def _save_safetensors(tensors: dict[str, np.ndarray], file: str) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, file, metadata={"format": "pt"})  # transformers checks the format tag


def _hf_config_dict(config: GPT2Config) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "activation_function": config.activation_function,
        "scale_attn_weights": config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": config.reorder_and_upcast_attn,
        "add_cross_attention": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }
