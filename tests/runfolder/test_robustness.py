"""Issue 22 (robustness): every command drives like ``run`` -- bad input is one line and
exit 2 before any work, nothing written is lost, a full disk or a read-only --out is one
line. One table per group of the issue: data loss, tracebacks, the hang, values silently
accepted, unclear messages."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnbench import attention, runfolder
from attnbench.cli import main
from attnbench.models import save_dit
from tests.helpers import tiny_pixel_dit
from tests.runfolder.helpers import TINY_RUN, temporaries


def attnbench(capsys, *args) -> tuple[int, str]:
    """``python -m attnbench ARGS`` in this process: its exit code and stderr."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own checks (type=, choices=)
        code = exit.code
    return code, capsys.readouterr().err


def refused(capsys, message: str, *args) -> str:
    code, err = attnbench(capsys, *args)
    assert code == 2, (args, err)
    assert "Traceback" not in err and re.search(message, err), (args, err)
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    return err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("robust") / "teacher"
    save_dit(tiny_pixel_dit(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two finished tiny runs (A, B) to compare."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        assert main([*TINY_RUN, "--res", "64", "--out", str(root / name)]) == 0
    return root / "a", root / "b"


def sample_args(teacher, out, *extra):
    return ["sample", "--ckpt", teacher, "-n", "4", "--batch", "2", "--steps", "2", "--out", out,
            "--no-progress", *extra]


def distill_args(teacher, out, *extra):
    return ["distill", "--teacher", teacher, "--method", "lit", "--out", out, "--steps", "2",
            "--batch-size", "2", "--gen-samples", "4", "--gen-steps", "2", "--eval-samples", "2",
            "--no-progress", "--threads", "1", *extra]


# =========================================================================== data loss


@pytest.mark.parametrize("command, name", [
    ("distill", "summary.json"), ("distill", "metrics.csv"),
    ("train-teacher", "summary.json"), ("train-teacher", "metrics.csv"),
])
def test_a_training_run_keeps_a_users_file(tmp_path, capsys, teacher, command, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("my own\n")
    args = (distill_args(teacher, out) if command == "distill" else
            [command, "--out", out, "--steps", "2", "--no-progress"])
    refused(capsys, f"{name}, which attnbench did not write.*--force", *args)
    assert (out / name).read_text() == "my own\n"


def test_compare_out_never_replaces_a_run_table_or_a_users_file(runs, tmp_path, capsys):
    a, b = runs
    table = (b / "results.json").read_text()
    refused(capsys, r"results.json.*not this command's output.*--force", "compare", a, b,
            "--out", b / "results.json")
    assert (b / "results.json").read_text() == table
    mine = tmp_path / "mine.md"
    mine.write_text("notes\n")
    refused(capsys, "mine.md, which attnbench did not write", "compare", a, b, "--out", mine)
    assert mine.read_text() == "notes\n"
    assert attnbench(capsys, "compare", a, b, "--out", mine, "--force")[0] == 0
    assert "| method" in mine.read_text() or "|" in mine.read_text()
    assert attnbench(capsys, "compare", a, b, "--out", mine)[0] == 0  # now attnbench's own


def test_world_render_never_replaces_a_users_file(tmp_path, capsys):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    refused(capsys, "mine.png, which attnbench did not write", "world", "--render", mine,
            "--count", "2")
    assert mine.read_bytes() == b"my picture"
    assert attnbench(capsys, "world", "--render", mine, "--count", "2", "--force")[0] == 0
    assert attnbench(capsys, "world", "--render", mine, "--count", "2")[0] == 0
    assert mine.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_rows_of_results_json_are_restored_not_measured_again(runs, tmp_path, capsys, damage):
    folder = tmp_path / "run"
    shutil.copytree(runs[0], folder)
    before = json.loads((folder / "results.json").read_text())["rows"]
    if damage == "emptied":
        (folder / "results.jsonl").write_text("")
    else:
        (folder / "results.jsonl").unlink()
    code, err = attnbench(capsys, *TINY_RUN, "--res", "64", "--out", folder)
    assert code == 0 and "restored them from results.json" in err, err
    after = json.loads((folder / "results.json").read_text())["rows"]  # measured once, kept
    assert [r["latency_median_s"] for r in after] == [r["latency_median_s"] for r in before]


def test_sample_killed_then_rerun_resumes(teacher, tmp_path, capsys, monkeypatch):
    from attnbench.metrics import sample

    whole = tmp_path / "whole"
    assert attnbench(capsys, *sample_args(teacher, whole))[0] == 0
    out = tmp_path / "killed"
    real, calls = sample.sample_chunk, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the second chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_chunk", interrupted)
    assert attnbench(capsys, *sample_args(teacher, out))[0] == 130
    monkeypatch.setattr(sample, "sample_chunk", real)
    code, err = attnbench(capsys, *sample_args(teacher, out))
    assert code == 0 and "resuming" in err and "1 chunk(s) already drawn" in err, err
    with np.load(whole / "samples.npz") as a, np.load(out / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (out / sample.CHUNK_DIR).exists() and not temporaries(out)
    # other settings are refused with the way out; --force starts over
    refused(capsys, "other settings.*--force to start over",
            *sample_args(teacher, out, "--seed", "5"))
    assert attnbench(capsys, *sample_args(teacher, out, "--seed", "5", "--force"))[0] == 0


def test_sample_into_a_users_folder_needs_force(teacher, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    refused(capsys, "not empty.*--force", *sample_args(teacher, out))


# =========================================================================== tracebacks


@pytest.mark.parametrize("args, message", [
    (["list", "--device", "tpu"], "--device 'tpu': unknown device"),
    (["list", "--device", ""], "--device '': unknown device"),
    (["list", "--device", "cpu:5"], "--device cpu:5: the CPU has no index"),
])
def test_list_checks_its_device(capsys, args, message):
    refused(capsys, message, *args)


def test_available_names_an_unknown_device():
    with pytest.raises(ValueError, match="device 'tpu': unknown"):
        attention.get("softmax").available(device="tpu")


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder every write under which fails with EROFS (root ignores permission bits)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    inside = str(ro) + os.sep

    def guard(path):
        if os.path.abspath(os.fspath(path)).startswith(inside) or \
                os.path.abspath(os.fspath(path)) == str(ro):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open = builtins.open, os.open
    real_mkdir, real_replace = os.mkdir, os.replace

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            guard(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if not os.path.isdir(path):
            guard(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", lambda a, b: (guard(b), real_replace(a, b))[1])
    return ro


def test_a_read_only_out_is_one_line(read_only, runs, teacher, capsys):
    a, b = runs
    for args in (["report", a, "--out", read_only],
                 sample_args(teacher, read_only / "s"),
                 ["compare", a, b, "--out", read_only / "x.md"],
                 ["world", "--render", read_only / "g.png", "--count", "2"]):
        refused(capsys, "read-only", *args)


@pytest.fixture
def disk_full_after(monkeypatch):
    """``disk_full_after(n)``: fsync works n times, then the disk is full."""
    real = os.fsync

    def arm(n: int) -> None:
        calls = {"n": 0}

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] > n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    yield arm
    monkeypatch.setattr(os, "fsync", real)


@pytest.mark.parametrize("command", ["sample", "eval", "world", "convert", "distill",
                                     "train-teacher"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, teacher, capsys,
                                                         disk_full_after, command):
    out = tmp_path / "out"
    args = {
        "sample": sample_args(teacher, out),
        "eval": ["eval", "--ckpt", teacher, "--metrics", "geneval", "-n", "2", "--steps", "2",
                 "--out", out, "--no-progress"],
        "world": ["world", "--render", out / "g.png", "--count", "2"],
        "convert": ["convert", "--ckpt", teacher, "--method", "lit", "--out", out],
        "distill": distill_args(teacher, out),
        "train-teacher": ["train-teacher", "--out", out, "--steps", "2", "--no-progress",
                          "--eval-samples", "2", "--no-grid", "--batch-size", "2",
                          "--hidden-size", "32", "--depth", "1", "--num-heads", "2"],
    }[command]
    # the claims, then a write or two of the work: then the disk is full
    disk_full_after(1 if command == "world" else 3)
    refused(capsys, "the disk is full: .* was not written", *args)
    assert not temporaries(out if out.is_dir() else out.parent)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                 "writing file data/3: file write failed"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
              '"No space left on device" })'),  # safetensors' SafetensorError
])
def test_every_wording_of_a_full_disk_is_read_as_one(tmp_path, error):
    def write(tmp):
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(runfolder.DiskFull, match="the disk is full"):
        runfolder.atomic_write(tmp_path / "model.safetensors", write)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--labels", ""], "--labels is empty"),
    (["--cfg-channels", "99"], "--cfg-channels 99: .* has 3 channels"),
    (["--labels", "1,2,999", "-n", "2"], "--labels 999: .* has labels 0 to"),
])
def test_sample_labels_and_channels_are_checked(teacher, tmp_path, capsys, args, message):
    out = tmp_path / "s"
    refused(capsys, message, *sample_args(teacher, out, *args))
    assert not list(out.glob("*.png"))


def test_a_loss_weight_of_inf_is_refused(teacher, tmp_path, capsys):
    refused(capsys, "--weight kd_out=inf: a loss weight is a finite number",
            *distill_args(teacher, tmp_path / "d", "--weight", "kd_out=inf"))


@pytest.mark.parametrize("class_name", ["FluxTransformer2DModel", None])
def test_sample_vae_must_be_an_autoencoder(teacher, tmp_path, capsys, class_name):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": class_name}))
    refused(capsys, "--vae .* not an AutoencoderKL", *sample_args(teacher, tmp_path / "s",
                                                                  "--vae", vae))


def test_world_size_and_scale_are_bounded(tmp_path, capsys):
    for args in (["--scale", "100000"], ["--size", "100000"], ["--scale", "0"],
                 ["--scale", "-1"], ["--nrow", "0"], ["--nrow", "-1"]):
        refused(capsys, args[0], "world", "--render", tmp_path / "g.png", *args)
    refused(capsys, "Mpixel grid", "world", "--render", tmp_path / "g.png", "--count", "4096",
            "--size", "1024")
    assert not (tmp_path / "g.png").exists()


def test_api_edge_cases():
    q = torch.randn(0, 2, 64, 16)
    assert attention.get("sla").attend(q, q, q, grid=(8, 8)).shape == (0, 2, 64, 16)
    q1 = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="'radius'=1e.300: out of range"):
        attention.get("clear").attend(q1, q1, q1, grid=(8, 8), radius=1e300)
    with pytest.raises(ValueError, match="'radius' is None: give a float"):
        attention.get("clear").attend(q1, q1, q1, grid=(8, 8), radius=None)
    with pytest.raises(ValueError, match="'phi_shift'=inf: must be a finite"):
        attention.get("lit").attend(q1, q1, q1, grid=(8, 8), phi_shift=float("inf"))
    with pytest.raises(ValueError, match="layout grid must be .* integers"):
        attention.Layout((4.7, 4.2))
    with pytest.raises(ValueError, match="dim 0: the model width"):
        attention.get("softmax").mixer(0, 2)
    with pytest.raises(ValueError, match="batch must be an integer >= 0, got nan"):
        attention.get("softmax").flops(float("nan"), 2, 64, 16)


# =========================================================================== the hang


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float64", "int8", ""])
def test_dtype_takes_the_listed_dtypes(tmp_path, capsys, dtype):
    refused(capsys, f"--dtype '{dtype}': choose one of float32, bfloat16, float16",
            *TINY_RUN, "--res", "64", "--out", tmp_path / "r", "--dtype", dtype)
    assert not (tmp_path / "r").exists()


# =========================================================================== silently accepted


@pytest.mark.parametrize("flag, value", [
    ("--latency-threshold", "nan"), ("--latency-threshold", "inf"),
    ("--memory-threshold", "nan"), ("--quality-threshold", "nan"),
    ("--memory-floor-mib", "-1"), ("--memory-floor-mib", "nan"),
    ("--latency-threshold", "-1"),
])
def test_compare_thresholds_are_finite(runs, capsys, flag, value):
    refused(capsys, f"argument {flag}: .*(finite|>= 0)", "compare", *runs,
            "--fail-if-regression", flag, value)


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("args", [["--cfg", "nan"], ["--cfg", "inf"],
                                  ["--sampler", "ddim", "--eta", "nan"],
                                  ["--sampler", "ddim", "--eta", "inf"]])
def test_sampling_numbers_are_finite(teacher, tmp_path, capsys, command, args):
    flag = args[-2]
    base = (sample_args(teacher, tmp_path / "s") if command == "sample" else
            ["eval", "--ckpt", teacher, "--metrics", "geneval", "-n", "2", "--out",
             tmp_path / "e"])
    refused(capsys, f"argument {flag}: .*finite", *base, *args)


def test_a_vae_for_a_pixel_model_or_a_missing_one_is_refused(teacher, tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    refused(capsys, "samples pixels .* leave --vae out",
            *sample_args(teacher, tmp_path / "s", "--vae", vae))
    refused(capsys, "--vae .*missing: not a diffusers AutoencoderKL folder", "eval", "--ckpt",
            teacher, "--metrics", "geneval", "-n", "2", "--out", tmp_path / "e", "--vae",
            tmp_path / "missing")


@pytest.mark.parametrize("command, args, message", [
    ("distill", ["--weight", "diffusion=nan"], "--weight diffusion=nan: a loss weight"),
    ("distill", ["--grad-clip", "nan"], "argument --grad-clip: .*finite"),
    ("distill", ["--max-minutes", "nan"], "argument --max-minutes: .*finite"),
    ("distill", ["--lr", "inf"], "argument --lr: .*finite"),
    ("train-teacher", ["--max-minutes", "nan"], "argument --max-minutes: .*finite"),
])
def test_training_numbers_are_finite(teacher, tmp_path, capsys, command, args, message):
    base = (distill_args(teacher, tmp_path / "d") if command == "distill" else
            [command, "--out", tmp_path / "d", "--steps", "2", "--no-progress"])
    refused(capsys, message, *base, *args)
    assert not (tmp_path / "d" / "run.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lit:phi_shift=inf"], "'phi_shift'=inf: must be a finite number"),
    (["--methods", "clear:radius=8:radius=9"], "gives radius twice"),
    (["--methods", "sla:topk=0.5:topk=0.1"], "gives topk twice"),
    (["--methods", "clear", "--method-options", "clear.radius=8", "--method-options",
      "clear.radius=9"], "gives clear.radius twice"),
    (["--methods", "clear:radius=3", "--method-options", "clear.radius=-1"],
     "'radius'=-1.0: must be a finite number > 0"),
    (["--dtype", ""], "--dtype '': choose one of"),
    (["--model", ""], "argument --model: is empty"),
    (["--model-path", ""], "argument --model-path: is empty"),
    (["--out", ""], "argument --out: is empty"),
    (["--ckpt", "X", "--model", "DiT-Ti/2"], "--model and --ckpt: give one model"),
    (["--quality-num", "0"], "--quality-num only applies with --quality"),
    (["--teacher", "T"], "--teacher only applies with --quality"),
    (["--device", "cpu:5"], "--device cpu:5: the CPU has no index"),
    (["--res", "64,,64"], "--res '64,,64' has an empty item"),
])
def test_run_refuses_what_it_used_to_accept(tmp_path, capsys, extra, message):
    args = [*TINY_RUN, "--out", tmp_path / "r", *extra]
    if "--res" not in extra:
        args += ["--res", "64"]
    if "--out" in extra:
        args.remove("--out")
        args.remove(tmp_path / "r")
    refused(capsys, message, *args)
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_fidelity_checks_overridden_options_and_empty_timesteps(tmp_path, capsys):
    base = ["fidelity", "--out", tmp_path / "f", "--num", "2", "--no-progress"]
    refused(capsys, "'radius'=-1.0: must be a finite number > 0", *base, "--methods",
            "clear:radius=3", "--method-options", "clear.radius=-1")
    refused(capsys, "--timesteps is empty", *base, "--timesteps", "")


