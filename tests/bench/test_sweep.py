"""Sweeps: method specs, skip/oom/error rows, the results table, resume, and the run CLI."""

from __future__ import annotations

import json

import pytest
import torch

from attnbench import results
from attnbench.attention.specs import parse_methods
from attnbench.bench import memory, sweep, timer
from attnbench.cli import main
from attnbench.models.configs import get_config
from attnbench.results import ResultsWriter, SchemaError, load_table

TINY = get_config("DiT-T/2")


def _plan(**kw) -> sweep.SweepPlan:
    defaults = dict(config=TINY, methods=parse_methods("softmax,lit"), resolutions=[64],
                    levels=["attention"], budget_s=30.0, rep_budget_s=0.01)
    return sweep.SweepPlan(**{**defaults, **kw})


CALIB = sweep.Calibration(flops_per_s=1e10, bytes_per_s=1e10)


def test_parse_methods_variants_and_shared_options():
    specs = parse_methods("softmax,clear:radius=16,clear", ["clear.radius=4"])
    assert [s.label for s in specs] == ["softmax", "clear:radius=16.0", "clear:radius=4.0"]
    with pytest.raises(ValueError, match="unknown attention method 'clearr'"):
        parse_methods("clearr")
    with pytest.raises(ValueError, match="unknown option 'radius'"):
        parse_methods("lit:radius=3")
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_methods("clear", ["radius=3"])
    with pytest.raises(ValueError, match="not in --methods"):
        parse_methods("softmax", ["clear.radius=3"])


def test_points_predicted_over_budget_are_skipped_with_the_reason():
    row = sweep.run_point(_plan(budget_s=1e-9), 64, "attention",
                          sweep.MethodSpec("softmax"), CALIB)
    assert row.status == "skipped" and row.reason.startswith("predicted")
    assert "> budget 1e-09 s" in row.reason and row.latency_median_s is None


def test_points_over_free_memory_are_skipped(monkeypatch):
    monkeypatch.setattr(sweep, "free_memory", lambda device: 1024)
    row = sweep.run_point(_plan(), 64, "attention", sweep.MethodSpec("softmax"), CALIB)
    assert row.status == "skipped" and "GiB free" in row.reason


