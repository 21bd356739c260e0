"""Sharding rules on plain shapes, and sharded training on 8 simulated CPU devices.

The device count must be fixed before jax is imported, so the mesh runs happen in a child
process: this file run as a script (``python test_sharding.py MODEL_DIR``) trains on one device
and on each mesh, and prints the results as JSON for the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lora_jax import Adapter, LoraConfig, init_lora
from lora_jax.gpt2.model import gpt2_small, init_gpt2_params
from lora_jax.training.sharding import (
    leaf_partition_spec,
    lora_partition_specs,
    make_mesh,
    param_partition_specs,
    parse_mesh_spec,
)

TARGETS = ["c_attn", "c_proj", "c_fc"]
MESHES = ["data=8", "data=4,fsdp=2 chunked"]  # the FSDP run also checks the chunked loss
STEPS = 3


# ---------------------------------------------------------------- rules, in this process


def test_parse_mesh_spec_fills_missing_axes_with_one():
    assert parse_mesh_spec("fsdp=2, data=4") == {"data": 4, "fsdp": 2}
    assert parse_mesh_spec("data=8") == {"data": 8, "fsdp": 1}


@pytest.mark.parametrize(
    "spec, fragment",
    [("model=2", "Unknown mesh axis 'model'"), ("data=2,data=4", "appears twice"), ("data=0", "positive integer"),
     ("data", "axis=size"), ("", "non-empty")],
)
def test_parse_mesh_spec_rejects_bad_specs(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_mesh_spec(spec)


def test_make_mesh_names_the_device_count_and_the_cpu_flag():
    with pytest.raises(ValueError, match=r"needs 1024 devices but .*xla_force_host_platform_device_count"):
        make_mesh("data=512,fsdp=2")


def test_leaf_rule_picks_largest_divisible_dim():
    assert tuple(leaf_partition_spec((768, 2304), 2)) == (None, "fsdp")
    assert tuple(leaf_partition_spec((3072, 768), 2)) == ("fsdp", None)
    assert tuple(leaf_partition_spec((768, 768), 2)) == ("fsdp", None)  # tie: first dim
    assert tuple(leaf_partition_spec((50257, 768), 2)) == (None, "fsdp")  # odd vocab is not divisible
    assert tuple(leaf_partition_spec((768, 768), 7)) == ()  # nothing divisible: replicate
    assert tuple(leaf_partition_spec((768, 2304), 1)) == ()


def _gpt2_small_shapes():
    params = jax.eval_shape(lambda k: init_gpt2_params(gpt2_small(), k), jax.random.key(0))  # no 124M allocation
    config = LoraConfig(rank=16, alpha=32.0, target_modules=TARGETS)
    adapter = jax.eval_shape(lambda p: init_lora(p, config, jax.random.key(1)), params)
    return params, adapter


def test_gpt2_small_specs_shard_kernels_and_lora_consistently():
    params, adapter = _gpt2_small_shapes()
    specs = param_partition_specs(params, fsdp_size=2)
    lora_specs = lora_partition_specs(adapter, params, fsdp_size=2)
    # The specs of an Adapter are an Adapter of the same config, so they line up with it as a pytree.
    assert isinstance(lora_specs, Adapter) and lora_specs.config is adapter.config
    block, lora_block = specs["transformer"]["h"]["3"], lora_specs.weights["transformer"]["h"]["3"]
    assert tuple(specs["transformer"]["wte"]["embedding"]) == (None, "fsdp")
    assert tuple(block["attn"]["c_attn"]["bias"]) == ()
    assert tuple(block["attn"]["c_attn"]["kernel"]) == (None, "fsdp")
    assert tuple(lora_block["attn"]["c_attn"]["lora_A"]) == (None, None)
    assert tuple(lora_block["attn"]["c_attn"]["lora_B"]) == (None, "fsdp")
    assert tuple(block["mlp"]["c_proj"]["kernel"]) == ("fsdp", None)
    assert tuple(lora_block["mlp"]["c_proj"]["lora_A"]) == ("fsdp", None)
    assert tuple(lora_block["mlp"]["c_proj"]["lora_B"]) == (None, None)
    n_sharded = sum(tuple(s) != () for s in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert n_sharded == 2 + 12 * 4  # wte, wpe and four kernels per block


def test_lora_specs_reject_a_tree_from_other_params():
    params, adapter = _gpt2_small_shapes()
    del params["transformer"]["h"]["11"]
    with pytest.raises(ValueError, match=r"'transformer\.h\.11\.attn\.c_attn' has no kernel"):
        lora_partition_specs(adapter, params, fsdp_size=2)


# ---------------------------------------------------------------- 8 simulated devices, in a child


def _nonzero_b(adapter):
    # With B = 0 the gradient of A is zero and half of the comparison would be vacuous.
    leaves = jax.tree_util.tree_leaves_with_path(adapter)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    new = [0.1 * jax.random.normal(k, x.shape) if "lora_B" in str(p[-1]) else x for (p, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(adapter), new)


def _train(step, adapter, opt_state, frozen, batch):
    losses = []
    for i in range(STEPS):
        adapter, opt_state, metrics = step(adapter, opt_state, frozen, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return adapter, opt_state, losses


def _max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _worker(model_dir: str) -> dict:
    import optax

    from lora_jax import Batch, lm_loss, make_train_step
    from lora_jax.gpt2.loading import load_gpt2
    from lora_jax.gpt2.model import GPT2
    from lora_jax.training.sharding import place_train_state, shard_batch, shard_train_step

    jax.config.update("jax_default_matmul_precision", "highest")
    gpt_config, frozen = load_gpt2(model_dir)
    config = LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS)
    adapter = _nonzero_b(init_lora(frozen, config, jax.random.key(0)))
    tx = optax.adamw(1e-2)
    model = GPT2(gpt_config)
    steps = {
        "full": make_train_step(lm_loss(model), tx, donate=False),
        "chunked": make_train_step(lm_loss(model, chunk_size=32), tx, donate=False),
    }
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, gpt_config.vocab_size)
    batch = Batch(ids, np.ones((8, 16), np.float32))
    ref_adapter, _, ref_losses = _train(steps["full"], adapter, tx.init(adapter), frozen, batch)
    out = {"device_count": jax.device_count(), "single": ref_losses}
    for name in MESHES:
        spec, _, loss_kind = name.partition(" ")
        mesh = make_mesh(spec)
        placed = place_train_state(frozen, adapter, tx.init(adapter), mesh)
        traces = []  # appended to each time jit traces the step, i.e. on each cache miss

        def counted(*args, inner=steps[loss_kind or "full"], traces=traces):
            traces.append(1)
            return inner(*args)

        step = shard_train_step(counted, *placed, mesh, donate=False)
        new_adapter, new_opt, losses = _train(step, placed[1], placed[2], placed[0], shard_batch(batch, mesh))
        block = lambda tree: (tree.weights if isinstance(tree, Adapter) else tree)["transformer"]["h"]["0"]  # noqa: E731
        out[name] = {
            "losses": losses,
            "lora_max_abs_diff": _max_abs_diff(new_adapter, ref_adapter),
            "adapter_after": type(new_adapter).__name__,
            "config_kept": new_adapter.config is config and new_opt[0].mu.config is config,
            "lora_B_spec_before": list(block(placed[1])["attn"]["c_attn"]["lora_B"].sharding.spec),
            "lora_B_spec_after": list(block(new_adapter)["attn"]["c_attn"]["lora_B"].sharding.spec),
            "adam_mu_B_spec": list(block(new_opt[0].mu)["attn"]["c_attn"]["lora_B"].sharding.spec),
            "compiles": len(traces),
            "kernel_shard_shape": list(block(placed[0])["attn"]["c_attn"]["kernel"].addressable_shards[0].data.shape),
            "batch_shard_rows": shard_batch(batch, mesh).input_ids.addressable_shards[0].data.shape[0],
        }
    try:
        shard_batch(Batch(ids[:6]), make_mesh("data=8"))
    except ValueError as error:
        out["indivisible_batch_error"] = str(error)
    return out


@pytest.fixture(scope="module")
def mesh_results(tiny_gpt2_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__, str(tiny_gpt2_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_child_sees_eight_devices(mesh_results):
    assert mesh_results["device_count"] == 8


@pytest.mark.parametrize("name", MESHES)
def test_sharded_steps_match_single_device(mesh_results, name):
    got = mesh_results[name]
    # float32 with "highest" precision; sharding only reorders the batch and all-reduce sums, so
    # losses agree to a few float32 ulps of O(5) values, and after 3 AdamW steps (lr 1e-2) the LoRA
    # params agree far below the 1e-2-sized updates.
    np.testing.assert_allclose(got["losses"], mesh_results["single"], rtol=1e-5, atol=1e-5)
    assert got["lora_max_abs_diff"] < 1e-5
    assert mesh_results["single"][-1] < mesh_results["single"][0]  # the steps did train
    # The sharded step returns an Adapter whose config (static pytree data) is the one it was given.
    assert (got["adapter_after"], got["config_kept"]) == ("Adapter", True)


@pytest.mark.parametrize("name, fsdp", [("data=8", False), ("data=4,fsdp=2 chunked", True)])
def test_shardings_follow_the_rules_and_survive_the_step(mesh_results, name, fsdp):
    got = mesh_results[name]
    expected_b = [None, "fsdp"] if fsdp else [None, None]
    assert got["lora_B_spec_before"] == expected_b
    assert got["lora_B_spec_after"] == expected_b
    assert got["adam_mu_B_spec"] == expected_b
    assert got["kernel_shard_shape"] == ([32, 48] if fsdp else [32, 96])  # c_attn (32, 96) split on out
    assert got["batch_shard_rows"] == 1  # 8 rows over 8 devices
    assert got["compiles"] == 1  # outputs come back in the input layout: no recompile at step 2


def test_indivisible_batch_raises(mesh_results):
    assert "cannot be split over 8 local devices" in mesh_results["indivisible_batch_error"]


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
