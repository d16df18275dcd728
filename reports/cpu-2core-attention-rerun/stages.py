"""Stage breakdown (bench/breakdown.stage_times) of the new CPU paths, THREADS threads."""
import sys, torch
from attnbench import attention
from attnbench.bench.breakdown import stage_times
torch.set_num_threads(int(sys.argv[1]))
for g in (64, 128):
    q, k, v = (torch.randn(1, 3, g * g, 64) for _ in range(3))
    for name, o in (("clear", {"radius": 16.0}), ("clear", {}), ("sla", {}), ("sla", {"topk": 0.2}), ("lit", {})):
        be = attention.get(name)
        opts = be.resolve(be.attend_options(o))
        with torch.inference_mode():
            st = min((stage_times(lambda: be.attend(q, k, v, grid=(g, g), **opts)) for _ in range(2)),
                     key=lambda s: sum(s.values()))
        tot = sum(st.values())
        print(f"| {g*16} | {name}{':' + ','.join(f'{a}={b}' for a, b in o.items()) if o else ''} | {tot*1e3:.1f} | " +
              ", ".join(f"{k} {v*1e3:.1f} ms ({100*v/tot:.0f}%)" for k, v in sorted(st.items(), key=lambda kv: -kv[1])) + " |", flush=True)
