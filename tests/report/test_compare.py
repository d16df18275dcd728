"""``python -m attnbench compare RUN_A RUN_B``: differences, flags, exit codes for CI."""

from __future__ import annotations

import pytest

from attnbench.cli import main
from attnbench.report.compare import Thresholds, compare_frames
from attnbench.report.tables import load_run

from .conftest import point, quality_rows, speed_rows, write_run

RES = (256, 512)


@pytest.fixture
def base(tmp_path):
    return write_run(tmp_path / "a", speed_rows(resolutions=RES) + quality_rows())


def test_a_2x_slowdown_is_flagged_and_fails_the_ci_job(base, tmp_path, capsys):
    slow = write_run(tmp_path / "b", speed_rows(scale=2.0, resolutions=RES) + quality_rows())
    assert main(["compare", str(base), str(slow)]) == 0  # a report, not a verdict
    out = capsys.readouterr().out
    assert out.startswith("# attnbench compare: `b` against `a`")
    assert "latency ±10%" in out  # the thresholds in force are stated
    assert "| lit | attention | 256 | ok | 1.00 | 2.00 | +100.0% |" in out
    assert "**slower 2.00×**" in out
    assert main(["compare", str(base), str(slow), "--fail-if-regression"]) == 1
    captured = capsys.readouterr()
    assert "regression(s) beyond the thresholds" in captured.err
    # a looser threshold lets the same change through
    assert main(["compare", str(base), str(slow), "--fail-if-regression",
                 "--latency-threshold", "150%"]) == 0


def test_within_threshold_exits_0(base, tmp_path, capsys):
    noisy = write_run(tmp_path / "b", speed_rows(scale=1.05, resolutions=RES) + quality_rows())
    assert main(["compare", str(base), str(noisy), "--fail-if-regression"]) == 0
    out = capsys.readouterr().out
    assert "**0 regressions, 0 improvements** over" in out
    assert "+5.0%" in out


def test_faster_is_an_improvement_not_a_failure(base, tmp_path, capsys):
    fast = write_run(tmp_path / "b", speed_rows(scale=0.5, resolutions=RES) + quality_rows())
    assert main(["compare", str(base), str(fast), "--fail-if-regression", "--only-flagged",
                 "--out", str(tmp_path / "diff.md")]) == 0
    out = capsys.readouterr().out
    assert "faster 2.00×" in out and "0 regressions" in out
    assert (tmp_path / "diff.md").read_text().strip() == out.strip()


def test_memory_status_and_quality_regressions(base, tmp_path):
    rows = speed_rows(memory_scale=3.0, resolutions=RES)
    rows[0].status, rows[0].reason = "oom", "OutOfMemoryError"  # softmax attention 256
    quality = quality_rows()
    quality[1].extra = {"metrics": {"fid": 20.0, "psnr": 24.0}}  # lit's FID 14 → 20: worse
    other = write_run(tmp_path / "b", rows + quality)
    result = compare_frames(load_run(base).frame, load_run(other).frame, Thresholds())
    flags = {(r["label"], r["level"], r["resolution"]): r["flags"]
             for _, r in result.points.iterrows()}
    assert flags[("softmax", "attention", 256)] == ["**ok → oom**"]
    assert any("more memory 3.00×" in f for f in flags[("lit", "model", 512)])
    fid = result.quality[(result.quality["label"] == "lit") & (result.quality["metric"] == "fid")]
    assert fid["kind"].tolist() == ["regression"] and "worse +42.9%" in fid["flag"].iloc[0]
    assert result.regressions >= 3


def test_points_in_one_run_only_are_listed_not_flagged(base, tmp_path, capsys):
    extra = [*speed_rows(resolutions=(*RES, 1024)),
             point("lit", {}, "block", 256, latency_median_s=1e-3)]
    other = write_run(tmp_path / "b", extra + quality_rows())
    assert main(["compare", str(base), str(other), "--fail-if-regression"]) == 0
    out = capsys.readouterr().out
    assert "only in B" in out and "(0 only in A, 11 only in B)" in out


def test_bad_input(tmp_path, capsys, base):
    assert main(["compare", str(base), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory at" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(base), str(base), "--latency-threshold", "fast"])
    assert exit_info.value.code == 2
    assert "is not a fraction" in capsys.readouterr().err
