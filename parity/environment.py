"""What a parity report was measured on: device, dtype and package versions."""

from __future__ import annotations

import importlib.metadata
import platform

# Distributions whose versions change the numbers; peft is optional.
_PACKAGES = ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "transformers", "peft", "safetensors")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numerics (``"absent"`` if missing).

    >>> sorted(package_versions())[:3]
    ['flax', 'jax', 'jaxlib']
    """
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def describe_environment(device: str, device_description: str, dtype: str) -> dict:
    """The header of every report.

    >>> env = describe_environment("cpu", "x86_64 (2 logical cores)", "fp32")
    >>> env["device"], env["dtype"], "torch" in env["versions"]
    ('cpu', 'fp32', True)
    """
    return {
        "device": device,
        "device_name": device_description,
        "dtype": dtype,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
    }
