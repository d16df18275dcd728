"""Non-square image sizes (``--res 128x64``, Wan's 480x832): parsed, keyed apart from the
square size of the same width, measured at the true token grid, reported by name."""

from __future__ import annotations

import json

import pytest

from attnbench.cli import main
from attnbench.results import Result, Size, point_key, size_text

FAST = ["--budget", "20", "--no-progress"]


@pytest.mark.parametrize("text, size", [
    ("1024", Size(1024, 1024)), (" 480x832 ", Size(480, 832)), ("480X832", Size(480, 832)),
    ("480×832", Size(480, 832)), ((720, 1280), Size(720, 1280)), (256, Size(256, 256)),
])
def test_sizes_parse(text, size):
    assert Size.of(text) == size


@pytest.mark.parametrize("text", ["480x", "x832", "480x832x3", "1e3", "-5", "a", (1, 2, 3)])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        Size.of(text)


def test_size_text_and_side():
    assert str(Size(1024, 1024)) == "1024" and str(Size(480, 832)) == "480x832"
    assert size_text(832, 480) == "480x832" and size_text(256, 0) == "256"
    assert size_text(256, float("nan")) == "256" and size_text(256, 256) == "256"
    assert Size(480, 832).side == pytest.approx((480 * 832) ** 0.5)


def _row(**kw) -> Result:
    base = dict(method="softmax", options="{}", level="attention", resolution=64, tokens=16,
                batch=1, dtype="float32", device="cpu", model="DiT-T/2", heads=2, head_dim=8)
    return Result(**{**base, **kw})


def test_a_non_square_point_is_keyed_apart_from_the_square_one():
    square, tall = _row(), _row(height=128, tokens=32)
    assert square.key() != tall.key()
    assert _row(height=64).key() == square.key()  # a height equal to the width is square
    assert point_key("softmax", "{}", "attention", 64, 1, "float32", "cpu", "DiT-T/2") \
        == square.key()
    assert tall.size == Size(128, 64) and square.size == Size(64, 64)


def _rows(out) -> list[dict]:
    """The finished table's rows (with the ratios against softmax)."""
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """DiT-T/2 at 128x64 (8x4 tokens) and 64 (4x4) px: the same width, two sizes."""
    out = tmp_path_factory.mktemp("sizes") / "run"
    argv = ["run", "--model", "DiT-T/2", "--level", "attention,model", "--res", "128x64,64",
            "--methods", "softmax,clear:radius=1", "--out", str(out), *FAST]
    assert main(argv) == 0
    return out, argv


def test_run_measures_each_size_at_its_grid(mixed_run):
    out, _ = mixed_run
    rows = {(r["method"], r["level"], r["height"]): r for r in _rows(out)}
    assert len(rows) == 8  # 2 methods x 2 levels x 2 sizes: none merged
    soft_tall, soft_square = rows["softmax", "attention", 128], rows["softmax", "attention", 0]
    assert soft_tall["resolution"] == soft_square["resolution"] == 64
    assert soft_tall["tokens"] == 32 and soft_square["tokens"] == 16
    b, h, d = soft_tall["batch"], soft_tall["heads"], soft_tall["head_dim"]
    assert soft_tall["flops_actual"] == pytest.approx(4 * b * h * 32 * 32 * d)
    for level in ("attention", "model"):
        for height in (0, 128):
            row = rows["clear", level, height]
            assert row["status"] == "ok", row["reason"]
            base = rows["softmax", level, height]  # the ratio is against the same size
            assert row["speedup_vs_softmax"] == pytest.approx(
                base["latency_median_s"] / row["latency_median_s"])
    from attnbench import attention

    clear = attention.get("clear")
    assert rows["clear", "attention", 128]["density"] == pytest.approx(
        clear.density((8, 4), radius=1))
    assert rows["clear", "attention", 0]["density"] == pytest.approx(
        clear.density((4, 4), radius=1))


def test_report_and_meta_name_the_sizes(mixed_run):
    out, _ = mixed_run
    report = (out / "report.md").read_text()
    assert "128x64 px (32 tokens)" in report and "64 px (16 tokens)" in report
    assert json.loads((out / "meta.json").read_text())["resolutions"] == ["128x64", 64]
    assert "height" in (out / "results.csv").read_text().splitlines()[0].split(",")


def test_resume_finds_every_size_done(mixed_run, capsys):
    out, argv = mixed_run
    before = (out / "results.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "results.jsonl").read_text() == before  # nothing measured again


@pytest.mark.parametrize("res, message", [
    ("128x", "--res takes comma-separated px or HEIGHTxWIDTH"),
    ("0x64", "--res 0x64: must be > 0"),
    ("-256", "--res -256: must be > 0"),
    ("128x60", "128x60: the width 60 px is not a multiple of 16"),
])
def test_bad_sizes_exit_2_before_any_work(tmp_path, capsys, res, message):
    out = tmp_path / "bad"
    assert main(["run", "--model", "DiT-T/2", "--res", res, "--out", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()
