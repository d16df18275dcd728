"""Bad input refused before work starts: exit 2, one line naming the flag and what it takes."""

from __future__ import annotations

import json
import re

import pytest

from attnbench import pipeline
from attnbench.bench import sweep
from attnbench.cli import main
from attnbench.models import save_dit
from attnbench.results import load_table
from tests.helpers import tiny_pixel_dit
from tests.runfolder.helpers import TINY_RUN


def run_args(out, *extra):
    base = [*TINY_RUN, "--out", str(out)]
    if "--res" not in extra:
        base += ["--res", "64"]
    return [*base, *extra]


def no_work(monkeypatch):
    """Fail the test if a sweep point or a sample is started."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(pipeline, "run_sweep", refuse)
    monkeypatch.setattr(sweep, "calibrate", refuse)
    import attnbench.metrics.quality as quality

    monkeypatch.setattr(quality, "generate", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--methods", ""], r"--methods is empty: give one or more of .*softmax.*lit"),
    (["--methods", " , "], r"--methods is empty"),
    (["--res", "0"], r"--res 0: must be > 0"),
    (["--res", "-256"], r"--res -256: must be > 0"),
    (["--res", ""], r"--res is empty"),
    (["--budget", "-1"], r"--budget -1.0: must be a finite number > 0 seconds"),
    (["--budget", "0"], r"--budget 0.0: must be a finite number > 0"),
    (["--budget", "nan"], r"--budget nan: must be a finite number > 0"),
    (["--batch", "0"], r"--batch 0: must be an integer > 0"),
    (["--level", ""], r"--level is empty: give one or more of attention, block, model"),
    (["--quality", "bogus"], r"--quality 'bogus': choose from fid, geneval, fidelity"),
    (["--quality", "fid", "--quality-ckpt", "missing.pt"], r"--quality-ckpt missing.pt"),
    (["--quality", "fid", "--quality-num", "0"], r"--quality-num 0"),
])
def test_run_refuses_before_work(tmp_path, capsys, monkeypatch, extra, message):
    no_work(monkeypatch)
    assert main(run_args(tmp_path / "r", *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err), err


def test_repeats_are_merged_with_a_note(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(run_args(out, "--res", "64,64", "--methods", "lit,softmax,lit",
                         "--level", "attention,attention")) == 0
    err = capsys.readouterr().err
    assert "note: --res names 64 more than once" in err
    assert "note: --methods names lit more than once" in err
    assert "note: --level names attention more than once" in err
    frame, _ = load_table(out)
    assert len(frame) == 2


def test_huge_resolution_is_predicted_before_allocating(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inputs allocated for a point that cannot fit")

    monkeypatch.setattr(sweep, "build_workload", refuse)
    out = tmp_path / "r"
    assert main(run_args(out, "--res", "100000", "--methods", "softmax")) == 0
    frame, _ = load_table(out)
    row = frame.iloc[0]
    assert row["status"] == "skipped" and "before allocating" in row["reason"]


def test_eval_checks_fid_inputs_before_sampling(tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    latent = tiny_pixel_dit(config=tiny_pixel_dit().config.replace(in_channels=4,
                                                                   num_classes=10))
    ckpt = tmp_path / "latent"
    save_dit(latent, ckpt)
    base = ["eval", "--ckpt", str(ckpt), "--metrics", "fid", "-n", "2", "--steps", "2",
            "--out", str(tmp_path / "e"), "--no-progress", "--samples", __file__]
    assert main([*base, "--reference", str(tmp_path / "nope.npz")]) == 2
    assert "--reference" in capsys.readouterr().err
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    assert main([*base, "--reference", str(ref), "--inception-weights",
                 str(tmp_path / "no.pth")]) == 2
    assert "--inception-weights" in capsys.readouterr().err


# --------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def two_res_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(run_args(out, "--res", "64,128")) == 0
    return out


def _subset(src, dst, keep):
    dst.mkdir()
    lines = [line for line in (src / "results.jsonl").read_text().splitlines()
             if keep(json.loads(line))]
    (dst / "results.jsonl").write_text("".join(line + "\n" for line in lines))
    for name in ("meta.json", ".attnbench-files"):  # an attnbench folder, as run writes it
        (dst / name).write_text((src / name).read_text())


def test_compare_missing_points_are_regressions(two_res_run, tmp_path, capsys):
    half = tmp_path / "half"
    _subset(two_res_run, half, lambda r: r["resolution"] == 64)
    assert main(["compare", str(two_res_run), str(half), "--fail-if-regression",
                 "--latency-threshold", "1000", "--memory-threshold", "1000"]) == 1
    assert "2 regressions" in capsys.readouterr().out


def test_compare_with_no_common_point_is_exit_2(two_res_run, tmp_path, capsys):
    other = tmp_path / "other"
    _subset(two_res_run, other, lambda r: False)
    (other / "results.jsonl").write_text(
        (two_res_run / "results.jsonl").read_text().replace('"resolution": 64',
                                                            '"resolution": 192')
        .replace('"resolution": 128', '"resolution": 256'))
    assert main(["compare", str(two_res_run), str(other), "--fail-if-regression"]) == 2
    assert "share no point" in capsys.readouterr().err


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("content, message", [
    ('{"schema_version": 99}', "schema 99"),
    ("[1, 2]", "holds a JSON list"),
    ('{"schema_version": 1, "da', "not readable JSON"),
])
def test_meta_json_is_checked(two_res_run, tmp_path, capsys, content, message):
    bad = tmp_path / "bad"
    _subset(two_res_run, bad, lambda r: True)
    (bad / "meta.json").write_text(content)
    for args in (run_args(bad), ["report", str(bad)], ["compare", str(bad), str(bad)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "meta.json" in err and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("table, message", [
    ({"schema_version": 1, "rows": 5}, "'rows' is not a list"),
    ({"schema_version": 1, "rows": [], "meta": [1]}, "'meta' is not an object"),
])
def test_results_json_is_checked(tmp_path, capsys, table, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(table))
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pytest_benchmark_file_is_checked(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text('{"benchmarks": 5}')
    assert main(["import-benchmark", str(path)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_outputs_under_a_file_are_one_line(two_res_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(two_res_run), "--out", str(blocker / "rep")]) == 2
    assert main(["world", "--render", str(blocker / "grid.png"), "--count", "2"]) == 2
    assert main(["world", "--scene", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--scene -1" in err and "is a file" in err


def test_a_model_folder_must_match_its_sums(tmp_path, capsys):
    from attnbench.models.checkpoint import file_sha256

    folder = tmp_path / "m"
    save_dit(tiny_pixel_dit(), folder)
    (folder / "SHA256SUMS").write_text(f"{file_sha256(folder / 'model.safetensors')}  "
                                       "model.safetensors\n")
    save_dit(tiny_pixel_dit(seed=1), folder)  # the weights replaced, the sums not
    assert main(["sample", "--ckpt", str(folder), "-n", "1", "--steps", "1", "--out",
                 str(tmp_path / "s"), "--no-progress"]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_constant_samples_are_flagged(tmp_path, capsys):
    import torch

    model = tiny_pixel_dit()
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("nan"))
    folder = tmp_path / "nan"
    save_dit(model, folder)
    out = tmp_path / "e"
    assert main(["eval", "--ckpt", str(folder), "--metrics", "geneval", "-n", "4", "--steps",
                 "2", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "constant images" in err and "NaN or inf" in err
    frame, _ = load_table(out)
    warnings = json.loads(frame.iloc[0]["extra"])["warnings"]
    assert any("constant" in w for w in warnings)
