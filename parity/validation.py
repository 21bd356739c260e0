"""Up-front checks of everything ``python -m parity`` is given, before any model is loaded.

A problem found here is a :class:`BadInput`: the CLI prints its one-line message, which names
the flag and the fix, and exits 2. The checks read only ``config.json``, safetensors headers,
``adapter_config.json`` and module names (of a GPT-2 built on the ``meta`` device, which holds no
weights), so a bad run fails in seconds instead of after the suite. Anything raised later, while
loading or inside a check, is a failed row or a bug, never reported as bad input.

Example:
    >>> check_batch_shape(batch_size=0, seq_len=16, seed=0)
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --batch-size 0 must be >= 1 (sequences per batch); pass e.g. --batch-size 2.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parity.checkpoint import (
    EMBEDDING_MODULE,
    adapter_factor_shapes,
    check_adapter_files,
    check_model_weights,
    module_shapes,
    read_gpt2_config,
    read_json_object,
    resolve_checkpoint,
)


class BadInput(ValueError):
    """Input the user can fix; the message names the problem and the fix on one line (exit status 2)."""


@contextlib.contextmanager
def reported_as_bad_input(*errors: type[Exception], prefix: str = "") -> Iterator[None]:
    """Turns the given exception types, raised inside the block, into :class:`BadInput`.

    Only for blocks that read user input (files, flags); never around a check, where a ValueError is a bug.
    """
    try:
        yield
    except BadInput:
        raise
    except errors as error:
        raise BadInput(f"{prefix}{error}") from error


def check_output_paths(*, json: str | None, markdown: str | None, section: str | None, dump: str | None) -> None:
    """Checks each output can be written, leaving nothing behind: no suite runs for a report that is then lost.

    Raises:
        BadInput: a file output that is a directory (or the reverse for ``--dump``), a parent that is a file,
            a directory that cannot be written, an existing ``--markdown`` page that cannot be read, or a bad
            ``--section`` name.
    """
    if json is not None:
        _check_output_file("--json", json, "report.json")
    if markdown is not None:
        _check_output_file("--markdown", markdown, "parity.md")
        page = Path(markdown)
        if section is not None:
            from parity.markdown_sections import upsert_section

            with reported_as_bad_input(ValueError, prefix=f"--section {section}: "):
                upsert_section("", section, "")
            if page.is_file():
                with reported_as_bad_input(OSError, UnicodeDecodeError, prefix=f"--markdown {markdown}: "):
                    page.read_text(encoding="utf-8")  # --section edits the page in place, so it must read
    if dump is not None:
        path = Path(dump)
        if path.exists() and not path.is_dir():
            raise BadInput(f"--dump {dump} is a file, not a directory; pass a directory (created if missing).")
        _check_creatable("--dump", dump, path)


def _check_output_file(flag: str, path_text: str, example: str) -> None:
    path = Path(path_text)
    if path.is_dir():
        raise BadInput(f"{flag} {path_text} is a directory; pass a file path such as {path / example}.")
    _check_creatable(flag, path_text, path.parent)


def _check_creatable(flag: str, path_text: str, directory: Path) -> None:
    existing = directory.absolute()
    while not existing.exists():  # the writers create missing parents, so the nearest existing one must be writable
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{flag} {path_text}: {existing} is a file, not a directory; pass a path inside a directory.")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the real test of write access (root, read-only mounts)
            pass
    except OSError as error:
        raise BadInput(f"{flag} {path_text}: cannot write in {existing} ({error.strerror or error}); "
                       "pass a path in a writable directory.") from error


def check_device(device: str) -> None:
    """Checks both frameworks see ``device`` (a missing GPU is reported before any loading)."""
    from parity.numerics import resolve_device

    with reported_as_bad_input(ValueError, RuntimeError):
        resolve_device(device)


def check_model(model: str | os.PathLike | None) -> tuple[Path, dict]:
    """Resolves ``--model`` and checks its ``config.json`` and weight header; returns ``(dir, config)``.

    Without ``--model`` the project's embedded base is used; a failure to build it is not the user's input.
    """
    if model is None:
        model_dir = resolve_checkpoint(None)
    else:
        with reported_as_bad_input(FileNotFoundError, ValueError):
            model_dir = resolve_checkpoint(model)
    with reported_as_bad_input(FileNotFoundError, ValueError):
        config = read_gpt2_config(model_dir)
        check_model_weights(model_dir)
    return model_dir, config


def check_batch_shape(*, batch_size: int, seq_len: int, seed: int, n_positions: int | None = None,
                      model_dir: str | os.PathLike | None = None) -> None:
    """Checks the batch flags; ``seq_len`` against ``n_positions`` when the model is known."""
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size} must be >= 1 (sequences per batch); pass e.g. --batch-size 2.")
    if seed < 0:
        raise BadInput(f"--seed {seed} must be >= 0 (numpy's generators take no negative seed).")
    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len} must be >= 2 (the loss needs a next token); pass e.g. --seq-len 16.")
    if n_positions is not None and seq_len > n_positions:
        raise BadInput(f"--seq-len {seq_len} exceeds n_positions = {n_positions} of {model_dir}/config.json "
                       f"(the model has no position embedding beyond it); pass --seq-len {n_positions} or less.")


def gpt2_skeleton(model_dir: Path) -> Any:
    """``GPT2LMHeadModel`` of ``model_dir``'s config on the ``meta`` device: its module names, no weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with reported_as_bad_input(ValueError, TypeError, OSError, prefix=f"{model_dir}/config.json: "):
        config = GPT2Config.from_pretrained(model_dir)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def _selected(skeleton: Any, target_modules: Any, layers_to_transform: Any, layers_pattern: Any = None) -> list[str]:
    # lora_torch's selection is PEFT's rule, and lora_jax applies the same rule to the same dotted names.
    from lora_torch.inject import select_modules

    return [name for name, _ in select_modules(skeleton, target_modules, layers_to_transform, layers_pattern)]


