"""The README's "Adding a method" template, built verbatim, passes the registry and
correctness suites: following the README gives a method attnbench accepts."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from attnbench import attention
from attnbench.attention import registry
from tests.attention import test_correctness as correctness
from tests.attention import test_registry as registry_suite

README = Path(__file__).resolve().parents[2] / "README.md"


def template_source() -> str:
    """The first Python block of the README's "Adding a method" section, as written."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Adding a method\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's 'Adding a method' section has no Python template"
    return match.group(1)


@pytest.fixture
def template(monkeypatch, tmp_path):
    """The template as a module of its own, registered in a copy of the registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "readme_template_method.py").write_text(template_source(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("readme_template_method")
    yield attention.get("mymethod")
    sys.modules.pop("readme_template_method", None)


def _must_run(check, *args) -> None:
    """Run one of the suites' tests; a skip would hide a failure here, so it fails."""
    try:
        check(*args)
    except pytest.skip.Exception as skip:
        pytest.fail(f"{check.__name__}{args[:3]} skipped on the README template: {skip}")


def test_template_passes_the_registry_suite(template, gen):
    assert "mymethod" in attention.names()
    assert attention.available("cpu")["mymethod"] is None
    _must_run(registry_suite.test_mixer_contract, "mymethod", gen)
    listed = template.describe()
    assert listed["layouts"] == list(attention.layout.KINDS)
    assert listed["implementations"] == ["reference", "sdpa"]


def test_template_passes_the_correctness_suite(template, gen, monkeypatch):
    for impl in template.paths():
        for dtype in (torch.float64, torch.float32):
            for shape in correctness.SHAPES:
                _must_run(correctness.test_matches_float64_reference, "mymethod", impl, dtype,
                          shape, gen)
            for layout in correctness.LAYOUTS:
                _must_run(correctness.test_matches_float64_reference_on_every_layout,
                          "mymethod", impl, dtype, layout, gen)
            if impl == "reference":
                continue
            assert template.fast_path(impl).supports_grad("cpu")
            for layout in correctness.GRAD_LAYOUTS:  # backward: dq, dk, dv
                _must_run(correctness.test_gradients_match_float64_reference_on_every_layout,
                          "mymethod", impl, dtype, layout, gen, monkeypatch)
        for where in ("q_all", "q_row", "k_token", "v_token"):
            _must_run(correctness.test_non_finite_input_is_never_hidden, "mymethod", impl,
                      where, gen)
    _must_run(correctness.test_every_builtin_defines_every_layout_and_its_labels, "mymethod")
    for dtype in (torch.int64, torch.bool, torch.complex64):
        _must_run(correctness.test_non_floating_inputs_are_one_value_error, "mymethod", dtype)
    # the option is the template's own: its check and its effect
    with pytest.raises(ValueError, match="temperature"):
        template.attend(*[torch.ones(1, 1, 4, 2)] * 3, grid=(2, 2), temperature=0)
