"""Honest labels in sweep rows: the path that ran and why faster ones did not, the density,
the options after rounding and the rounding warning -- from the sweep to the report."""

from __future__ import annotations

import json
import math

import torch

from attnbench import attention
from attnbench.attention.specs import parse_methods
from attnbench.bench import sweep
from attnbench.bench.workloads import Point
from attnbench.cli import main
from attnbench.models.configs import get_config

TINY = get_config("DiT-T/2")
CALIB = sweep.Calibration(flops_per_s=1e10, bytes_per_s=1e10)


def _row(method: str, res: int = 256):
    spec = parse_methods(method)[0]
    plan = sweep.SweepPlan(config=TINY, methods=[spec], resolutions=[res], levels=["attention"],
                           budget_s=30.0, rep_budget_s=0.01)
    return sweep.run_point(plan, res, "attention", spec, CALIB)


def test_row_density_and_effective_options_come_from_the_backend():
    grid = Point(TINY, 256, 1).grid
    for method, density in (("softmax", 1.0), ("lit", 0.0)):
        row = _row(method)
        assert row.status == "ok" and row.density == density and row.effective == ""
    sla = _row("sla:topk=0.05")  # 16x16 tokens = 4 blocks of 64: one block kept
    assert sla.density == 0.25
    effective = json.loads(sla.effective)
    assert effective["kept_blocks"] == 1 and effective["effective_topk"] == 0.25
    assert sla.extra["warning"] == attention.get("sla").rounding_warning(grid, topk=0.05)
    clear = _row("clear:radius=4")
    assert math.isclose(clear.density, attention.get("clear").density(grid, radius=4.0))
    assert 0 < clear.density < 1 and "warning" not in clear.extra


def test_row_impl_is_the_selection_and_says_what_was_passed_over():
    for method in ("softmax", "lit", "clear", "sla"):
        row = _row(method)
        selection = attention.get(method).selection("cpu", torch.float32, (1, row.heads,
                                                    row.tokens, row.head_dim))
        assert row.impl == selection.path
        if selection.passed_over:
            assert row.extra["passed_over"] == selection.passed_over
        else:
            assert "passed_over" not in row.extra


def test_sweep_to_report_shows_requested_and_effective(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--model", "DiT-T/2", "--res", "256", "--level", "attention",
                 "--methods", "softmax,sla:topk=0.05,lit", "--budget", "20", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("sla:topk=0.05 keeps 1 of 4 blocks (25%)") == 1  # once per point
    md = (out / "report.md").read_text()
    assert "sla:topk=0.05 (kept 25%)" in md
    assert "warning: sla:topk=0.05 keeps 1 of 4 blocks (25%)" in md
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"]: r["density"] for r in rows} == {"softmax": 1.0, "sla": 0.25, "lit": 0.0}


def _old_sla_row(tmp_path):
    """An `sla` row measured when the defaults were attnbench's tiles and the marginal
    linear branch: its options say nothing, its effective record says what ran."""
    row = _row("sla")
    effective = {**json.loads(row.effective), "order": "tiles", "linear_over": "marginal",
                 "blocks": "tiles 8x8"}
    row.effective = json.dumps(effective, sort_keys=True)
    return row


def test_rows_measured_before_a_default_changed_keep_saying_what_ran(tmp_path):
    import pandas as pd

    from attnbench.report.tables import enrich
    from attnbench.results import ResultsWriter

    old, new = _old_sla_row(tmp_path), _row("sla")
    assert old.options == new.options == "{}"
    frame = enrich(pd.DataFrame([old.as_row(), new.as_row()]))
    assert list(frame["label"]) == ["sla:linear_over=marginal:order=tiles", "sla"]
    # resuming a run folder: the old row is not today's `sla`, so `sla` is measured again
    writer = ResultsWriter(tmp_path / "run", {})
    writer.append(old)
    spec = parse_methods("sla")[0]
    plan = sweep.SweepPlan(config=TINY, methods=[spec], resolutions=[256],
                           levels=["attention"], budget_s=30.0, rep_budget_s=0.01)
    key = sweep._base_row(plan, 256, "attention", spec).key()
    assert key in writer.done() and key not in writer.done(sweep._stated_row)
    writer.append(new)
    assert key in writer.done(sweep._stated_row)
