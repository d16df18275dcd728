"""The registry contract: names, lookup, availability, options, errors, plugins."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import textwrap

import pytest
import torch

from attnbench import attention
from attnbench.attention import registry
from attnbench.cli import main
from tests.helpers import qkv

BUILTINS = ["softmax", "flash", "xformers", "lit", "clear", "sla"]


def test_builtins_registered_in_order():
    assert attention.names()[: len(BUILTINS)] == BUILTINS
    for name in BUILTINS:
        backend = attention.get(name)
        assert backend.name == name
        assert backend.summary and backend.paper


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown attention method 'sofmax'.*'softmax'"):
        attention.get("sofmax")
    with pytest.raises(ValueError, match="valid: softmax"):
        attention.get("zzzzzz")


def test_availability_on_cpu_is_honest():
    reasons = attention.available(device="cpu", dtype=torch.float32)
    assert set(BUILTINS) <= set(reasons)
    for name in ("softmax", "lit", "clear", "sla"):
        assert reasons[name] is None, f"{name} must run anywhere: {reasons[name]}"
    assert "CUDA" in reasons["flash"]
    if importlib.util.find_spec("xformers") is None:
        assert "xformers is not installed" in reasons["xformers"]
    else:  # installed: no CPU kernel, or a build that does not load with this torch
        assert reasons["xformers"]


def test_kernel_only_methods_refuse_to_fall_back(gen):
    q, k, v = qkv(gen, 1, 2, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="flash cannot run here: .*CUDA"):
        attention.get("flash").attend(q, k, v, grid=(4, 4))
    with pytest.raises(ValueError, match="xformers cannot run here"):
        attention.get("xformers").attend(q, k, v, grid=(4, 4))
    assert "reference" not in attention.get("flash").paths()


@pytest.mark.parametrize("name", ["softmax", "lit", "clear", "sla"])
def test_shape_and_grid_errors(name, gen):
    backend = attention.get(name)
    q, k, v = qkv(gen, 1, 2, 20, 8)
    with pytest.raises(ValueError, match="grid 4x4 = 16 tokens, but the input has 20"):
        backend.attend(q, k, v, grid=(4, 4))
    with pytest.raises(ValueError, match="grid=.*required"):
        backend.attend(q, k, v, grid=None)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        backend.attend(q, k[..., :4], v, grid=(4, 5))
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        backend.attend(q[0], k[0], v[0], grid=(4, 5))
    with pytest.raises(ValueError, match="dtypes differ"):
        backend.attend(q, k.float(), v, grid=(4, 5))


def test_invalid_options_are_value_errors(gen):
    q, k, v = qkv(gen, 1, 1, 16, 8)
    with pytest.raises(ValueError, match="unknown option 'radiuss'.*'radius'"):
        attention.get("clear").attend(q, k, v, grid=(4, 4), radiuss=3)
    with pytest.raises(ValueError, match="radius"):
        attention.get("clear").attend(q, k, v, grid=(4, 4), radius=0)
    with pytest.raises(ValueError, match="topk"):
        attention.get("sla").attend(q, k, v, grid=(4, 4), topk=1.5)
    with pytest.raises(ValueError, match="topk"):
        attention.get("sla").attend(q, k, v, grid=(4, 4), topk=0)
    with pytest.raises(ValueError, match="eps"):
        attention.get("lit").attend(q, k, v, grid=(4, 4), eps=-1)
    with pytest.raises(ValueError, match="belongs to the mixer"):
        attention.get("lit").attend(q, k, v, grid=(4, 4), dwc_kernel=3)
    with pytest.raises(ValueError, match="takes a float"):
        attention.get("lit").attend(q, k, v, grid=(4, 4), eps="small")
    with pytest.raises(ValueError, match="unknown implementation 'sdpaa'.*'sdpa'"):
        attention.get("softmax").attend(q, k, v, grid=(4, 4), impl="sdpaa")


def test_options_from_strings_are_coerced():
    lit = attention.get("lit")
    assert lit.resolve({"eps": "1e-5"}) == {"eps": 1e-5, "phi_shift": 1e-6}
    assert lit.resolve({"dwc_kernel": "3"}, mixer=True)["dwc_kernel"] == 3
    with pytest.raises(ValueError, match="must be 0 .off. or odd"):
        lit.resolve({"dwc_kernel": 4}, mixer=True)


@pytest.mark.parametrize("name", BUILTINS)
def test_mixer_contract(name, gen):
    backend = attention.get(name)
    mixer = backend.mixer(48, 4)
    assert isinstance(mixer, attention.AttentionMixer)
    assert mixer.qkv.weight.shape == (144, 48) and mixer.proj.weight.shape == (48, 48)
    params = {n for n, _ in mixer.named_parameters()}
    new, inherit = set(mixer.new_parameters()), set(mixer.inheritable_parameters())
    assert new | inherit == params and not new & inherit
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= inherit
    if attention.available("cpu")[name] is None:
        x = torch.randn(2, 6 * 7, 48, generator=gen)
        assert mixer(x, (6, 7)).shape == x.shape
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        backend.mixer(50, 4)


def test_lit_mixer_new_parameters_are_the_dwc():
    mixer = attention.get("lit").mixer(64, 2)
    assert mixer.new_parameters() == ["core.dwc.weight", "core.dwc.bias"]
    assert mixer.core.dwc.weight.shape == (32, 1, 5, 5)  # depth-wise over d_head, shared by heads
    assert attention.get("lit").mixer(64, 2, dwc_kernel=0).new_parameters() == []


# --------------------------------------------------------------------------- plugins


@pytest.fixture
def fresh_plugins(monkeypatch, tmp_path):
    """An empty plugin state and a site dir where a test can install a fake distribution."""
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _install_fake_distribution(site, entry_points: str, module_source: str) -> None:
    (site / "myattn.py").write_text(textwrap.dedent(module_source))
    info = site / "myattn-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myattn\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_third_party_method_registers_through_an_entry_point(fresh_plugins, gen):
    _install_fake_distribution(
        fresh_plugins,
        """
        [attnbench.attention]
        doubled = myattn:Doubled
        broken = myattn:DoesNotExist
        """,
        """
        from attnbench.attention import get, AttentionMixer
        from attnbench.attention.softmax import Softmax

        class Doubled(Softmax):
            name = "doubled"
            summary = "softmax times two"
            fast_paths = ()
            def reference(self, q, k, v, *, grid):
                return 2 * super().reference(q, k, v, grid=grid)
        """,
    )
    assert "doubled" in attention.names()
    q, k, v = qkv(gen, 1, 2, 9, 4)
    out = attention.get("doubled").attend(q, k, v, grid=(3, 3))
    ref = attention.get("softmax").attend(q, k, v, grid=(3, 3))
    torch.testing.assert_close(out, 2 * ref)
    errors = attention.plugin_errors()
    assert "broken" in errors and "DoesNotExist" in errors["broken"]
    with pytest.raises(ValueError, match="its plugin failed to load"):
        attention.get("broken")
    listing = io.StringIO()  # list asks the registry, not the built-ins' catalogue
    with contextlib.redirect_stdout(listing):
        assert main(["list"]) == 0
    assert "\n  doubled   softmax times two" in listing.getvalue()
    assert "plugin 'broken' failed to load" in listing.getvalue()
    sys.modules.pop("myattn", None)


def test_register_refuses_a_second_method_of_the_same_name():
    class Impostor(attention.AttentionBackend):
        name = "softmax"

    with pytest.raises(ValueError, match="already registered"):
        attention.register(Impostor)


# --------------------------------------------------------------------------- capabilities


def test_selection_says_why_faster_paths_were_passed_over():
    lit = attention.get("lit")
    sel = lit.selection("cpu", torch.float64, (1, 2, 64, 16))
    assert isinstance(sel, attention.Selection) and sel.path == "chunked"
    assert any("float64" in r for r in sel.passed_over["triton"])
    clear = attention.get("clear")
    sel = clear.selection("cuda", torch.float32, (1, 2, 64, 16), needs_grad=True)
    assert "no autograd" not in str(sel.passed_over.get("flex", ""))
    sel = clear.selection("cpu", torch.float32, (1, 2, 64, 16), needs_grad=True)
    assert sel.path == "halo" and "flex" not in sel.passed_over  # flex: auto on CUDA only
    forced = clear.selection("cpu", torch.float32, impl="reference")
    assert forced == attention.Selection("reference")
    assert clear.select("cpu", torch.float32, (1, 2, 64, 16), needs_grad=True) == "halo"


def test_capabilities_are_data_and_every_reason_is_listed():
    flash = attention.get("flash").fast_path("flash_attn")
    reasons = flash.not_supported_reasons("cpu", torch.float32, (1, 1, 16, 300))
    assert any("CUDA-only" in r for r in reasons)
    assert any("float16" in r for r in reasons)
    assert any("head_dim <= 256" in r for r in reasons)
    assert any("head_dim a multiple of 8" in r for r in reasons)
    assert attention.get("softmax").describe()["capabilities"]["sdpa"]["devices"] == "any"
