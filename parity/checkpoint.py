"""Input validation: the checkpoint directory (or hub id) and the optional PEFT adapter.

Everything here reads only ``config.json``, ``adapter_config.json`` and safetensors headers, before
any model is built, so a bad ``--model`` or ``--adapter`` fails in a second with a message that
names the problem and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_format.json_files import read_json_object
from lora_format.peft_keys import EMBEDDING_A, EMBEDDING_B, LORA_A, LORA_B, LORA_MAGNITUDE, split_key

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The config.json fields parity sizes the batches and the LoRA shapes from; save_pretrained writes them all.
GPT2_FIELDS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PEFT_PREFIX = "base_model.model."


def read_gpt2_config(model_dir: str | os.PathLike) -> dict:
    """Reads ``config.json`` of a checkpoint directory and checks it is a GPT-2.

    Raises:
        FileNotFoundError: the directory, its ``config.json`` or its weights are missing.
        ValueError: the config is not a JSON object, not a GPT-2 (``model_type`` other than ``"gpt2"``),
            or lacks one of :data:`GPT2_FIELDS` as a positive int.
    """
    path = Path(model_dir)
    if path.is_file():
        raise FileNotFoundError(f"Model path {str(path)!r} is a file, not a checkpoint directory. Pass --model "
                                "with the directory holding config.json and model.safetensors.")
    if not path.is_dir():
        raise FileNotFoundError(f"Model directory {str(path)!r} does not exist. Pass --model with a "
                                "directory holding config.json and model.safetensors, or a hub id.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; it is not a Hugging Face checkpoint "
                                "directory (save one with model.save_pretrained(dir)).")
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise ValueError(f"{str(path)!r} holds a {model_type!r} checkpoint; parity compares GPT-2 only "
                         "(config.json model_type 'gpt2'). Pass a GPT-2 checkpoint directory.")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{str(path)!r} has config.json but no weights: expected one of "
                                f"{', '.join(WEIGHT_FILES)}.")
    bad = [key for key in GPT2_FIELDS
           if not isinstance(config.get(key), int) or isinstance(config.get(key), bool) or config[key] < 1]
    if bad:
        raise ValueError(f"{config_file} lacks positive int {', '.join(bad)}; a GPT-2 config.json written by "
                         "save_pretrained has them all. Save the checkpoint again.")
    return config


def check_model_weights(model_dir: str | os.PathLike) -> None:
    """Reads the header of ``model.safetensors``: a truncated or corrupt file fails here, not mid-load.

    ``pytorch_model.bin`` (pickle) cannot be checked without loading it and is left to the loaders.

    Raises:
        ValueError: ``model.safetensors`` is not a readable safetensors file.
    """
    weights = Path(model_dir) / "model.safetensors"
    if weights.is_file():
        _read_safetensors_shapes(weights)


def _read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open checks the header and that the data offsets cover the file, without reading the data.
        with safe_open(str(path), framework="numpy") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt. "
                         "Save or download it again.") from err


def _looks_like_path(text: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a path.
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
            or os.sep in text.replace("/", "") or Path(text).exists())


def resolve_checkpoint(model: str | os.PathLike | None) -> Path:
    """Turns ``--model`` into a local GPT-2 checkpoint directory.

    Args:
        model: ``None`` for the project's embedded base, a directory, or a hub id such as ``"gpt2"``
            (downloaded once with ``huggingface_hub``; needs network access).

    Returns:
        The directory both halves load.

    >>> resolve_checkpoint("/no/such/dir")
    Traceback (most recent call last):
    ...
    FileNotFoundError: Model directory '/no/such/dir' does not exist. Pass --model with a directory holding config.json and model.safetensors, or a hub id.
    """
    if model is None:
        from lora_jax.embedded.base import ensure_base

        path = Path(ensure_base())
    elif isinstance(model, os.PathLike) or _looks_like_path(str(model)):
        path = Path(model).expanduser()
    else:
        path = _download(str(model))
    read_gpt2_config(path)
    return path


def _download(hub_id: str) -> Path:
    from lora_jax.gpt2.loading import resolve_model_dir  # the one hub path of the project

    try:
        return Path(resolve_model_dir(hub_id))
    except OSError as error:  # offline, unknown id, no huggingface_hub: one actionable message
        raise FileNotFoundError(
            f"{hub_id!r} is not a local directory and fetching it as a hub id failed ({error}). Pass a local "
            "checkpoint directory, or run where the Hugging Face hub is reachable.") from error


# The one embedding both halves (and PEFT) adapt on GPT-2: the token table, (vocab, n_embd) as (in, out).
EMBEDDING_MODULE = "transformer.wte"


def module_shapes(gpt2_config: dict) -> dict[str, tuple[int, int]]:
    """``dotted name -> (in, out)`` of the four projections of every GPT-2 layer, and of ``transformer.wte``.

    The token embedding's (in, out) is (vocab_size, n_embd): its ``A`` is (vocab, r) and ``B`` (r, n_embd),
    PEFT's ``lora_embedding_A``/``_B`` transposed.

    >>> shapes = module_shapes({"n_layer": 1, "n_embd": 8, "vocab_size": 50})
    >>> shapes["transformer.h.0.attn.c_attn"], shapes["transformer.wte"]
    ((8, 24), (50, 8))
    """
    d = gpt2_config["n_embd"]
    inner = gpt2_config.get("n_inner") or 4 * d
    per_layer = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner),
                 "mlp.c_proj": (inner, d)}
    shapes = {f"transformer.h.{i}.{name}": shape for i in range(gpt2_config["n_layer"])
              for name, shape in per_layer.items()}
    if "vocab_size" in gpt2_config:
        shapes[EMBEDDING_MODULE] = (gpt2_config["vocab_size"], d)
    return shapes


def check_adapter_files(adapter_dir: str | os.PathLike) -> Path:
    """Checks ``adapter_dir`` is a directory holding both PEFT files; returns it as a Path.

    Raises:
        FileNotFoundError: it is missing, a file, or lacks one of the two files.
    """
    path = Path(adapter_dir)
    if path.is_file():
        raise FileNotFoundError(f"Adapter path {str(path)!r} is a file, not an adapter directory. Pass --adapter "
                                "with the PEFT directory holding adapter_config.json and adapter_model.safetensors.")
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(path)!r} does not exist. Pass --adapter with a "
                                "PEFT directory (adapter_config.json + adapter_model.safetensors).")
    for name in _ADAPTER_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"Adapter directory {str(path)!r} has no {name}; save adapters with "
                                    "lora_jax.save_adapter, lora_torch.save_adapter or PeftModel.save_pretrained.")
    return path


def adapter_factor_shapes(adapter_dir: str | os.PathLike, gpt2_config: dict) -> dict[str, dict[str, tuple]]:
    """``module -> {"A": shape, "B": shape}`` (and ``"m"`` for DoRA) of an adapter's tensors, from the header.

    Every key must name a projection of this GPT-2 and every shape must be ``lora_A.weight``
    (r, in) / ``lora_B.weight`` (out, r) / ``lora_magnitude_vector`` (out,) for that projection, or
    ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (n_embd, r) for ``transformer.wte``. Keys are
    read with ``lora_format.peft_keys.split_key``, the rule both halves load with.

    Raises:
        ValueError: the file is truncated or corrupt, or the adapter was made for another model
            (unknown module, wrong shape).
    """
    path = Path(adapter_dir)
    expected = module_shapes(gpt2_config)
    factors: dict[str, dict[str, tuple]] = {}
    for key, shape in _read_safetensors_shapes(path / "adapter_model.safetensors").items():
        module, leaf = _check_adapter_tensor(key, shape, expected, path)
        factors.setdefault(module, {})[leaf] = shape
    return factors


def validate_adapter(adapter_dir: str | os.PathLike, gpt2_config: dict) -> dict:
    """Checks a PEFT LoRA adapter directory fits the GPT-2 ``gpt2_config``, reading only headers.

    See :func:`adapter_factor_shapes` for the tensor checks.

    Returns:
        The adapter's ``adapter_config.json``.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing, or it is a file.
        ValueError: not a LoRA adapter (or its config is not a JSON object), a truncated tensor file,
            or an adapter for another model (unknown module, wrong shape).
    """
    path = check_adapter_files(adapter_dir)
    config = read_json_object(path / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{str(path)!r} is a {config.get('peft_type')!r} adapter; parity needs peft_type 'LORA'.")
    adapter_factor_shapes(path, gpt2_config)
    return config


_LEAVES = {LORA_A: "A", LORA_B: "B", LORA_MAGNITUDE: "m"}
_EMBEDDING_LEAVES = {EMBEDDING_A: "A", EMBEDDING_B: "B"}


def _check_adapter_tensor(key: str, shape: tuple, expected: dict, path: Path) -> tuple[str, str]:
    module, part = split_key(key) or ("", "")
    leaves = _EMBEDDING_LEAVES if module == EMBEDDING_MODULE else _LEAVES
    if module not in expected or part not in leaves:
        raise ValueError(f"Adapter {str(path)!r} has tensor {key!r}, which names no LoRA projection of this "
                         f"GPT-2 (e.g. {_PEFT_PREFIX}{next(iter(expected))}.lora_A.weight). It was made for "
                         "another model; pass the checkpoint it was trained on with --model.")
    d_in, d_out = expected[module]
    want = {LORA_A: f"(r, {d_in})", LORA_B: f"({d_out}, r)", LORA_MAGNITUDE: f"({d_out},)",
            EMBEDDING_A: f"(r, {d_in})", EMBEDDING_B: f"({d_out}, r)"}[part]
    ok = {LORA_A: len(shape) == 2 and shape[1] == d_in, LORA_B: len(shape) == 2 and shape[0] == d_out,
          LORA_MAGNITUDE: tuple(shape) == (d_out,), EMBEDDING_A: len(shape) == 2 and shape[1] == d_in,
          EMBEDDING_B: len(shape) == 2 and shape[0] == d_out}[part]
    if not ok:
        raise ValueError(f"Adapter tensor {key!r} has shape {shape}, but this GPT-2's {module} needs {want}. "
                         "The adapter was made for another model; pass its base checkpoint with --model.")
    return module, leaves[part]
