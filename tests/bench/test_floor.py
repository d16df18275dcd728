"""attnbench.bench.floor on the CPU: the targets of baselines/targets.csv against a sweep's
results (each over the fastest exact kernel), and the profiler over one point."""

from __future__ import annotations

import pandas as pd
import torch

from attnbench.bench import floor


def test_targets_are_judged_over_the_fastest_exact_kernel(tmp_path):
    rows = [("softmax", "{}", 2.0), ("flash", "{}", 1.0), ("lit", "{}", 0.004),
            ("clear", '{"radius": 8.0}', 0.02)]
    pd.DataFrame([{"method": m, "options": o, "level": "attention", "resolution": 8192,
                   "height": None, "status": "ok", "latency_median_s": s}
                  for m, o, s in rows]).to_csv(tmp_path / "results.csv", index=False)
    text = floor.targets_markdown(tmp_path, 8192)
    lines = {ln.split("|")[2].strip(): ln for ln in text.splitlines()
             if ln.startswith("| attention |")}
    assert "250.0×" in lines["lit"] and "MISSED" in lines["lit"]  # 1.0 / 0.004 < 400
    assert "flash" in lines["lit"]  # the faster exact kernel is the baseline
    assert "50.0×" in lines["clear:radius=8.0"]
    assert "not measured" in lines["sla:topk=0.05"]


def test_the_profiler_writes_a_table_and_a_trace(tmp_path):
    text = floor.profile_point("DiT-T/2", 128, "attention", "lit", torch.float32,
                               torch.device("cpu"), tmp_path, calls=1)
    assert "aten::" in text and (tmp_path / "trace.json.gz").stat().st_size > 0
