"""Softmax SDPA, a method's previous path and its current one, interleaved in one process.

usage: after.py THREADS OLD_TREE ROUNDS RES:METHOD[:opt=value...] [RES:METHOD...]
OLD_TREE is a folder holding the previous revision's ``attnbench/`` (``git archive REV
attnbench | tar -x -C OLD_TREE``); it is imported beside this worktree's code as
``attnbench_old``, so both run on the same inputs in the same process. Per point every
callable is warmed twice and its peak memory taken as the harness does; then ROUNDS
interleaved rounds time softmax, previous, current (3 calls per round up to 1024 px, 1
above). Prints each best time, its ratio to softmax's best in this process, the peak, and
the current path's stage breakdown (``attnbench.bench.breakdown.stage_times``).
"""
import os
import sys
import tempfile
import time

import torch

from attnbench import attention
from attnbench.bench.breakdown import stage_times
from attnbench.bench.memory import peak_memory

threads, old_tree, rounds = int(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3])
alias = tempfile.mkdtemp()
os.symlink(os.path.join(old_tree, "attnbench"), os.path.join(alias, "attnbench_old"))
sys.path.insert(0, alias)
import attnbench_old.attention as old_attention  # noqa: E402

torch.set_num_threads(threads)
for point in sys.argv[4:]:
    res, name, *opts = point.split(":")
    options = {key: float(value) for key, value in (o.split("=") for o in opts)}
    side = int(res) // 16  # DiT-Ti/2: 8× VAE, patch 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, side * side, 64, generator=gen) for _ in range(3))
    calls = {}
    for label, registry, method, opt in (("softmax", attention, "softmax", {}),
                                          ("previous", old_attention, name, options),
                                          ("current", attention, name, options)):
        backend = registry.get(method)
        resolved = backend.resolve(backend.attend_options(opt))
        impl = backend.select("cpu", torch.float32, tuple(q.shape))
        calls[label] = (impl, lambda b=backend, o=resolved, qkv=(q, k, v), g=(side, side):
                        b.attend(*qkv, grid=g, **o))
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        peak = {}
        for label, (_, fn) in calls.items():
            fn()
            fn()
            peak[label] = peak_memory(fn).peak_bytes
        for _ in range(rounds):
            for label, (_, fn) in calls.items():
                for _ in range(3 if side <= 64 else 1):
                    start = time.perf_counter()
                    fn()
                    best[label] = min(best[label], time.perf_counter() - start)
        stages = stage_times(calls["current"][1])
    for label, (impl, _) in calls.items():
        print(f"{res}px {point:24s} {label:8s} {impl:8s} {best[label] * 1e3:9.2f} ms  "
              f"x{best['softmax'] / best[label]:7.2f}  peak {peak[label] / 2**20:6.2f} MiB  "
              f"x{peak[label] / peak['softmax']:5.2f}", flush=True)
    total = sum(stages.values())
    print(f"{res}px {point} current stages (profiled, {total * 1e3:.2f} ms): " + ", ".join(
        f"{stage} {t * 1e3:.2f} ms ({100 * t / total:.0f}%)"
        for stage, t in sorted(stages.items(), key=lambda kv: -kv[1])), flush=True)
