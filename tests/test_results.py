"""The results schema (attnbench/results.py): labels, optional columns, a torch-free leaf."""

import json
import math
import subprocess
import sys

from attnbench import results
from attnbench.results import Result, canonical_options, effective_label, label


def test_label_from_canonical_options():
    assert label("softmax", "{}") == "softmax"
    assert label("clear", canonical_options({"radius": 16.0, "down_factor": 4})) == (
        "clear:down_factor=4:radius=16.0")
    assert label("x", "not json") == "x:not json"


def test_effective_label_says_what_ran():
    asked = canonical_options({"topk": 0.05})
    kept = canonical_options({"topk": 0.25})
    assert effective_label("sla", asked) == "sla:topk=0.05"
    assert effective_label("sla", asked, asked, 0.05) == "sla:topk=0.05"
    assert effective_label("sla", asked, kept, 0.25) == "sla:topk=0.05 (kept 25%)"
    assert effective_label("sla", asked, kept) == "sla:topk=0.05 (sla:topk=0.25)"


def test_rows_written_before_density_still_read(tmp_path):
    row = Result("lit", "{}", "attention", 256, 256, 1, "float32", "cpu", "m", 2, 8).as_row()
    assert math.isnan(row["density"])
    for column in results.OPTIONAL_COLUMNS:
        del row[column]
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    (loaded,) = results.load_rows(tmp_path / "results.jsonl")
    assert math.isnan(loaded.density) and loaded.effective == ""


def test_zero_shot_rows_written_as_fidelity_read_as_zero_shot(tmp_path):
    row = Result("lit", "{}", "fidelity", 32, 64, 1, "float64", "cpu", "m", 4, 32).as_row()
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    (loaded,) = results.load_rows(tmp_path / "results.jsonl")
    assert loaded.level == results.ZERO_SHOT_LEVEL == "zero-shot"
    frame, _ = results.load_table(tmp_path)
    assert list(frame["level"]) == ["zero-shot"]


def test_numeric_columns_are_the_number_fields():
    assert {"resolution", "latency_median_s", "density", "world_size"} <= set(
        results.NUMERIC_COLUMNS)
    assert not {"method", "options", "level", "extra", "status"} & set(results.NUMERIC_COLUMNS)


def test_results_is_a_leaf():
    code = ("import sys, attnbench.results; "
            "print(sorted(m for m in sys.modules if m == 'torch' or "
            "(m.startswith('attnbench.') and m not in ('attnbench.results', "
            "'attnbench.runfolder'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
