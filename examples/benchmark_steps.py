"""The training steps that ``compare_implementations.py`` times, one builder per implementation.

Each builder returns a ``Timed`` whose ``step()`` runs one optimizer step and waits for it to
finish (``block_until_ready`` / ``cuda.synchronize``), so wall time measures the whole step.
Within a step nothing syncs with the host: the JAX state stays on device and is donated.
Each LoRA implementation also has a DoRA twin (``jax_dora``, ``torch_dora``, ``peft_dora``): the
same step with ``use_dora=True``, which ``benchmark_dora.py`` times against the plain ones.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA, LR = 16, 32.0, 1e-4
# lora_jax.training.chunked_loss.DEFAULT_CHUNK_SIZE, repeated here because this module must not import jax
# before set_backend_environment (tests/examples/test_compare_implementations.py checks that the two agree).
CHUNK_SIZE = 256


def set_backend_environment(device: str, threads: int) -> None:
    """Gives torch and XLA the same thread budget; call it before jax is first imported (XLA reads its flags then)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
    else:  # torch and XLA share the GPU: no preallocation by XLA
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model shape and batch, shared by every implementation."""

    preset: str
    n_embd: int
    n_layer: int
    n_head: int
    batch: int
    seq: int
    dtype: str  # "float32" or "bfloat16" (compute; LoRA params stay float32)
    device: str
    chunk_size: int = CHUNK_SIZE
    vocab: int = 50257
    n_positions: int = 1024

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Timed:
    """A built implementation: ``step()`` trains one step; ``info`` holds FLOPs and memory."""

    name: str
    framework: str
    training: str  # "lora", "dora" or "full"
    step: Callable[[], None]
    info: dict
    close: Callable[[], None] = lambda: None

    def measured_step(self) -> None:
        """One step, sampling the process RSS meanwhile (CPU memory is only visible that way)."""
        with RssSampler() as sampler:
            self.step()
        self.info["peak_rss_mb"] = max(self.info.get("peak_rss_mb", 0.0), sampler.peak_mb)


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak resident set size while the ``with`` block runs, sampled every 2 ms."""

    def __enter__(self) -> RssSampler:
        self.peak_mb, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def analytic_flops(w: Workload, training: str) -> float:
    """Matmul FLOPs of one step, counted by hand (torch has no cost analysis).

    Forward per token: ``24 L D^2`` (the four projections), ``4 L T D`` (scores and values,
    counted for the full T x T square as XLA and SDPA compute it), ``2 D V`` (tied head), plus
    ``2 r (in + out)`` per LoRA module. LoRA backward propagates activations through the frozen
    matmuls (1x forward) and forms the LoRA gradients (2x the LoRA forward); full fine-tuning's
    backward is 2x forward. DoRA adds, once per step rather than per token, the product ``A B``
    (``2 r in out`` per module, ``2 r 12 L D^2`` in all) inside the weight norm ``||W0 + s A B||``;
    the norm is detached, so it has no backward.
    """
    d, layers, t = w.n_embd, w.n_layer, w.seq
    base = 24 * layers * d * d + 4 * layers * t * d + 2 * d * w.vocab
    lora = 2 * RANK * layers * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    tokens = w.batch * w.seq
    if training == "full":
        return 3.0 * base * tokens
    dora_norm = 2 * RANK * layers * 12 * d * d if training == "dora" else 0
    return (2.0 * base + 3.0 * lora) * tokens + dora_norm


# ------------------------------------------------------------------------------------------- JAX


def _jax_setup(w: Workload, remat: bool = False):
    import jax
    import jax.numpy as jnp

    from lora_jax import Batch
    from lora_jax.gpt2.model import GPT2, GPT2Config

    config = GPT2Config(vocab_size=w.vocab, n_positions=w.n_positions, n_embd=w.n_embd, n_layer=w.n_layer,
                        n_head=w.n_head)
    dtype = jnp.dtype(w.dtype)
    model = GPT2(config, dtype=dtype, param_dtype=dtype, remat=remat)
    ids = jax.random.randint(jax.random.key(1), (w.batch, w.seq), 0, w.vocab)
    return config, model, Batch(ids)


