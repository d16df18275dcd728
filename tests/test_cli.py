"""``python -m attnbench`` as a user meets it: output, JSON, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnbench import attention
from attnbench.cli import main
from attnbench.cliutil import parse_options


def test_list_prints_every_method_with_its_availability(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attention.names():
        assert f"\n  {name} " in out
    assert "unavailable: FlashAttention kernels are CUDA-only" in out
    assert "radius=" in out and "topk=" in out and "dwc_kernel=5 [mixer]" in out


def test_list_json_is_machine_readable(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    methods = {m["name"]: m for m in data["methods"]}
    assert set(attention.names()) == set(methods)
    assert methods["softmax"]["available"] is None
    assert methods["flash"]["available"]
    assert {o["name"] for o in methods["sla"]["options"]} >= {"topk", "linear_over"}
    assert methods["softmax"]["implementations"] == {"reference": None, "sdpa": None}


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert main(["list", "--dtype", "float33"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'float33': choose one of float32" in err
    assert "Traceback" not in err


def test_parse_options():
    assert parse_options(["radius=8", " topk = 0.05"]) == {"radius": "8", "topk": "0.05"}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_options(["radius"])


def test_module_entry_point_runs():
    """The README's main job, as a subprocess: ``python -m attnbench list``."""
    result = subprocess.run(
        [sys.executable, "-m", "attnbench", "list"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "softmax" in result.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "attnbench", "frobnicate"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


#: what a command's start-up must not load: the stages' heavy libraries
HEAVY = ("torch", "matplotlib", "pandas", "diffusers")


def _modules_after(argv: list[str]) -> set[str]:
    """The top-level packages loaded once ``python -m attnbench ARGV`` has run (a subprocess)."""
    code = ("import io, sys, contextlib\n"
            "from attnbench.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return set(result.stdout.split())


def test_help_starts_without_the_heavy_libraries():
    """``--help`` (and a bare command line, and a wrong command) import no stage: torch,
    matplotlib, pandas and diffusers load where a command uses them."""
    for argv in (["--help"], [], ["frobnicate"], ["--version"]):
        assert not set(HEAVY) & _modules_after(argv), argv


def test_list_starts_without_torch():
    """``list`` on the CPU answers from the built-ins' catalogue: no torch, no numpy, no
    Triton, nothing of the stages (``attnbench/common/catalogue.py``)."""
    for argv in (["list"], ["list", "--json"], ["list", "--dtype", "bfloat16"]):
        loaded = _modules_after(argv)
        assert "attnbench" in loaded, argv
        assert not {*HEAVY, "numpy", "triton"} & loaded, argv


def test_a_command_loads_its_stage_alone():
    """``world --help`` builds the shapes world's parser without importing the other stages
    (``run`` is the pipeline, ``report`` matplotlib)."""
    code = ("import sys\nfrom attnbench.cli import main\n"
            "try:\n    main(['world', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('attnbench.pipeline', "
            "'attnbench.report.cli', 'attnbench.data.cli')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "['attnbench.data.cli']"