def test_a_real_oom_becomes_a_row(monkeypatch):
    def exploding(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 180.00 GiB")

    monkeypatch.setattr(sweep, "build_workload", exploding)
    row = sweep.run_point(_plan(), 64, "attention", sweep.MethodSpec("lit"), CALIB)
    assert row.status == "oom" and "180.00 GiB" in row.reason


def test_unavailable_methods_say_why():
    row = sweep.run_point(_plan(), 64, "attention", sweep.MethodSpec("flash"), CALIB)
    assert row.status == "unavailable" and "CUDA" in row.reason


def test_a_sweep_writes_rows_as_it_goes_and_resumes(tmp_path):
    plan = _plan(levels=["attention", "block"])
    writer = ResultsWriter(tmp_path, {"command": "test"})
    rows = sweep.run_sweep(plan, writer, progress=False)
    assert len(rows) == 4 and all(r.status == "ok" for r in rows), [r.reason for r in rows]
    soft = next(r for r in rows if r.method == "softmax" and r.level == "attention")
    lit = next(r for r in rows if r.method == "lit" and r.level == "attention")
    assert soft.speedup_vs_softmax == 1.0
    assert lit.speedup_vs_softmax == pytest.approx(soft.latency_median_s / lit.latency_median_s)
    assert lit.flops_counted == pytest.approx(lit.flops_actual)
    for name in ("results.csv", "results.json", "results.jsonl", "meta.json"):
        assert (tmp_path / name).exists()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4

    # an interrupted run leaves a torn last line: the rerun measures only what is missing
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    writer = ResultsWriter(tmp_path, {"command": "test again"})
    rows = sweep.run_sweep(plan, writer, progress=False)
    assert len(rows) == 4
    assert len(json.loads((tmp_path / "meta.json").read_text())["history"]) == 1
    frame, meta = load_table(tmp_path)
    assert len(frame) == 4 and meta["command"] == "test again"


def test_results_from_another_version_are_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 0, "rows": []}))
    with pytest.raises(SchemaError, match="schema 0.*re-run"):
        load_table(tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps({"method": "softmax"}) + "\n\n")
    with pytest.raises(SchemaError, match="another attnbench version"):
        results.load_rows(tmp_path / "results.jsonl")
    with pytest.raises(FileNotFoundError, match="no results at"):
        load_table(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no results"):
        load_table(tmp_path / "empty")


# --------------------------------------------------------------------------- the CLI


def test_run_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--res", "64", "--model", "DiT-T/2", "--methods", "softmax,lit,sla",
            "--level", "attention", "--out", str(out), "--no-progress", "--budget", "20"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "softmax" in printed.out and "speedup_vs_softmax" in printed.out
    frame, meta = load_table(out)
    assert set(frame["status"]) == {"ok"}
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert "git_revision" in meta and "run --res 64" in meta["command"]
    sla = frame[frame["method"] == "sla"].iloc[0]
    assert "block_map" in json.loads(sla["overheads"]) and sla["overhead_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--res", "1000"], "not a multiple of 16.*992 or 1008"),
        (["--methods", "sofmax"], "did you mean 'softmax'"),
        (["--methods", "clear:radius=-1"], "radius"),
        (["--device", "cuda" if not torch.cuda.is_available() else "tpu"], "cuda|cpu"),
        (["--level", "kernel"], "not one of attention, block, model"),
        (["--dtype", "int8"], "--dtype .int8.: choose one of float32, bfloat16, float16"),
        (["--out", "/proc/attnbench-cannot-write"], "cannot write to run directory"),
    ],
)
def test_run_cli_bad_input(args, message, capsys, tmp_path):
    base = ["run", "--model", "DiT-T/2", "--res", "64", "--no-progress"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "r")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_import_benchmark_json(tmp_path, capsys):
    info = dict(method="lit", options="{}", level="attention", resolution=64, tokens=16,
                batch=1, dtype="float32", device="cpu", model="DiT-T/2", heads=4, head_dim=16,
                impl="reference", flops_actual=67584.0, flops_dense=65536.0)
    bench = [
        {"name": f"test_benchmark[{m}]", "extra_info": {**info, "method": m},
         "stats": {"median": t, "rounds": 5, "q1": t, "q3": t, "data": [t] * 5}}
        for m, t in (("softmax", 2e-3), ("lit", 1e-3))
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": bench, "machine_info": {"node": "x"}}))
    assert main(["import-benchmark", str(path), "--out", str(tmp_path / "table")]) == 0
    frame, meta = load_table(tmp_path / "table")
    lit = frame[frame["method"] == "lit"].iloc[0]
    assert lit["speedup_vs_softmax"] == pytest.approx(2.0)
    assert lit["latency_p20_s"] == pytest.approx(1e-3)
    assert meta["source"] == "pytest-benchmark"

    path.write_text(json.dumps({"benchmarks": [{"name": "other", "extra_info": {}}]}))
    assert main(["import-benchmark", str(path)]) == 2
    assert "only tests/bench/ results import" in capsys.readouterr().err


def test_import_benchmark_keeps_a_users_file_without_force(tmp_path, capsys):
    info = dict(method="softmax", options="{}", level="attention", resolution=64, tokens=16,
                batch=1, dtype="float32", device="cpu", model="DiT-T/2", heads=4, head_dim=16)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [
        {"name": "test_benchmark[softmax]", "extra_info": info,
         "stats": {"median": 1e-3, "rounds": 3, "q1": 1e-3, "q3": 1e-3, "data": [1e-3] * 3}}]}))
    out = tmp_path / "table"
    out.mkdir()
    (out / "results.csv").write_text("my,own\n1,2\n")
    assert main(["import-benchmark", str(path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "my,own\n1,2\n"
    assert main(["import-benchmark", str(path), "--out", str(out), "--force"]) == 0
    assert load_table(out)[0]["method"].tolist() == ["softmax"]


def _fake_measure(calls):
    def measure(fn, device, **kwargs):
        calls.append(kwargs.get("limit_s"))
        return timer.Timing(median=1.0, p20=1.0, p80=1.0, mean=1.0, min=1.0, reps=1,
                            warmup_s=0.0, timer="fake", l2_flush=False)
    return measure


def test_the_baseline_is_measured_past_the_budget_when_the_others_ran(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "measure", _fake_measure(calls))
    monkeypatch.setattr(sweep, "calibrate", lambda device, dtype: CALIB)
    monkeypatch.setattr(sweep, "peak_memory", lambda fn, device: memory.PeakMemory(1, 0, "fake"))
    slow = {"softmax": 1e3, "lit": 0.0}  # predicted seconds: softmax far over the budget

    def predicted(plan, row):
        return (f"predicted {slow[row.method]:g} s > budget {plan.budget_s:g} s"
                if slow[row.method] > plan.budget_s else None)

    monkeypatch.setattr(sweep, "_over_time", predicted)
    plan = _plan(methods=parse_methods("softmax,lit"))
    rows = sweep.run_sweep(plan, ResultsWriter(tmp_path / "a", {}), progress=False)
    soft = next(r for r in rows if r.method == "softmax")
    assert soft.status == "ok" and "measured anyway" in soft.extra["past_budget"]
    assert soft.speedup_vs_softmax == 1.0 and calls and all(c == 15.0 for c in calls)
    # alone, nothing is compared with it: the prediction skips it
    alone = sweep.run_sweep(_plan(methods=parse_methods("softmax")),
                            ResultsWriter(tmp_path / "b", {}), progress=False)
    assert alone[0].status == "skipped" and alone[0].reason.startswith("predicted 1000 s")


def test_the_baseline_runs_after_the_methods_compared_with_it():
    specs = parse_methods("softmax,lit,clear")
    points = sweep.baseline_last([(r, "attention", s) for r in (64, 128) for s in specs])
    assert [(r, s.name) for r, _, s in points] == [
        (64, "lit"), (64, "clear"), (64, "softmax"), (128, "lit"), (128, "clear"),
        (128, "softmax")]
