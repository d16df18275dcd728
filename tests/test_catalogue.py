"""``attnbench list`` without torch: the generated catalogue is the live registry.

The catalogue (``attnbench/common/catalogue.json``) must equal what the registry
describes, and its torch-free reasons what the registry's paths say on the CPU in every
dtype, with Triton installed or not, interpreting or not, the CUDA-only packages
installed or not; ``list`` and ``list --json`` print the same bytes either way.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from types import SimpleNamespace

import pytest

from attnbench import cli, cliutil
from attnbench.attention import catalogue as writer
from attnbench.common import capabilities, catalogue

#: the packages a built-in fast path requires besides triton (CUDA-only paths)
CUDA_PACKAGES = ("flash_attn", "flash_attn_interface", "xformers")
#: the kernel modules whose import mode the live Triton probe reads
KERNEL_MODULES = ("attnbench.attention.lit.triton", "attnbench.attention.sla.triton")


def test_catalogue_is_the_registry():
    """Any change to a built-in's describe() or to a fast path's capabilities must be
    regenerated into the catalogue, or ``list`` would say something else than the code."""
    written = catalogue.CATALOGUE.read_text(encoding="utf-8")
    live = writer.text()
    if written != live:
        ours, theirs = json.loads(written)["methods"], json.loads(live)["methods"]
        stale = [m["describe"]["name"] for m in theirs if m not in ours] or ["the method list"]
        pytest.fail(f"{catalogue.CATALOGUE.name} is stale ({', '.join(stale)} changed): "
                    f"regenerate it with `{catalogue.REGENERATE}` and commit it")


@pytest.fixture
def fresh_process(monkeypatch):
    """This process as a fresh one for the Triton probe: no kernel module imported yet."""
    for module in KERNEL_MODULES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


@pytest.mark.parametrize("dtype", cliutil.DTYPES)
@pytest.mark.parametrize("triton", ["installed", "missing"])
@pytest.mark.parametrize("interpret", [None, "0", "1"])
@pytest.mark.parametrize("cuda_packages", ["as here", "installed"])
def test_torch_free_rows_are_the_registry_s(fresh_process, dtype, triton, interpret,
                                            cuda_packages):
    """Every method's row -- describe(), availability, each path's reason -- on the CPU."""
    if triton == "installed" and not capabilities.importable("triton"):
        pytest.skip("triton is not installed here (its import is what the live probe tries)")
    if interpret is not None:
        fresh_process.setenv("TRITON_INTERPRET", interpret)
    found = capabilities.importable

    def importable(module: str) -> bool:
        if module == "triton":
            return triton == "installed"
        # on the CPU a CUDA-only path's probe never runs: pretending it installed is safe
        return (cuda_packages == "installed" and module in CUDA_PACKAGES) or found(module)

    fresh_process.setattr(capabilities, "importable", importable)
    torch_free = catalogue.rows("cpu", dtype)
    live, errors = cli._registry_rows("cpu", dtype)
    assert torch_free is not None and errors == {}
    assert torch_free == json.loads(json.dumps(live, default=str))


def test_flex_without_a_compiler_says_so_as_the_registry_does(fresh_process, tmp_path):
    """FlexAttention's CPU probe looks for a C++ compiler: none on the ``PATH`` here (torch
    caches its search for the process's life: cleared, as in a fresh process)."""
    cpp_builder = pytest.importorskip("torch._inductor.cpp_builder")
    search = getattr(cpp_builder, "cpp_compiler_search", None)
    if not hasattr(search, "cache_clear"):
        pytest.skip("this torch does not cache its compiler search as expected")
    fresh_process.setenv("PATH", str(tmp_path))
    fresh_process.delenv("CXX", raising=False)
    search.cache_clear()
    try:
        torch_free = catalogue.rows("cpu", "float32")
        live, _ = cli._registry_rows("cpu", "float32")
    finally:
        search.cache_clear()  # the next caller searches the real PATH again
    flex = {row["name"]: row for row in torch_free}["clear"]["implementations"]["flex"]
    assert flex == capabilities.FLEX_NO_COMPILER
    assert torch_free == json.loads(json.dumps(live, default=str))


def _output(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["list", "--dtype", "bfloat16"],
                                  ["list", "--json", "--dtype", "float16"]])
def test_list_prints_the_registry_s_bytes(fresh_process, argv):
    answered = []
    rows = catalogue.rows
    fresh_process.setattr(catalogue, "rows", lambda *a: answered.append(a) or rows(*a))
    torch_free = _output(argv)
    assert answered, "list did not answer from the catalogue"
    fresh_process.setattr(catalogue, "rows", lambda *a: None)
    assert torch_free == _output(argv)


def test_the_registry_answers_what_the_catalogue_cannot(monkeypatch):
    """Another device, a third-party method, a TRITON_INTERPRET only Triton reads, a probe
    with no torch-free twin: ``None``, and ``list`` asks the registry."""
    assert catalogue.rows("cuda", "float32") is None
    assert catalogue.rows("cpu:0", "float32") is None
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert catalogue.rows("cpu", "float32") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert catalogue.rows("cpu", "float32") is not None
    plugin = SimpleNamespace(name="doubled", value="myattn:Doubled")
    monkeypatch.setattr(catalogue, "metadata", SimpleNamespace(entry_points=lambda group: [plugin]))
    assert catalogue.rows("cpu", "float32") is None
    with pytest.raises(capabilities.NeedsTorch):
        capabilities.PathFacts(probe=capabilities.LIVE).torch_free_reasons("cpu", "float32")
    assert capabilities.PathFacts(probe=capabilities.LIVE, devices=("cuda",)) \
        .torch_free_reasons("cpu", "float32") == ["this path runs CUDA-only (no CPU kernel)"]


def test_path_facts_round_trip_through_the_catalogue():
    facts = capabilities.PathFacts(devices=("cuda", "cpu"), dtypes={"cpu": ("float32",), "*": None},
                                   requires=("triton",), probe="triton")
    assert capabilities.PathFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
