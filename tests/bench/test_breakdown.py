"""The stage breakdown: the ranges a path marks, summed per call, and what they leave."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import record_function

from attnbench import attention
from attnbench.bench.breakdown import stage_times


def test_stages_are_summed_per_call_and_other_is_the_rest():
    def fn():
        with record_function("toy.first"):
            torch.ones(256, 256).sum()
        for _ in range(2):  # a stage entered twice per call counts twice
            with record_function("toy.second"):
                torch.ones(256, 256).sum()
        torch.ones(256, 256).sum()

    stages = stage_times(fn, calls=2)
    assert set(stages) == {"toy.first", "toy.second", "other"}
    assert all(t >= 0 for t in stages.values()) and stages["toy.first"] > 0


def test_a_call_without_stages_has_no_breakdown():
    assert stage_times(lambda: torch.ones(64).sum(), calls=1) == {}


@pytest.mark.parametrize("name, options, stages", [
    ("clear", {"radius": 3.0}, {"halo.gather", "halo.mask", "halo.sdpa", "halo.scatter"}),
    ("sla", {"topk": 0.2}, {"sla.state", "sla.gather", "sla.sdpa", "sla.linear"}),
    ("lit", {}, {"lit.state", "lit.readout"}),
])
def test_each_cpu_path_marks_its_stages(name, options, stages):
    q, k, v = (torch.randn(1, 2, 16 * 16, 16) for _ in range(3))
    backend = attention.get(name)
    with torch.inference_mode():
        found = stage_times(lambda: backend.attend(q, k, v, grid=(16, 16), **options), calls=1)
    assert set(found) == stages | {"other"}