def test_down_factor_zero_is_stated_as_no_pooling(capsys):
    assert main(["list"]) == 0
    assert "0 or 1 = no pooling" in capsys.readouterr().out


def test_world_render_empty_or_a_folder(tmp_path, capsys):
    refused(capsys, "--render is empty", "world", "--render", "")
    refused(capsys, "--render .* is a folder: give a file name", "world", "--render", tmp_path,
            "--count", "2")
    assert not temporaries(tmp_path)


def test_convert_entry_on_safetensors_and_unknown_config(teacher, tmp_path, capsys):
    refused(capsys, "--entry bogus: .* safetensors file holding one state dict", "convert",
            "--ckpt", teacher, "--method", "lit", "--out", tmp_path / "c", "--entry", "bogus")
    refused(capsys, "--config 'nope' is not a DiT config: choose one of DiT-", "convert",
            "--ckpt", teacher, "--method", "lit", "--out", tmp_path / "c2", "--config", "nope")


def test_report_of_one_run_twice_is_refused(runs, tmp_path, capsys):
    refused(capsys, "RUN_DIR .* is given twice", "report", runs[0], runs[0], "--out",
            tmp_path / "rep")


def test_model_shapes_names_a_bad_resolution():
    from attnbench.integrations.diffusers import model_shapes

    with pytest.raises(ValueError, match="resolution must be px .* got 'abc'"):
        model_shapes("flux-tiny", "abc")


