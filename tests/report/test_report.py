"""``python -m attnbench report``: files, contents, plots, published numbers, bad input."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from PIL import Image

from attnbench.cli import main
from attnbench.report import write_report
from attnbench.report.plots import PALETTE, Styles, pareto_front
from attnbench.report.render import Document, Para, Table, to_html, to_markdown
from attnbench.report.tables import load_run, quality_table
from attnbench.results import load_table

from .conftest import point, speed_rows, write_run

SPEED_PLOTS = {"latency", "speedup", "memory", "flops", "tflops"}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_run_writes_the_report_into_its_directory(real_run):
    md, html = (real_run / "report.md").read_text(), (real_run / "report.html").read_text()
    # a memory plot needs a peak above the CPU meter's resolution (a few hundred KiB), which
    # tiny 64-px calls may not reach: it is drawn exactly when some point measured one
    frame, _ = load_table(real_run)
    expected = SPEED_PLOTS - (set() if (frame["peak_memory_bytes"] > 0).any() else {"memory"})
    assert {p.stem for p in (real_run / "plots").glob("*.png")} == expected
    assert "](plots/latency.png)" in md and "`softmax`, `lit`" in md
    for section in ("At a glance", "What was measured and how", "Results per resolution",
                    "Points not measured", "Published numbers"):
        assert f"## {section}" in md and f">{section}</h2>" in html
    # self-contained: every image is a data URI, nothing is fetched from anywhere
    sources = re.findall(r'(?:src|href)="([^"#]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    # how it was measured: device, dtype, shapes, timer, versions, git, command line
    for needle in ("| device |", "| dtype | float32", "DiT-T/2: depth 2", "| timer |",
                   "| repetitions |", "| FLOP convention |", "torch 2.", "| git revision |",
                   "run --res 64 --model DiT-T/2"):
        assert needle in md, needle


def test_every_plot_is_a_real_titled_figure(full_report):
    files = full_report
    names = {p.stem for p in files.plots}
    assert names == SPEED_PLOTS | {"pareto", "samples"}
    for path in files.plots:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 300
    md = files.markdown.read_text()
    for name in names:
        assert f"](plots/{name}.png)" in md
    assert files.html.read_text().count("data:image/png;base64,") == len(names)


def test_per_resolution_tables_and_points_not_measured(full_report):
    md = full_report.markdown.read_text()
    assert "*2048 px: 16,384 tokens, 3 heads × 64, batch 1*" in md
    assert "| clear:radius=16.0 |" in md  # variants are their own rows
    assert "block_mask 1.00" in md  # overheads, in ms
    # every point that was not measured is listed with its status and reason
    assert "| softmax | model | 2048 | skipped | predicted 340 s > budget 30 s |" in md
    assert "| sla | model | 2048 | oom | OutOfMemoryError" in md
    assert "fastest: `lit`" in md and "FLOP cut vs realised speedup" in md


def test_published_numbers_are_labelled_and_beside_measured_ones(full_report):
    files = full_report
    md, html = files.markdown.read_text(), files.html.read_text()
    assert "> **PUBLISHED — not measured here:**" in md
    assert '<span class="badge">published</span>' in html
    assert html.count('<table class="published">') >= 3  # softmax, lit, clear, sla
    assert "*Published: `lit` — LiT, Wang et al., arXiv 2501.12976*" in md
    lit_speedup = next(line for line in md.splitlines()
                       if line.startswith("| speedup (attention) |") and "**9×**" in line)
    assert "(`lit`), attention level" in lit_speedup and "2nd-hand" in lit_speedup


def test_baselines_file_has_provenance_for_every_number():
    from attnbench.report.baselines import COLUMNS, load_baselines

    table = load_baselines()
    assert list(table.columns) == COLUMNS and len(table) >= 40
    assert set(table["provenance"]) == {"paper", "project page", "2nd-hand"}
    assert table["value"].notna().all() and (table["source"].str.contains("arXiv")).all()
    clear = table[(table["method"] == "clear") & (table["resolution"] == 8192)
                  & (table["metric"] == "speedup")]
    assert clear["value"].tolist() == [6.3]


def test_baselines_rows_say_what_their_sources_say():
    """Issue 22: no LiT GenEval at 512 px (no source found); the ~9x figure names no
    model; LiT's headline FIDs are on its project page; CLEAR's 8K rows say which
    high-resolution settings the source does (not) name."""
    from attnbench.report.baselines import load_baselines

    table = load_baselines()
    lit = table[table["method"] == "lit"]
    assert lit[(lit["metric"] == "geneval") & (lit["resolution"] == 512)].empty
    nine = lit[lit["metric"] == "speedup"].iloc[0]
    assert "DiT-S/2" not in nine["model"] and "names no model" in nine["note"]
    headline = lit[(lit["metric"] == "fid") & lit["value"].isin([2.32, 3.69])]
    assert set(headline["provenance"]) == {"project page"}
    clear_8k = table[(table["method"] == "clear") & (table["resolution"] == 8192)]
    assert len(clear_8k) >= 3 and clear_8k["note"].str.contains("SDEdit").all()
    assert clear_8k["note"].str.contains("down_factor").all()


def test_quality_rows_are_detected_and_plotted(full_run, full_report):
    run = load_run(full_run)
    q = quality_table(run.frame)
    assert set(q["metric"]) == {"fid", "psnr"} and len(q) == 10  # the failed row is left out
    assert q[q["metric"] == "fid"]["higher_is_better"].eq(False).all()
    assert q[q["metric"] == "psnr"]["higher_is_better"].eq(True).all()
    # speed of a quality point: the model-level latency at the same method and resolution
    lit = q[(q["label"] == "lit") & (q["metric"] == "fid")].iloc[0]
    model = run.frame[(run.frame["label"] == "lit") & (run.frame["level"] == "model")
                      & (run.frame["resolution"] == 256)]
    assert lit["latency_ms"] == pytest.approx(model["latency_ms"].iloc[0])
    assert lit["speed_source"] == "model level"
    md = full_report.markdown.read_text()
    assert "## Quality" in md and "| method | px | fid ↓ | psnr ↑ |" in md


def test_other_quality_forms_and_no_quality_section_without_them(tmp_path):
    rows = speed_rows(resolutions=(256,), levels=("model",))
    rows[1].extra = {"fid": 20.0}  # a known metric as a key of extra, on a model-level row
    run = write_run(tmp_path / "r", rows)
    q = quality_table(load_run(run).frame)
    assert q[["label", "metric", "value"]].values.tolist() == [["lit", "fid", 20.0]]
    plain = write_run(tmp_path / "p", speed_rows(resolutions=(256,), levels=("model",)))
    files = write_report([plain])
    assert "## Quality" not in files.markdown.read_text()
    assert "pareto" not in {p.stem for p in files.plots}


def test_pareto_front():
    pts = [(1.0, 14.0), (2.0, 12.0), (3.0, 13.0), (4.0, 10.0)]
    assert pareto_front(pts, higher_better=False) == [(1.0, 14.0), (2.0, 12.0), (4.0, 10.0)]
    assert pareto_front(pts, higher_better=True) == [(1.0, 14.0)]


def test_one_colour_per_method_and_distinct_variants(full_run):
    frame = load_run(full_run).frame
    styles = Styles(frame, [""])
    assert styles.labels[:3] == ["softmax", "lit", "clear"]
    assert styles("softmax").colour == PALETTE[0]
    clear, wide = styles("clear"), styles("clear:radius=16.0")
    assert clear.colour == PALETTE[4] and wide.colour != clear.colour
    assert wide.marker != clear.marker
    # the mapping is fixed by the registry, not by what a run happens to contain
    only_clear = frame[frame["method"] == "clear"]
    assert Styles(only_clear, [""])("clear").colour == clear.colour


def test_several_runs_side_by_side_with_a_comparison(tmp_path):
    a = write_run(tmp_path / "a", speed_rows(resolutions=(256, 512), levels=("attention",)))
    b = write_run(tmp_path / "b", speed_rows(scale=2.0, resolutions=(256, 512),
                                             levels=("attention",)))
    md = write_report([a, b], tmp_path / "both").markdown.read_text()
    assert "2 runs side by side" in md and "| lit [b] |" in md
    assert "## Run comparison" in md and "**slower 2.00×**" in md


def test_cli_report_into_another_directory(tmp_path, capsys):
    run = write_run(tmp_path / "r", speed_rows(resolutions=(256,), levels=("attention",)))
    assert main(["report", str(run), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "report.md" in err and "report.html" in err
    assert (tmp_path / "o/report.html").exists() and not (run / "report.md").exists()


# --------------------------------------------------------------------------- bad input


def test_missing_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no run directory at" in _err_line(capsys)


def test_empty_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is empty: not a run directory" in _err_line(capsys)


def test_results_from_another_schema_version(tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"schema_version": 0, "rows": []}))
    assert main(["report", str(old)]) == 2
    assert "results schema 0, this attnbench reads 1" in _err_line(capsys)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "results.jsonl").write_text(json.dumps({"method": "softmax", "latency": 1}) + "\n")
    assert main(["report", str(jsonl)]) == 2
    assert "written by another attnbench version" in _err_line(capsys)


def test_a_run_with_only_failed_points_gets_a_report_that_says_so(tmp_path, capsys):
    rows = [point("softmax", {}, "attention", 256, status="skipped", reason="predicted 9 s > "
                  "budget 1 s"), point("lit", {}, "attention", 256, status="error",
                                       reason="RuntimeError: synthetic")]
    run = write_run(tmp_path / "failed", rows)
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "**No point of this run was measured**" in md and "0 of 2 points measured" in md
    assert "| lit | attention | 256 | error | RuntimeError: synthetic |" in md
    assert not list((run / "plots").glob("*.png")) if (run / "plots").exists() else True


def test_a_run_with_no_rows(tmp_path):
    run = write_run(tmp_path / "none", [])
    assert "holds no points at all" in write_report([run]).markdown.read_text()


def test_several_runs_need_out(tmp_path, capsys, full_run):
    assert main(["report", str(full_run), str(full_run / "results.json")]) == 2
    assert "need --out" in _err_line(capsys)
    assert main(["report", str(full_run), str(full_run)]) == 2  # one run given twice
    assert "is given twice" in _err_line(capsys)


# --------------------------------------------------------------------------- rendering


def test_markdown_and_html_render_the_same_blocks_safely(tmp_path):
    doc = Document("t <b>")
    doc.add(Para("a **bold** and `code` <script>x</script>"),
            Table(["a|b", "c"], [["1|2", "3"]]))
    md, html = to_markdown(doc, tmp_path), to_html(doc)
    assert "| a\\|b | c |" in md and "| 1\\|2 | 3 |" in md
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html


def test_frame_numbers_are_formatted_for_people():
    from attnbench.report.tables import num, times

    assert [num(v) for v in (1319.1, 27.29, 0.4917, 0.0001234, float("nan"))] == [
        "1,319", "27.3", "0.492", "1.23e-04", "—"]
    assert times(48.33) == "48.3×" and times(None) == "—"
    assert pd.isna(pd.NA) and num(pd.NA) == "—"


def test_density_and_what_ran_are_in_the_tables(tmp_path):
    asked, kept = {"topk": 0.05}, {"topk": 0.25}
    rows = [point("softmax", {}, "attention", 256, density=1.0, latency_median_s=4e-3),
            point("sla", asked, "attention", 256, density=0.25,
                  effective=json.dumps(kept, sort_keys=True), latency_median_s=2e-3),
            point("lit", {}, "attention", 256, latency_median_s=1e-3)]
    md = write_report([write_run(tmp_path / "dense", rows)]).markdown.read_text()
    assert "| density |" in md
    assert "| sla:topk=0.05 (kept 25%) | reference | ok | 25% |" in md
    assert "| softmax | reference | ok | 100% |" in md
    assert "| lit | reference | ok | — |" in md


def test_points_whose_flop_cut_and_speedup_disagree_say_where_the_time_goes(tmp_path):
    """A method 16× fewer FLOPs but 2× faster is flagged with its overheads and stages
    (largest first, with shares); one whose cut matches its speedup is not."""
    dense = 4.0 * 3 * 1024**2 * 64
    common = dict(status="ok", flops_dense=dense, latency_p20_s=None, latency_p80_s=None)
    rows = [point("softmax", {}, "attention", 512, latency_median_s=8e-3, flops_actual=dense,
                  impl="sdpa", **common),
            point("clear", {}, "attention", 512, latency_median_s=4e-3, flops_actual=dense / 16,
                  impl="halo", overheads=json.dumps({"halo_index": 2e-3}),
                  extra={"stages": {"halo.sdpa": 3e-3, "halo.gather": 1e-3}}, **common),
            point("lit", {}, "attention", 512, latency_median_s=1e-3, flops_actual=dense / 8,
                  impl="chunked", **common)]
    run = write_run(tmp_path / "run", rows)
    md = write_report([run]).markdown.read_text()
    section = md.split("## Where the time goes")[1].split("\n## ")[0]
    assert "| attention | 512 px | `clear` | halo | 16.0× | 2.00× | 8.00× | halo_index 2.00 |" \
        in section
    assert "halo.sdpa 3.00 ms (75%), halo.gather 1.00 ms (25%)" in section
    assert "`lit`" not in section
