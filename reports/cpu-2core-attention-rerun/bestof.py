"""Best-of time and peak memory (as `attnbench run` measures it) per method, attention level.

usage: bestof.py THREADS RES[,RES...] METHODS ROUNDS
Every method is built once and warmed twice; peak memory is measured as the harness does;
then ROUNDS interleaved rounds time each method (3 calls per round up to 1024 px, 1 above).
Prints the best time, its ratio to softmax SDPA's best in this process, and the peak.
"""
import sys
import time

import torch

from attnbench.bench.memory import peak_memory
from attnbench.bench.sweep import parse_methods
from attnbench.bench.workloads import Point, build_workload
from attnbench.models.configs import DIT_CONFIGS

torch.set_num_threads(int(sys.argv[1]))
specs = parse_methods(sys.argv[3])
rounds = int(sys.argv[4])
for res in (int(r) for r in sys.argv[2].split(",")):
    point = Point(DIT_CONFIGS["DiT-Ti/2"], res, 1)
    loads = {s.label: build_workload("attention", s.name, s.options, point, torch.float32,
                                     torch.device("cpu")) for s in specs}
    best = dict.fromkeys(loads, float("inf"))
    peak = {}
    with torch.inference_mode():
        for label, load in loads.items():
            load.fn()
            load.fn()
            peak[label] = peak_memory(load.fn).peak_bytes
        for _ in range(rounds):
            for label, load in loads.items():
                for _ in range(3 if res <= 1024 else 1):
                    start = time.perf_counter()
                    load.fn()
                    best[label] = min(best[label], time.perf_counter() - start)
    base = next(label for label in loads if label.startswith("softmax"))
    for label, load in loads.items():
        print(f"{res}px {label:28s} {load.impl:9s} {best[label] * 1e3:9.2f} ms  "
              f"x{best[base] / best[label]:7.2f}  peak {peak[label] / 2**20:7.2f} MiB  "
              f"x{peak[label] / peak[base]:5.2f}  model {load.predicted_bytes / 2**20:7.2f} MiB",
              flush=True)