def _jax_step_fns(w: Workload, training: str, chunked: bool, remat: bool = False):
    """``(step, init_state, batch)``: the jitted step, a function making its state arguments
    (``abstract=True``: shapes only, for compile-only analysis) and the fixed batch."""
    import jax
    import optax

    from lora_jax import LoraConfig, init_lora, lm_loss, make_train_step
    from lora_jax.gpt2.model import init_gpt2_params
    from lora_jax.training.chunked_loss import chunked_next_token_loss

    config, model, batch = _jax_setup(w, remat)
    tx = optax.adamw(LR)
    lora_config = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS, use_dora=training == "dora")
    if training == "full":
        # lm_loss(chunk_size=...) keeps the tied embedding frozen; full fine-tuning differentiates it.
        def loss_fn(params, _unused, batch, _rng):
            hidden = model.apply({"params": params}, batch.input_ids, method="hidden")
            return chunked_next_token_loss(hidden, params["transformer"]["wte"]["embedding"], batch.input_ids,
                                           chunk_size=w.chunk_size, embedding_grad=True)
    else:
        loss_fn = lm_loss(model, chunk_size=w.chunk_size if chunked else None)
    step = make_train_step(loss_fn, tx, donate=True)

    def init_state(abstract: bool = False):
        make_params = lambda: init_gpt2_params(config, jax.random.key(0), param_dtype=model.param_dtype)  # noqa: E731
        params = jax.eval_shape(make_params) if abstract else make_params()
        make = jax.eval_shape if abstract else (lambda f, *a: f(*a))
        if training == "full":
            return params, make(tx.init, params), None
        adapter = make(lambda p: init_lora(p, lora_config, jax.random.key(2)), params)
        return adapter, make(tx.init, adapter), params

    return step, init_state, batch


def xla_memory_plan_mib(compiled) -> dict[str, float] | None:
    """XLA's per-device memory plan of a compiled step, in MiB (``None`` where the backend has none).

    Keys ``argument``, ``output``, ``temp`` and ``alias`` (outputs written into donated arguments), and
    ``peak`` = arguments + outputs + temporaries - aliased.
    """
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    plan = {"argument": mem.argument_size_in_bytes / 2**20, "output": mem.output_size_in_bytes / 2**20,
            "temp": mem.temp_size_in_bytes / 2**20, "alias": mem.alias_size_in_bytes / 2**20}
    plan["peak"] = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
    return plan


