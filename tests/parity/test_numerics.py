"""Numerics: fp32 parity settings are scoped; devices and dtypes are validated."""

from __future__ import annotations

import jax
import pytest
import torch

from parity.numerics import check_dtype, parity_numerics, resolve_device


def test_parity_numerics_sets_and_restores_both_frameworks():
    torch.set_float32_matmul_precision("high")
    try:
        with parity_numerics():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.allow_tf32 is False
            assert jax.config.jax_default_matmul_precision == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        assert jax.config.jax_default_matmul_precision != "highest"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_request_without_gpu_names_the_fix():
    with pytest.raises(RuntimeError, match="Run with --device cpu, or install CUDA builds"):
        resolve_device("gpu")


def test_dtype_validation():
    assert check_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match="Unknown dtype 'fp16'"):
        check_dtype("fp16")
