"""Per-device memory of a GPT-2 XL (1.5B) LoRA step on a simulated mesh, from XLA's memory analysis.

Nothing of size 1.5B is allocated: parameters, LoRA tree and optimizer state are
``jax.ShapeDtypeStruct`` leaves carrying their ``NamedSharding``, and the step is only lowered
and compiled for the mesh. The device count is simulated on CPU, so the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count`` before importing jax::

    python examples/sharding_memory.py --devices 8 --out docs/sharding_memory.json

The numbers are what XLA plans for one device: arguments (its shard of the frozen base, the
LoRA tree, Adam's moments and the batch), outputs, and temporaries (activations and gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--meshes", nargs="+", default=["data=8", "data=4,fsdp=2", "data=2,fsdp=4", "fsdp=8"])
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="override n_layer (quick runs)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    too_small = [f"--{n} must be >= 1, got {getattr(args, n)}" for n in ("devices", "batch", "seq", "layers")
                 if getattr(args, n) is not None and getattr(args, n) < 1]
    if too_small:
        p.error("; ".join(too_small))  # before jax is imported with a device count it cannot honour
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # must precede the first jax import
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from lora_jax import Batch, LoraConfig, init_lora, lm_loss, make_train_step  # noqa: E402
from lora_jax.gpt2.model import GPT2, gpt2_xl, init_gpt2_params  # noqa: E402
from lora_jax.training.sharding import make_mesh, shard_train_step, train_shardings  # noqa: E402
from lora_torch.tensor_files import atomic_destination  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # sibling module when run as a script
from benchmark_steps import CHUNK_SIZE, TARGETS, xla_memory_plan_mib  # noqa: E402


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_memory(spec: str, args: argparse.Namespace, devices: list) -> dict:
    """Compiles one LoRA step for ``spec`` and returns XLA's per-device memory plan in MiB."""
    config = gpt2_xl()
    if args.layers:
        config = dataclasses.replace(config, n_layer=args.layers)
    # A bf16 frozen base with float32 LoRA and Adam state: the usual LoRA setup for a 1.5B model.
    model = GPT2(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True)
    lora_config = LoraConfig(rank=16, alpha=32.0, target_modules=TARGETS)
    tx = optax.adamw(1e-4)
    frozen = jax.eval_shape(lambda k: init_gpt2_params(config, k, param_dtype=jnp.bfloat16), jax.random.key(0))
    adapter = jax.eval_shape(lambda p: init_lora(p, lora_config, jax.random.key(1)), frozen)
    opt_state = jax.eval_shape(tx.init, adapter)
    mesh = make_mesh(spec, devices)
    sh = train_shardings(frozen, adapter, opt_state, mesh)
    batch = Batch(jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=sh.batch))
    loss_fn = lm_loss(model, chunk_size=CHUNK_SIZE)  # the chunked LM head
    step = shard_train_step(make_train_step(loss_fn, tx), frozen, adapter, opt_state, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(_with_shardings(adapter, sh.adapter), _with_shardings(opt_state, sh.opt_state),
                          _with_shardings(frozen, sh.frozen), batch,
                          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh.replicated)).compile()
    row = {"mesh": spec, "devices": mesh.size, "compile_s": time.perf_counter() - t0}
    row.update({f"{key}_mib": mib for key, mib in xla_memory_plan_mib(compiled).items()})
    print(f"{spec:>16}: arguments {row['argument_mib']:.0f}, temporaries {row['temp_mib']:.0f}, "
          f"peak {row['peak_mib']:.0f} MiB per device ({row['compile_s']:.0f}s to compile)", flush=True)
    return row


def main(args: argparse.Namespace) -> None:
    devices = jax.devices()
    rows = [step_memory("data=1", args, devices[:1])]  # one device: the reference
    rows += [step_memory(spec, args, devices) for spec in args.meshes]
    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": "GPT-2 XL" if not args.layers else f"GPT-2 XL width, {args.layers} layers",
        "setup": "bf16 frozen base and compute, float32 LoRA r=16 (c_attn, c_proj, c_fc) + AdamW state, "
                 "remat per block, chunked LM-head loss",
        "global_batch": [args.batch, args.seq], "jax": jax.__version__, "rows": rows,
    }
    if args.out:
        with atomic_destination(args.out) as tmp:  # temp file beside the target, removed if the write fails
            tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print("wrote", args.out)


if __name__ == "__main__":
    main(ARGS)