def _xla_analysis(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA counts a while loop's body once, not once per trip: the chunked loss's scan is undercounted.
    info = {"xla_flops_per_step": float(cost.get("flops", 0.0))}
    info.update({f"xla_{key}_mb": mib for key, mib in (xla_memory_plan_mib(compiled) or {}).items()})
    return info


def build_jax(name: str, w: Workload, training: str, chunked: bool) -> Timed:
    rss_before = rss_mb()
    step, init_state, batch = _jax_step_fns(w, training, chunked)
    return timed_jax_step(name, w, training, step, init_state(), batch, rss_before)


def timed_jax_step(name: str, w: Workload, training: str, step, state: tuple, batch, rss_before: float) -> Timed:
    """A ``Timed`` around a jitted ``step(trained, opt_state, frozen, batch, rng)`` (``make_train_step``'s).

    ``info["first_loss"]`` keeps the loss of the first step, so rows that start from the same weights
    (``jax_lora`` and ``qwix``) can be checked against each other in the run itself.
    """
    import jax

    trained, opt_state, frozen = state
    rng = jax.random.key(3)
    info = _xla_analysis(step.lower(trained, opt_state, frozen, batch, rng).compile())
    info["flops_per_step"] = analytic_flops(w, training)  # one yardstick for every row
    info["dtype"] = w.dtype
    state = {"trained": trained, "opt": opt_state}

    def run() -> None:
        state["trained"], state["opt"], metrics = step(state["trained"], state["opt"], frozen, batch, rng)
        jax.block_until_ready((state["trained"], metrics["loss"]))
        info.setdefault("first_loss", float(metrics["loss"]))
        if w.device == "gpu":  # the allocator's peak over the process so far: it cannot be reset
            peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
            info["xla_allocator_peak_so_far_mb"] = peak / 2**20

    def close() -> None:
        state.clear()

    info["rss_added_by_build_mb"] = rss_mb() - rss_before
    return Timed(name, "jax", training, run, info, close)


def build_qwix(name: str, w: Workload) -> Timed | None:
    """qwix's LoRA on the same GPT-2, weights, A/B, loss and optimizer as ``jax_lora`` (``qwix_lora_step.py``)."""
    try:
        import qwix  # noqa: F401
    except ImportError:
        print(f"  skipping {name}: qwix is not installed (pip install 'qwix>=0.1.8,<0.2')", flush=True)
        return None
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import make_train_step
    from qwix_lora_step import from_lora_jax, qwix_gpt2, qwix_lm_loss, split_lora

    rss_before = rss_mb()
    _, init_state, batch = _jax_step_fns(w, "lora", chunked=True)
    adapter, _, params = init_state()  # jax_lora's own starting point
    _, model, _ = _jax_setup(w)
    qmodel = qwix_gpt2(model, TARGETS, RANK, ALPHA)
    shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    lora = from_lora_jax(split_lora(shapes)[0], adapter)
    tx = optax.adamw(LR)
    step = make_train_step(qwix_lm_loss(qmodel, chunk_size=w.chunk_size), tx, donate=True)
    return timed_jax_step(name, w, "lora", step, (lora, tx.init(lora), params), batch, rss_before)


def jax_memory_table(w: Workload) -> list[dict]:
    """XLA's memory analysis of the step, LoRA and full FT, with and without remat (compile only)."""
    import jax

    rows = []
    for training in ("lora", "full"):
        for remat in (False, True):
            step, init_state, batch = _jax_step_fns(w, training, chunked=True, remat=remat)
            args = (*init_state(abstract=True), batch, jax.random.key(3))
            t0 = time.perf_counter()
            info = _xla_analysis(step.lower(*args).compile())
            rows.append({"training": training, "remat": remat, "compile_s": time.perf_counter() - t0, **info})
            print(f"  memory: {training} remat={remat}: peak {info.get('xla_peak_mb', float('nan')):.0f} MB", flush=True)
    return rows


# ----------------------------------------------------------------------------------------- torch


def _torch_model(w: Workload):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=w.vocab, n_positions=w.n_positions, n_embd=w.n_embd, n_layer=w.n_layer,
                        n_head=w.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)  # transformers' default attention: SDPA
    return model.to(device="cuda" if w.device == "gpu" else "cpu", dtype=getattr(torch, w.dtype))


def _adapt(model, variant: str, dora: bool):
    if variant == "lora_torch":
        from lora_torch import freeze_base_model, inject_lora

        return freeze_base_model(inject_lora(model, TARGETS, rank=RANK, lora_alpha=ALPHA, use_dora=dora,
                                             verbose=False))
    if variant == "peft":
        import peft

        # lora_dropout=0: PEFT's DoRA then reuses the base layer's output instead of recomputing x W0.
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                 fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM", use_dora=dora)
        return peft.get_peft_model(model, config)
    return model  # full fine-tuning: every parameter trains


def build_torch(name: str, w: Workload, variant: str, compiled: bool, dora: bool = False) -> Timed | None:
    import torch

    if variant == "peft":
        try:
            import peft  # noqa: F401
        except ImportError:
            print(f"  skipping {name}: peft is not installed", flush=True)
            return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rss_before = rss_mb()
    device = "cuda" if w.device == "gpu" else "cpu"
    model = _adapt(_torch_model(w), variant, dora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4, fused=True)  # optax.adamw's default wd
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, w.vocab, (w.batch, w.seq), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        optimizer.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        sync()
        if device == "cuda":  # includes every implementation's resident weights, like RSS on CPU
            info["cuda_peak_mb"] = max(info.get("cuda_peak_mb", 0.0), torch.cuda.max_memory_allocated() / 2**20)

    def close() -> None:
        params.clear()
        del optimizer.param_groups[:]
        gc.collect()

    training = "full" if variant == "full" else "dora" if dora else "lora"
    info = {"flops_per_step": analytic_flops(w, training), "dtype": w.dtype,
            "trainable_params": sum(p.numel() for p in params),
            "attention": getattr(model.config, "_attn_implementation", "unknown"),
            "rss_added_by_build_mb": rss_mb() - rss_before}
    if device == "cuda":
        info["cuda_resident_mb"] = torch.cuda.memory_allocated() / 2**20
    return Timed(name, "torch", training, run, info, close)


