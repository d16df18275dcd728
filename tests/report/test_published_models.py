"""Published numbers of the diffusers models (CLEAR on FLUX.1-dev, SLA on Wan2.1-1.3B) sit
beside points measured on the same model only."""

from __future__ import annotations

from attnbench.report import write_report
from attnbench.report.baselines import is_zoo_model, load_baselines

from .conftest import META, point, write_run


def _rows(model: str) -> list:
    return [point("softmax", {}, "model", 1024, model=model, latency_median_s=4.0),
            point("clear", {"radius": 8.0}, "model", 1024, model=model, latency_median_s=2.0)]


def _speedup_line(md: str) -> str:
    return next(line for line in md.splitlines()
                if line.startswith("| speedup (end-to-end) `radius=8` |") and "| 1024 |" in line)


def test_clear_and_sla_numbers_are_on_the_zoo_models():
    table = load_baselines()
    clear = table[(table["method"] == "clear") & (table["metric"] == "latency")]
    assert set(clear["model"]) == {"flux.1-dev"}
    assert sorted(clear["value"]) == [4.40, 15.67, 69.41, 293.5]
    sla = table[(table["method"] == "sla") & (table["model"] == "wan2.1-t2v-1.3b")]
    assert {"flops", "speedup"} <= set(sla["metric"]) and sla["value"].notna().all()
    assert is_zoo_model("FLUX.1-dev") and not is_zoo_model("DiT-S/2")


def test_flux_speedup_is_shown_beside_a_flux_run_only(tmp_path):
    flux = write_run(tmp_path / "flux", _rows("flux.1-dev"), {**META, "model": "flux.1-dev"})
    line = _speedup_line(write_report([flux]).markdown.read_text())
    assert "**1.01×**" in line and "2.00× (`clear:radius=8.0`), model level" in line
    dit = write_run(tmp_path / "dit", _rows("DiT-Ti/2"))
    line = _speedup_line(write_report([dit]).markdown.read_text())
    assert "**1.01×**" in line and "clear:radius=8.0" not in line