# =========================================================================== broken model folders


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from attnbench.integrations.diffusers import build_transformer

    folder = tmp_path_factory.mktemp("flux") / "flux"
    build_transformer("flux-tiny", seed=0).save_pretrained(folder)
    return folder


def _broken(folder: Path, dest: Path, damage: str) -> Path:
    shutil.copytree(folder, dest)
    weights = next(dest.glob("*.safetensors"))
    config = json.loads((dest / "config.json").read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "zero-byte":
        weights.write_bytes(b"")
    elif damage == "garbage":
        weights.write_bytes(b"not safetensors at all" * 8)
    elif damage == "mismatched config":
        config["num_layers"] += 1
    elif damage == "garbage config":
        config["num_layers"] = "many"
    elif damage == "missing shard":
        (dest / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"x": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated"), ("zero-byte", "empty"), ("garbage", "not a safetensors file"),
    ("mismatched config", "the weights lack .* tensor"),
    ("garbage config", "config.json does not build"), ("missing shard", "shard .* is missing"),
])
def test_a_broken_model_folder_is_refused_before_measuring(flux_folder, tmp_path, capsys,
                                                         damage, message):
    broken = _broken(flux_folder, tmp_path / "broken", damage)
    refused(capsys, f"--model-path .*{message}", "run", "--model-path", broken, "--level",
            "attention", "--methods", "softmax", "--res", "64", "--out", tmp_path / "r",
            "--no-progress", "--no-report")
    assert not (tmp_path / "r" / "results.jsonl").exists()
    refused(capsys, f"--model-path .*{message}", "fidelity", "--model-path", broken, "--out",
            tmp_path / "f", "--no-progress")