IMPLEMENTATIONS: dict[str, Callable[[Workload], Timed | None]] = {
    "jax_lora": lambda w: build_jax("jax_lora", w, "lora", chunked=True),
    "jax_lora_logits": lambda w: build_jax("jax_lora_logits", w, "lora", chunked=False),
    "torch_lora": lambda w: build_torch("torch_lora", w, "lora_torch", compiled=False),
    "torch_lora_compile": lambda w: build_torch("torch_lora_compile", w, "lora_torch", compiled=True),
    "peft": lambda w: build_torch("peft", w, "peft", compiled=False),
    "peft_compile": lambda w: build_torch("peft_compile", w, "peft", compiled=True),
    "jax_full": lambda w: build_jax("jax_full", w, "full", chunked=True),
    "torch_full": lambda w: build_torch("torch_full", w, "full", compiled=False),
    "qwix": lambda w: build_qwix("qwix", w),
    # bf16 compute on CPU (informational; fp32 is the headline): the same steps with the model in bfloat16.
    "jax_lora_bf16": lambda w: build_jax("jax_lora_bf16", dataclasses.replace(w, dtype="bfloat16"), "lora", chunked=True),
    "peft_bf16": lambda w: build_torch("peft_bf16", dataclasses.replace(w, dtype="bfloat16"), "peft", compiled=False),
    "jax_dora": lambda w: build_jax("jax_dora", w, "dora", chunked=True),
    "torch_dora": lambda w: build_torch("torch_dora", w, "lora_torch", compiled=False, dora=True),
    "peft_dora": lambda w: build_torch("peft_dora", w, "peft", compiled=False, dora=True),
}
# compare_implementations.py runs these unless --impls names others; the DoRA twins are benchmark_dora.py's.
LORA_COMPARISON = [name for name in IMPLEMENTATIONS if "dora" not in name and "bf16" not in name]
BF16_ROWS = ["jax_lora_bf16", "peft_bf16"]  # compare_implementations.py --bf16 times them beside their fp32 twins


def build_implementation(name: str, w: Workload) -> Timed | None:
    if name not in IMPLEMENTATIONS:
        raise SystemExit(f"Unknown implementation {name!r}; choose from {sorted(IMPLEMENTATIONS)}.")
    print(f"  building {name}", flush=True)
    return IMPLEMENTATIONS[name](w)


def matmul_peak_gflops(device: str, dtype: str, n: int | None = None) -> dict[str, Any]:
    """The best of a few square matmuls, in GFLOP/s: the roof MFU is measured against.

    On GPU this is the bf16 tensor-core rate of torch; on CPU the float32 rate of torch and of
    XLA (the larger is the roof, since both run on the same cores).
    """
    import jax
    import jax.numpy as jnp
    import torch

    n = n or (8192 if device == "gpu" else 1024)
    torch_dev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(n, n, device=torch_dev, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)

    def best(fn, repeats: int = 10) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / min(times) / 1e9

    torch_rate = best(lambda: (a @ a, sync()))
    x = jnp.asarray(a.float().cpu().numpy(), dtype=jnp.dtype(dtype))
    matmul = jax.jit(lambda m: m @ m)
    jax_rate = best(lambda: matmul(x).block_until_ready())
    return {"gflops": max(torch_rate, jax_rate), "torch_gflops": torch_rate, "jax_gflops": jax_rate,
            "shape": [n, n, n], "dtype": dtype}
