"""``--quantize nf4``: the QLoRA base of both halves, and the reference's, from one checkpoint.

Three 4-bit bases are built from the same float checkpoint (QLoRA, Dettmers et al. 2023, arXiv:2305.14314):

- torch: ``lora_torch.quantize_base`` on transformers' float GPT-2: bitsandbytes ``Linear4bit`` (NF4, blocks of
  64, double-quantized statistics) where transformers' 4-bit loading puts them;
- JAX: ``lora_jax.load_gpt2(dir, quantize="nf4")``: every Dense kernel an ``NF4Tensor`` of the (out, in)
  weight, quantized by ``lora_jax.nf4`` (NumPy rules written after bitsandbytes' kernels);
- the PEFT reference: transformers' own 4-bit loading (:func:`load_transformers_4bit`), the model PEFT users
  put LoRA on.

The ``quantization`` stage (``parity.checks.quantization``) holds the JAX codes and statistics to both
bitsandbytes bases byte for byte, and the dequantized kernels bit for bit; every later stage then runs
on bases whose dequantized weights are identical, so the tolerances of the float runs apply unchanged.

Every input rule of the mode is here (:func:`check_quantize_flags`, :func:`check_bitsandbytes`,
:func:`check_quantize_targets`); each raises :class:`parity.validation.BadInput` before any model is loaded.

>>> check_quantize_flags("fp4", device="cpu", dtype="fp32", adapters=0)
Traceback (most recent call last):
...
parity.validation.BadInput: --quantize fp4 is not supported; choose from nf4 (bitsandbytes' 4-bit NormalFloat, blocks of 64, double-quantized statistics, as QLoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parity.validation import BadInput

QUANTIZE_CHOICES = ("nf4",)
# transformers' BitsAndBytesConfig for the reference: QLoRA's NF4 with double quantization, float32 compute.
_BNB_CONFIG = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def check_quantize_flags(quantize: str, *, device: str, dtype: str, adapters: int) -> None:
    """Checks ``--quantize`` and the flags it cannot combine with.

    Args:
        quantize: The ``--quantize`` value.
        device: ``--device``; the NF4 rules are bitsandbytes' CPU kernels, so only ``cpu``.
        dtype: ``--dtype``; QLoRA's parity runs in float32 compute (``bnb_4bit_compute_dtype=float32``).
        adapters: How many ``--adapter NAME=DIR`` were given (several are not supported with a 4-bit base).

    >>> check_quantize_flags("nf4", device="gpu", dtype="fp32", adapters=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --quantize nf4 with --device gpu: ... pass --device cpu.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise BadInput(f"--quantize {quantize} is not supported; choose from {', '.join(QUANTIZE_CHOICES)} "
                       "(bitsandbytes' 4-bit NormalFloat, blocks of 64, double-quantized statistics, as QLoRA).")
    if device != "cpu":
        raise BadInput(f"--quantize {quantize} with --device {device}: lora_jax's NF4 is proven bit-exact against "
                       "bitsandbytes' CPU kernels only (its CUDA kernels round otherwise); pass --device cpu.")
    if dtype != "fp32":
        raise BadInput(f"--quantize {quantize} with --dtype {dtype}: the QLoRA checks run in float32 compute "
                       "(bnb_4bit_compute_dtype=float32), where the bases are bit-identical; drop --dtype.")
    if adapters > 1:
        raise BadInput(f"--quantize {quantize} checks one adapter on the 4-bit base; the switching, mixed_batch and "
                       "combination stages of several --adapter NAME=DIR are not built for it. Pass one --adapter.")


def check_bitsandbytes() -> None:
    """Imports bitsandbytes (the torch half and the reference need it) as lora_torch does; a failure is bad input.

    lora_torch's error already names the install command (``lora_torch.quantize.INSTALL_HINT``).
    """
    from lora_torch.quantize import BitsandbytesMissingError, import_bitsandbytes

    try:
        import_bitsandbytes()
    except BitsandbytesMissingError as error:
        raise BadInput(f"--quantize nf4 needs bitsandbytes: {error}") from error


def check_quantize_targets(modules: Any, source: str) -> None:
    """Refuses LoRA on the token embedding with a 4-bit base.

    GPT-2's ``wte`` is the tied output head, which stays dense in every 4-bit base; its merge changes the head
    too (see ``parity.checks.merge``), which the QLoRA merge stage does not model.

    >>> check_quantize_targets(["transformer.h.0.attn.c_attn"], "--targets c_attn")
    >>> check_quantize_targets(["transformer.wte"], "--targets wte")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --quantize nf4 with --targets wte: LoRA on the token embedding ...
    """
    from parity.checkpoint import EMBEDDING_MODULE

    if EMBEDDING_MODULE in set(modules):
        raise BadInput(f"--quantize nf4 with {source}: LoRA on the token embedding {EMBEDDING_MODULE} (the tied head, "
                       "dense in a 4-bit base) is not checked on a 4-bit base; target the projections c_attn, c_proj, "
                       "c_fc only, or drop --quantize.")


def _no_cpu_repack(model: Any) -> Any:
    """Turns off bitsandbytes' AVX512-BF16 CPU repack on every ``Linear4bit``; returns ``model``.

    On such CPUs an eval forward without grad rewrites a layer's bytes in place (absmax rounded to
    bfloat16), after which its stored codes and statistics are no longer bitsandbytes' quantization and
    its kernel has no autograd. The layer's bytes are untouched by this; only that code path is closed.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_transformers_4bit(model_dir: Path) -> Any:
    """The reference base: ``GPT2LMHeadModel.from_pretrained`` with transformers' 4-bit loading (NF4, double
    quantization, float32 compute) on CPU, eval mode, its bytes never repacked (:func:`_no_cpu_repack`)."""
    import torch
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    config = BitsAndBytesConfig(**_BNB_CONFIG, bnb_4bit_compute_dtype=torch.float32)
    model = GPT2LMHeadModel.from_pretrained(model_dir, quantization_config=config, device_map="cpu")
    return _no_cpu_repack(model.eval())


def quantize_torch(model: Any) -> Any:
    """``lora_torch.quantize_base(model)`` with the defaults (NF4, block 64, double quantization, float32)."""
    from lora_torch import quantize_base

    return quantize_base(model)


def quantize_jax(params: Any) -> Any:
    """``lora_jax.quantize_params(params)`` with the defaults (NF4 of each kernel.T, block 64, double quantization)."""
    from lora_jax.qlora import quantize_params

    return quantize_params(params)


def float_params(params: Any) -> Any:
    """``params`` with every NF4 kernel dequantized to its (in, out) float32 kernel, bit for bit bitsandbytes'.

    What host-side readers of a QLoRA base see: LoRA init, adapter loading, DoRA norms, merges. A float
    tree comes back unchanged.
    """
    import jax
    from lora_jax.qlora import dequantize_params

    return jax.jit(dequantize_params)(params)  # in jit, as lora_apply dequantizes (XLA's FMA rule, lora_jax.nf4)
