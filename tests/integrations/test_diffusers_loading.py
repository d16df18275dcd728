"""--model-path (a local diffusers folder, never a download) and the workload API."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from attnbench.attention import Layout
from attnbench.integrations.diffusers import (
    build_transformer,
    diffusers_workload,
    load_transformer,
    make_inputs,
    model_shapes,
)


@pytest.fixture
def saved_flux(tmp_path):
    model = build_transformer("flux-tiny", seed=3)
    model.save_pretrained(tmp_path / "pipe" / "transformer")  # safetensors by default
    return model, tmp_path / "pipe"


def test_load_a_saved_flux_folder_and_a_pipeline_folder(saved_flux, gen):
    model, pipe = saved_flux
    shapes = model_shapes("flux-tiny", (48, 80))
    inputs = make_inputs("flux-tiny", shapes, batch=2, generator=gen)
    for path in (pipe, pipe / "transformer"):
        loaded, entry = load_transformer(path)
        assert entry.family == "flux" and entry.name == "pipe" and entry.text_tokens == 512
        with torch.no_grad():
            assert torch.equal(loaded(**inputs)[0], model(**inputs)[0])


def test_model_path_errors(tmp_path, saved_flux):
    with pytest.raises(ValueError, match="no such folder"):
        load_transformer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_transformer(tmp_path / "empty")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="'UNet2DConditionModel' is not supported"):
        load_transformer(unet)
    _, pipe = saved_flux
    for f in (pipe / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_transformer(pipe)


def test_workload_from_the_zoo(gen):
    w = diffusers_workload("flux-tiny", (48, 80), batch=2, method="lit",
                           options={"dwc_kernel": 0})
    assert w.attention_shape == (2, 2, 22, 16, Layout((3, 5), text=7, text_first=True))
    assert w.description["weights"] == "random (seed 0)"
    assert w.description["projections"] == "re-initialised"  # LiT's recipe
    flops = w.description["flops"]
    assert 0 < flops["attention"] < flops["attention_dense"]  # LiT counts its text tokens
    assert w.description["tokens"] == 22 and w.description["text_tokens"] == 7
    sd3 = diffusers_workload("sd3-tiny", (48, 80))
    assert [count for count, _ in sd3.attention_calls()] == [2, 1]
    assert sd3.step().shape == sd3.inputs["hidden_states"].shape


def test_workload_from_a_folder_measures_every_method_at_model_level(saved_flux):
    """What `run --model-path <saved tiny FLUX> --level model` needs: every method builds;
    methods that do not take text tokens yet raise ValueError when the step runs (never
    compute something else)."""
    _, pipe = saved_flux
    ran = {}
    for method in ("softmax", "lit", "clear", "sla"):
        w = diffusers_workload(pipe, (48, 80), method=method)
        assert w.description["weights"].startswith("--model-path")
        try:
            ran[method] = w.step().shape
        except ValueError as err:
            ran[method] = str(err)
    assert ran["softmax"] == (1, 15, 16)
    assert set(ran) == {"softmax", "lit", "clear", "sla"}


def test_workload_refuses_before_building():
    with pytest.raises(ValueError, match="multiples of 32 px"):
        diffusers_workload("sana-1.6b", 1000)
    with pytest.raises(ValueError, match="radius"):
        diffusers_workload("flux.1-dev", 1024, method="clear", options={"radius": 0})
