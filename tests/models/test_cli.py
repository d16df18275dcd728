"""``python -m attnbench convert``: one command from a checkpoint to a student + report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import attnbench
from attnbench.cli import main
from attnbench.models import load_dit

from .conftest import make_inputs


def test_convert_writes_a_loadable_student_and_its_report(tiny_ckpt, tmp_path, gen, capsys):
    out = tmp_path / "lit"
    code = main(["convert", "--ckpt", str(tiny_ckpt), "--method", "lit", "--out", str(out),
                 "--option", "dwc_kernel=3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "inherited" in printed and "inheritance.json" in printed
    report = json.loads((out / "inheritance.json").read_text())
    assert report["method"] == "lit" and report["options"]["dwc_kernel"] == 3
    assert report["student_heads"] == 2 and report["source"]["path"] == str(tiny_ckpt)
    student = load_dit(out)
    expected, _ = attnbench.convert(load_dit(tiny_ckpt), "lit", dwc_kernel=3)  # seed 0, as the CLI
    x, t, y = make_inputs(gen)
    with torch.no_grad():
        assert torch.equal(student(x, t, y), expected(x, t, y))


def test_convert_options_and_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "sla"
    code = main(["convert", "--ckpt", str(tiny_ckpt), "--method", "sla", "--out", str(out),
                 "--options", "topk=1.0", "block_q=16", "--num-heads", "2",
                 "--no-inherit-projections", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["topk"] == 1.0 and report["options"]["block_q"] == 16
    assert report["student_heads"] == 2 and not report["inherit_projections"]
    assert report["weights"].endswith("model.safetensors")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "lti"], "unknown attention method 'lti'"),
        (["--method", "lit", "--option", "dwc_kernel"], "is not KEY=VALUE"),
        (["--method", "lit", "--option", "dwc_kernel=4"], "must be 0 .off. or odd"),
        (["--method", "lit", "--num-heads", "3"], "does not divide the hidden size"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys, extra, match):
    code = main(["convert", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("attnbench convert: error:")
    assert re.search(match, err)


def test_missing_and_bad_checkpoints_exit_2(tmp_path, capsys):
    code = main(["convert", "--ckpt", str(tmp_path / "nope.pt"), "--method", "lit",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    code = main(["convert", "--ckpt", str(bad), "--method", "lit", "--out", str(tmp_path / "o")])
    assert code == 2 and "is not a checkpoint" in capsys.readouterr().err


def test_existing_output_needs_force(tiny_ckpt, tmp_path, capsys):
    args = ["convert", "--ckpt", str(tiny_ckpt), "--method", "softmax", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_heads_of_a_checkpoint_outside_the_zoo(tmp_path, gen, capsys):
    from .spec import random_state, tiny_shapes

    path = tmp_path / "odd.pt"
    torch.save(random_state(tiny_shapes(hidden=96), gen), path)
    args = ["convert", "--ckpt", str(path), "--method", "lit", "--out", str(tmp_path / "o")]
    assert main(args) == 2 and "--teacher-heads" in capsys.readouterr().err
    assert main([*args, "--teacher-heads", "6"]) == 0


def test_python_dash_m(tiny_ckpt, tmp_path):
    """The real entry point, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "attnbench", "convert", "--ckpt", str(tiny_ckpt), "--method",
         "clear", "--option", "radius=4", "--out", str(tmp_path / "clear")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clear" / "inheritance.json").is_file()
    assert load_dit(tmp_path / "clear").config.attention_options["radius"] == 4
