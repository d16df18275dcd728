"""The stage breakdown (attnbench.bench.breakdown.stage_times) of the CPU paths, best of 2.

usage: stages.py THREADS   (DiT-Ti/2 attention shapes at 1024 and 2048 px)
"""
import sys

import torch

from attnbench import attention
from attnbench.bench.breakdown import stage_times

METHODS = (("clear", {"radius": 16.0}), ("clear", {}), ("sla", {}), ("sla", {"topk": 0.2}),
           ("lit", {}))

torch.set_num_threads(int(sys.argv[1]))
for side in (64, 128):
    q, k, v = (torch.randn(1, 3, side * side, 64) for _ in range(3))
    for name, options in METHODS:
        backend = attention.get(name)
        opts = backend.resolve(backend.attend_options(options))

        def call(backend=backend, opts=opts, qkv=(q, k, v), grid=(side, side)):
            return backend.attend(*qkv, grid=grid, **opts)

        with torch.inference_mode():
            stages = min((stage_times(call) for _ in range(2)), key=lambda s: sum(s.values()))
        total = sum(stages.values())
        label = name + "".join(f":{key}={value}" for key, value in options.items())
        parts = ", ".join(f"{stage} {t * 1e3:.1f} ms ({100 * t / total:.0f}%)"
                          for stage, t in sorted(stages.items(), key=lambda kv: -kv[1]))
        print(f"| {side * 16} | {label} | {total * 1e3:.1f} | {parts} |", flush=True)
