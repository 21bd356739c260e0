"""PEFT's adapter format as both halves read and write it, with no torch and no JAX.

``lora_jax`` and ``lora_torch`` share these rules so that one adapter loads in both halves or in
neither. Nothing here imports a deep-learning framework; a test checks it.

Modules:
    ``peft_fields``: the one table of ``adapter_config.json`` fields: supported, refused (with
        the reason) or ignored, and the reader that applies it.
    ``patterns``: PEFT's ``rank_pattern`` / ``alpha_pattern`` rule (which rank and alpha each module
        gets), tested against ``peft.utils.other.get_pattern_key``.
    ``atomic``: files and directories replaced atomically (temporary siblings, stale-temporary
        removal, the usual modes, the ``RENAME_EXCHANGE`` swap), for both halves' writes.
    ``json_files``: JSON files that must hold one object, read with errors naming the file.
    ``adapter_dir``: atomic saves of a whole adapter directory, reads pinned to one save, and the
        digest that ties the config to its weights.
"""