def _names(names: Any, exact_up_to: int = 8) -> str:
    # A few names are listed as they are (which layer matters); many collapse to h.{i} patterns.
    from lora_torch.targeting import summarize_names

    names = sorted(names)
    return ", ".join(names if len(names) <= exact_up_to else summarize_names(names))


def check_lora_flags(lora_config: Any, gpt2_config: dict, skeleton: Any) -> None:
    """Checks ``--targets``, ``--layers`` and ``--rank`` select adaptable modules of this GPT-2.

    Args:
        lora_config: The ``lora_jax.LoraConfig`` the flags built (``target_modules``, ``layers_to_transform``,
            ``layers_pattern``, ``rank``).
        gpt2_config: The checkpoint's ``config.json``.
        skeleton: :func:`gpt2_skeleton` of the checkpoint.
    """
    from lora_format.all_linear import is_all_linear

    targets = lora_config.target_modules
    shown = targets if is_all_linear(targets) else f"re:{targets}" if isinstance(targets, str) else ",".join(targets)
    n_layer, layers = gpt2_config["n_layer"], lora_config.layers_to_transform
    if layers is not None:
        missing = sorted(i for i in ([layers] if isinstance(layers, int) else layers) if i >= n_layer)
        if missing:
            raise BadInput(f"--layers {','.join(map(str, missing))}: no such layer, this GPT-2 has {n_layer} "
                           f"layers (0-{n_layer - 1}); pass indices in that range.")
    names = _selected(skeleton, targets, layers, lora_config.layers_pattern)
    projections = module_shapes(gpt2_config)
    if not names:
        raise BadInput(f"--targets {shown} selects no module of this GPT-2 (its projections: "
                       f"{_names(projections, exact_up_to=0)}); pass e.g. --targets c_attn,c_proj "
                       "or re:.*attn\\.c_attn.")
    other = [name for name in names if name not in projections]
    if other:
        raise BadInput(f"--targets {shown} selects {_names(other)}, which parity cannot adapt in both halves; "
                       "select only the projections c_attn, c_proj and c_fc, or the token embedding wte.")
    if lora_config.use_dora and EMBEDDING_MODULE in names:
        raise BadInput(f"--dora with --targets {shown}: DoRA on the token embedding {EMBEDDING_MODULE} is implemented "
                       "by neither half (PEFT's DoraEmbeddingLayer); drop wte from --targets or drop --dora.")
    widest = min(min(projections[name]) for name in names)
    if lora_config.rank > widest:
        name = next(n for n in names if min(projections[n]) == widest)
        raise BadInput(f"--rank {lora_config.rank} exceeds min(in, out) = {widest} of {name} {projections[name]}; "
                       f"pass --rank {widest} or less.")


