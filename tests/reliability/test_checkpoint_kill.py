"""Fault injection: SIGKILL a process at random moments while it saves checkpoints, then restore.

A helper process imports ``lora_jax.training.checkpoint`` once and forks one writer per trial. The
writer saves checkpoints of tiny arrays in a loop (each save 5-60 ms, mostly fsyncs, almost all of its
life spent inside ``save_checkpoint``) and reports every completed save on a pipe. The test kills it
with SIGKILL after a random delay, then checks with the library's own ``latest_checkpoint`` and
``restore_checkpoint`` that the checkpoint on disk is whole (every value from one save) and is
either the newest save the writer reported or the one it was in the middle of: the old checkpoint
is never lost and never mixed with the new one. Half the writers start by saving the current step
again, which exercises the same-step replacement (an atomic directory exchange).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from lora_jax.training.checkpoint import (TrainState, latest_checkpoint, latest_intact_checkpoint,
                                          restore_checkpoint)

TRIALS = 60
CONFIG = {"rank": 1}

# The helper: forks writers on request, so no trial pays for a Python + JAX start.
HELPER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from lora_jax.training.checkpoint import TrainState, save_checkpoint

    def state(step, gen):
        value = np.float32(step * 1000 + gen)
        return TrainState(step=step, adapter={"a": np.full((3, 4), value), "b": np.full((4, 2), value)},
                          opt_state={"mu": np.full((3, 4), value), "count": np.array(step, np.int32)},
                          rng_key=np.array([gen, step], np.uint32), examples_seen=step * 1000 + gen,
                          losses=(float(value),), evals=((step, float(value)),))

    for line in sys.stdin:
        command, *rest = line.split()
        if command == "fork":
            root, start, gen = rest[0], int(rest[1]), int(rest[2])
            pid = os.fork()
            if pid == 0:  # the writer: save until killed
                for step in range(start, start + 100000):
                    save_checkpoint(root, state(step, gen), {"rank": 1}, keep=2)
                    os.write(1, f"saved {step} {gen}\\n".encode())
                os._exit(0)
            print(f"pid {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(rest[0]), 0)
            print(f"reaped {status}", flush=True)
""")


def _template() -> TrainState:
    zeros = np.float32(0)
    return TrainState(step=0, adapter={"a": np.full((3, 4), zeros), "b": np.full((4, 2), zeros)},
                      opt_state={"mu": np.full((3, 4), zeros), "count": np.array(0, np.int32)},
                      rng_key=np.zeros(2, np.uint32), examples_seen=0, losses=())


def _whole_save(state: TrainState) -> tuple[int, int]:
    """``(step, generation)`` of a restored state, after checking every value comes from that one save."""
    gen, step = (int(x) for x in np.asarray(state.rng_key))
    value = np.float32(step * 1000 + gen)
    assert state.step == step and state.examples_seen == step * 1000 + gen
    assert state.losses == (float(value),) and state.evals == ((step, float(value)),)
    for name, leaf in {**state.adapter, "mu": state.opt_state["mu"]}.items():
        assert np.all(np.asarray(leaf) == value), (name, np.asarray(leaf))
    assert int(state.opt_state["count"]) == step
    return step, gen


def test_sigkill_during_saves_never_loses_or_mixes_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    helper = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, bufsize=1)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in helper.stdout], daemon=True).start()
    rng = random.Random(0)
    known, saves_seen, killed_mid_first_save = None, 0, 0  # known: the newest (step, gen) known to be on disk
    started = time.perf_counter()
    try:
        for gen in range(1, TRIALS + 1):
            # Half the writers first save the current step again (same-step replacement), half go on.
            start = 1 if known is None else known[0] + (gen % 2)
            helper.stdin.write(f"fork {root} {start} {gen}\n")
            pid = int(lines.get(timeout=60).split()[1])
            time.sleep(rng.uniform(0.0, 0.2))  # a save takes 5-60 ms (fsyncs): from the first one to several
            os.kill(pid, signal.SIGKILL)  # the writer only; the helper lives on
            helper.stdin.write(f"reap {pid}\n")
            reported = []
            while not (line := lines.get(timeout=60)).startswith("reaped"):
                reported.append(tuple(int(x) for x in line.split()[1:]))
            assert int(line.split()[1]) & 0x7F == signal.SIGKILL  # killed, not finished
            saves_seen += len(reported)
            killed_mid_first_save += not reported

            newest_reported = reported[-1] if reported else known
            in_progress = ((newest_reported[0] + 1, gen) if reported else (start, gen))
            path = latest_checkpoint(root)
            if path is None:  # only possible before the very first save completed
                assert known is None and not reported
                continue
            assert latest_intact_checkpoint(root) == (path, ())  # nothing on disk is ever damaged
            on_disk = _whole_save(restore_checkpoint(path, _template(), CONFIG))
            assert on_disk in {newest_reported, in_progress}, (on_disk, newest_reported, in_progress)
            known = on_disk
    finally:
        helper.kill()
        helper.wait()
    elapsed = time.perf_counter() - started
    print(f"{TRIALS} kills, {saves_seen} completed saves, {killed_mid_first_save} writers killed in their "
          f"first save, {elapsed:.1f} s")
    assert known is not None and saves_seen > TRIALS  # the kills landed all over many saves
    assert killed_mid_first_save > 0  # and some inside the first one, including same-step replacements
    leftovers = [p.name for p in root.iterdir() if not p.name.startswith("step_")]
    assert len(leftovers) <= 1  # at most the temp dir of the last kill: each save removes older ones
