"""Peak memory (as `attnbench run` measures it) and best-of-N time per method, attention level.

usage: mem.py THREADS RES METHODS ROUNDS [impl overrides as method=impl]
"""
import sys, time, torch
from attnbench.bench.workloads import Point, build_workload
from attnbench.bench.memory import peak_memory
from attnbench.bench.sweep import parse_methods
from attnbench.models.configs import DIT_CONFIGS
torch.set_num_threads(int(sys.argv[1]))
res = [int(r) for r in sys.argv[2].split(",")]
specs = parse_methods(sys.argv[3])
rounds = int(sys.argv[4])
cfg = DIT_CONFIGS["DiT-Ti/2"]
for r in res:
    point = Point(cfg, r, 1)
    wls = {}
    for s in specs:
        wls[s.label if hasattr(s, "label") else s.name] = build_workload("attention", s.name, s.options, point, torch.float32, torch.device("cpu"))
    best = {k: float("inf") for k in wls}
    mem = {}
    with torch.inference_mode():
        for k, w in wls.items():
            w.fn(); w.fn()
            mem[k] = peak_memory(w.fn).peak_bytes
        for _ in range(rounds):
            for k, w in wls.items():
                reps = 3 if r <= 1024 else 1
                for _ in range(reps):
                    t = time.perf_counter(); w.fn(); best[k] = min(best[k], time.perf_counter() - t)
    sm = [k for k in wls if k.startswith("softmax")][0]
    for k, w in wls.items():
        print(f"{r}px {k:28s} {w.impl:9s} {best[k]*1e3:9.2f} ms  x{best[sm]/best[k]:7.2f}  "
              f"peak {mem[k]/2**20:7.2f} MiB  x{mem[k]/mem[sm]:5.2f}  model {w.predicted_bytes/2**20:7.2f} MiB", flush=True)
