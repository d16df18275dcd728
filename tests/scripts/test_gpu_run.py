"""scripts/gpu_run.py rehearsed on the CPU, so that the GPU run cannot rot.

Two calls of ``--dry-run`` on one run folder (the same stages and files as on a
GPU, with a tiny DiT in float32): the first with the model stage capped at a
few seconds, so it is cut short; the second resumes (and runs the attention
stage again, whose points ``attnbench run`` must find done). Besides, a stage
deadline stopping a job that writes rows is checked on a fake job, and the
H200 plan is printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_run.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module
    spec.loader.exec_module(module)
    return module


gpu_run = _load_script()


def _dry_run(run_dir: Path, returned: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--run-dir", str(run_dir), "--return-dir",
         str(returned), "--no-report", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    """Two dry runs on one folder: the first cut short in the model stage, the second resuming."""
    root = tmp_path_factory.mktemp("gpu_run")
    run_dir = root / "run"
    first = _dry_run(run_dir, root / "out1", "--stage-seconds", "model=5",
                     "--total-seconds", "400")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    model_rows = (run_dir / "model" / "results.jsonl")
    kept = model_rows.read_text().splitlines() if model_rows.exists() else []
    attention = (run_dir / "attention" / "results.jsonl").read_text().splitlines()
    second = _dry_run(run_dir, root / "out2", "--redo", "attention", "--total-seconds", "400")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "kept_model": kept, "attention": attention,
            "first": first, "second": second}


def _stages(returned: Path) -> dict:
    return json.loads((returned / "stages.json").read_text())["stages"]


@pytest.mark.parametrize("call", ["out1", "out2"])
def test_it_returns_the_same_few_flat_files(calls, call):
    returned = calls["root"] / call
    names = sorted(p.name for p in returned.iterdir())
    assert names == sorted(gpu_run.RETURNED)
    assert len(names) <= 8
    for p in returned.iterdir():
        assert p.is_file() and p.stat().st_size <= 16 * 2**20
    with tarfile.open(returned / "results.tar.gz") as tar:
        members = set(tar.getnames())
    for name in ("run/summary.md", "run/stages.json", "run/attention/results.jsonl",
                 "run/kernel_tests.txt", "run/env.txt"):
        assert name in members


def test_the_summary_lists_every_stage_and_target_with_a_status(calls):
    text = (calls["root"] / "out2" / "summary.md").read_text()
    stages = text.split("## Stages", 1)[1].split("\n## ", 1)[0]  # the stages table alone
    stage_lines = {line.split("|")[2].strip(): line for line in stages.splitlines()
                   if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert set(stage_lines) == {s.key for s in gpu_run.STAGES}
    statuses = ("done", "done earlier", "cut short", "failed", "skipped", "not started")
    for line in stage_lines.values():
        assert line.split("|")[3].strip() in statuses, line
    for target in gpu_run.TARGETS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {target.name} |"))
        assert line.rstrip(" |").split("| ")[-1].split(" (")[0] in ("met", "MISSED",
                                                                    "not measured")
    # the floors need a GPU; the adapter's stage says why it did not run
    stages = _stages(calls["root"] / "out2")
    assert stages["floors"]["status"] == "skipped" and "CUDA" in stages["floors"]["reason"]
    assert stages["diffusers"]["status"] in ("skipped", "done", "done earlier", "cut short",
                                             "failed")
    assert stages["diffusers"]["status"] != "skipped" or stages["diffusers"]["reason"]


def test_a_stage_deadline_cuts_the_stage_and_keeps_its_finished_points(calls):
    first = _stages(calls["root"] / "out1")
    assert first["model"]["status"] == "cut short"
    assert first["attention"]["status"] == "done"  # the next stage started on time
    final = (calls["run_dir"] / "model" / "results.jsonl").read_text().splitlines()
    for line in calls["kept_model"]:
        assert final.count(line) == 1  # kept as measured, not measured again
    second = _stages(calls["root"] / "out2")
    assert second["model"]["status"] == "done"
    job = second["model"]["jobs"][0]
    assert job["final"] == job["planned"]
    assert job["resumed"] == sum(json.loads(x)["status"] in gpu_run.FINAL
                                 for x in calls["kept_model"])


def test_a_second_call_resumes(calls):
    second = _stages(calls["root"] / "out2")
    assert second["kernels"]["status"] == "done earlier"
    job = second["attention"]["jobs"][0]
    assert not job["earlier"] and job["new"] == 0 and job["resumed"] == job["planned"]
    after = (calls["run_dir"] / "attention" / "results.jsonl").read_text().splitlines()
    assert after == calls["attention"]  # attnbench run found every point done


def test_a_deadline_stops_a_job_and_keeps_the_rows_it_wrote(tmp_path):
    rows = tmp_path / "results.jsonl"
    writer = ("import json, sys, time\n"
              "for i in range(10_000):\n"
              "    with open(sys.argv[1], 'a') as f:\n"
              "        f.write(json.dumps({'method': 'm', 'options': '{}', 'level': 'l', "
              "'resolution': i, 'status': 'ok'}) + '\\n')\n"
              "    print('row', i, flush=True)\n"
              "    time.sleep(0.05)\n")
    log = gpu_run.Log([tmp_path / "log"])
    started = time.monotonic()
    out = gpu_run.run_job([sys.executable, "-c", writer, str(rows)], deadline=started + 3.0,
                          log=log, prefix="[fake] ")
    assert out.cut and out.rc is not None and out.rc != 0
    assert time.monotonic() - started < 3.0 + sum(gpu_run.STOP_GRACE_S) + 5
    with rows.open("a") as f:
        f.write('{"method": "m", "opti')  # what a writer stopped mid-row leaves
    assert gpu_run.repair_tail(tmp_path)
    kept = gpu_run.read_rows(tmp_path)
    assert len(kept) >= 1 and rows.read_text().endswith("\n")
    assert "[fake] row 0" in (tmp_path / "log").read_text()


def test_matching_rows_to_method_variants():
    row = {"method": "clear", "options": json.dumps({"radius": 8.0})}
    assert gpu_run.matches(row, "clear:radius=8")
    assert not gpu_run.matches(row, "clear:radius=16")
    assert not gpu_run.matches(row, "sla:topk=0.05")
    assert gpu_run.matches({"method": "lit", "options": "{}"}, "lit")


def test_bad_flags_are_refused_with_the_accepted_values():
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--stage-seconds", "modle=5"])
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--redo", "everything"])


def test_the_plan_gives_every_stage_a_time_for_the_h200():
    text = gpu_run.plan(gpu_run.GPU, kernel_tests=60)
    for stage in gpu_run.STAGES:
        assert any(line.startswith(stage.key + " ") for line in text.splitlines()), stage.key
    assert "softmax" in text and "8192 px" in text


def test_the_peers_stage_gives_every_peer_a_row_checked_or_saying_why_not(calls):
    rows = gpu_run.read_peers(calls["run_dir"] / "peers")
    keys = {r["key"] for r in rows}
    for key in ("exact/sdpa-flash", "exact/flex", "lit/attnbench", "lit/fla", "lit/torch",
                "sla/attnbench/0.05", "sla/official/0.05", "sla/official/0.1"):
        assert key in keys, key
    assert any(k.startswith("clear/masked_sdpa/") for k in keys)
    for r in rows:
        assert r["label"]
        if r["status"] == "ok":  # float32 on CPU: every peer that ran computes its function
            assert r["check"]["rel_l2_err"] < 1e-5 and r["check"]["finite"], r["key"]
        else:
            assert r["status"] == "unavailable" and r["reason"], r["key"]
    assert "causal" in next(r for r in rows if r["key"] == "lit/fla")["label"]
    second = _stages(calls["root"] / "out2")
    assert second["peers"]["status"] == "done earlier"
    text = (calls["root"] / "out2" / "summary.md").read_text()
    assert "## Peers" in text and "vs sdpa-flash" in text and "NATTEN" in text


def test_a_missed_target_is_profiled(calls):
    stages = _stages(calls["root"] / "out1")
    assert stages["profile"]["status"] == "done", stages["profile"]
    assert (calls["run_dir"] / "profile" / "profile.md").exists()
    assert (calls["run_dir"] / "profile" / "trace.json.gz").exists()
    text = (calls["root"] / "out2" / "summary.md").read_text()
    assert "required ≥" in text.split("## Where the time went", 1)[1]


def test_the_targets_are_read_from_the_one_csv():
    from attnbench.bench import floor, targets

    assert gpu_run.load_targets is floor.load_targets is targets.load_targets
    names = [t.name for t in gpu_run.TARGETS]
    assert names == [t.name for t in floor.load_targets()]
    assert {t.kind for t in gpu_run.TARGETS} == {"speedup", "peer", "bandwidth"}
    assert floor.bandwidth_target() == next(t.minimum for t in gpu_run.TARGETS
                                            if t.kind == "bandwidth")