# =========================================================================== unclear messages


def test_messages_name_the_flag_and_the_file(runs, teacher, tmp_path, capsys):
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    refused(capsys, "--baselines .*empty.csv is empty: give a CSV", "report", runs[0],
            "--out", tmp_path / "rep", "--baselines", empty_csv)
    pickle = tmp_path / "bench.pkl"
    pickle.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    refused(capsys, "FILE .*bench.pkl is not pytest-benchmark JSON \\(binary data",
            "import-benchmark", pickle)
    refused(capsys, "--weight 'diffusion' is not KEY=VALUE \\(e.g. --weight kd_out=0.5\\)",
            *distill_args(teacher, tmp_path / "d", "--weight", "diffusion"))


@pytest.mark.parametrize("flag, kind, message", [
    ("--samples", "empty", "is empty \\(0 bytes\\)"),
    ("--samples", "object", "holds object arrays"),
    ("--samples", "text", "is not an .npz archive"),
    ("--reference", "object", "holds object arrays"),
])
def test_eval_npz_inputs_are_named(teacher, tmp_path, capsys, flag, kind, message):
    path = tmp_path / f"{kind}.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "object":
        np.savez(path, arr_0=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path = tmp_path / "notes.txt"
        path.write_text("hello\n")
    args = ["eval", "--ckpt", teacher, "--metrics", "fid", "-n", "2", "--steps", "2", "--out",
            tmp_path / "e", "--no-progress", flag, path]
    if flag == "--reference":
        good = tmp_path / "good.npz"
        np.savez(good, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
        args += ["--samples", good]
    refused(capsys, f"{flag} .*{message}", *args)


@pytest.mark.parametrize("args, message", [
    (["sample", "--model-path", ""], "argument --model-path: is empty"),
    (["sample", "--model-path", "p", "--student", ""], "argument --student: is empty"),
    (["sample", "--model-path", "p", "--prompts", ""], "argument --prompts: is empty"),
    (["sample", "--model-path", "p", "--guidance", "nan"], "argument --guidance: .*finite"),
    (["sample", "--model-path", "p", "--guidance", "-1"], "argument --guidance: .*>= 0"),
    (["distill", "--method", "clear", "--model-path", ""], "argument --model-path: is empty"),
    (["distill", "--method", "clear", "--model-path", "p", "--gen-guidance", "inf"],
     "argument --gen-guidance: .*finite"),
    (["eval", "--pipeline-samples", ""], "argument --pipeline-samples: is empty"),
    (["eval", "--teacher-samples", ""], "argument --teacher-samples: is empty"),
])
def test_pipeline_flags_refuse_empty_and_non_finite(tmp_path, capsys, args, message):
    """The diffusers-pipeline flags of sample / distill / eval go through the shared parsers."""
    refused(capsys, message, *args, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()