def check_adapter(adapter_dir: str | os.PathLike, gpt2_config: dict, skeleton: Any) -> None:
    """Checks a PEFT adapter directory: its config is one both halves read, and it describes its tensors.

    The tensors must be exactly the LoRA factors of the modules the config selects in this GPT-2, each at
    the rank the config gives that module (``r``, or ``rank_pattern``'s first match), plus a DoRA magnitude
    per module exactly when the config says ``use_dora``. Reads ``adapter_config.json`` through
    ``lora_torch.peft_config.parse_adapter_config`` (which refuses what neither half implements, see
    ``lora_format.peft_fields``) and only the header of the tensor file.
    """
    from lora_torch.peft_config import parse_adapter_config

    with reported_as_bad_input(FileNotFoundError):  # these messages name --adapter and the path already
        path = check_adapter_files(adapter_dir)
    prefix = "--adapter: "
    with reported_as_bad_input(FileNotFoundError, ValueError, TypeError, prefix=prefix):
        config_file = path / "adapter_config.json"
        spec = parse_adapter_config(read_json_object(config_file), str(config_file))
        factors = adapter_factor_shapes(path, gpt2_config)
    half = [module for module, leaves in factors.items() if not {"A", "B"} <= set(leaves)]
    if half:
        raise BadInput(f"{prefix}{path / 'adapter_model.safetensors'} holds only one of lora_A/lora_B for "
                       f"{_names(half)}; the file is incomplete, save the adapter again.")
    dora = sorted(module for module, leaves in factors.items() if "m" in leaves)
    if spec.use_dora and len(dora) != len(factors):
        raise BadInput(f"{prefix}{config_file} says use_dora=true but adapter_model.safetensors has no "
                       f"lora_magnitude_vector for {_names(set(factors) - set(dora))}; the file is incomplete, "
                       "save the adapter again.")
    if dora and not spec.use_dora:
        raise BadInput(f"{prefix}adapter_model.safetensors holds DoRA magnitudes (lora_magnitude_vector) for "
                       f"{_names(dora)} but {config_file} says use_dora=false; save the adapter again with the "
                       "config that made its tensors.")
    selected = set(_selected(skeleton, spec.target_modules, spec.layers_to_transform, spec.layers_pattern))
    if selected != set(factors):
        gaps = [f"{what}: {_names(names)}" for what, names in (
            ("selected without tensors", selected - set(factors)), ("tensors not selected", set(factors) - selected))
            if names]
        raise BadInput(f"{prefix}the targets of {config_file} (target_modules={spec.target_modules!r}, "
                       f"layers_to_transform={spec.layers_to_transform!r}) do not match adapter_model.safetensors "
                       f"({'; '.join(gaps)}); save the adapter again with the config that made its tensors.")
    wrong = rank_mismatches(factors, spec)
    if wrong:
        ranks = sorted({rank for leaves in factors.values() for rank in (leaves["A"][0], leaves["B"][1])})
        pattern = f", rank_pattern={dict(spec.rank_pattern)}" if spec.rank_pattern else ""
        raise BadInput(f"{prefix}{config_file} says r={spec.rank}{pattern} but its tensors have rank {ranks} "
                       f"({len(wrong)} of {len(factors)} modules differ, e.g. {wrong[0]}); save the adapter again "
                       "with the config that made its tensors.")


def rank_mismatches(factors: dict[str, dict[str, tuple]], spec: Any) -> list[str]:
    """``"<module>: config r, tensors r_A/r_B"`` for each module whose tensors' rank differs from its config rank.

    A module's config rank is ``rank_pattern``'s first match, else ``r`` (``lora_format.patterns``, PEFT's rule).

    >>> from lora_torch.peft_config import AdapterSpec
    >>> spec = AdapterSpec(rank=4, lora_alpha=8, dropout=0.0, use_rslora=False, target_modules=["c_fc"],
    ...                    rank_pattern=(("h.0.mlp.c_fc", 2),))
    >>> rank_mismatches({"transformer.h.0.mlp.c_fc": {"A": (2, 32), "B": (128, 2)},
    ...                  "transformer.h.1.mlp.c_fc": {"A": (2, 32), "B": (128, 2)}}, spec)
    ['transformer.h.1.mlp.c_fc: config r=4, tensors 2/2']
    """
    wrong = []
    for module, leaves in sorted(factors.items()):
        rank, _ = spec.module_rank_alpha(module)
        if (leaves["A"][0], leaves["B"][1]) != (rank, rank):
            wrong.append(f"{module}: config r={rank}, tensors {leaves['A'][0]}/{leaves['B'][1]}")
    return wrong
