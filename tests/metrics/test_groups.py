"""The metric-group registry, and the groups that read local weights: CLIP score, LPIPS."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnbench.metrics import groups
from attnbench.results import HIGHER_IS_BETTER


def test_every_group_is_a_module_with_check_and_compute_and_known_directions():
    for group in groups.GROUPS.values():
        module = importlib.import_module(group.module)
        assert callable(module.check_group) and callable(module.compute_group)
        for metric, higher in group.metrics.items():
            assert HIGHER_IS_BETTER[metric] is higher, metric  # the report reads the same
            assert groups.group_of(metric) == group.name
    assert groups.names("dit") == ("fid", "geneval", "fidelity")
    assert set(groups.names("pair")) == {"fid", "fidelity", "clip", "lpips"}
    with pytest.raises(ValueError, match="--metrics 'clip'.*for attnbench's DiT"):
        groups.parse_groups("clip", kind="dit")


# --------------------------------------------------------------------------- LPIPS


def _lpips_files(tmp_path, gen):
    from safetensors.torch import save_file

    from attnbench.metrics.lpips import CHANNELS, alexnet_features

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    backbone = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    save_file(backbone, tmp_path / "alexnet.safetensors")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
              for i, c in enumerate(CHANNELS)}
    torch.save(linear, tmp_path / "alex.pth")
    return tmp_path / "alexnet.safetensors", tmp_path / "alex.pth", backbone, linear


def _lpips_by_hand(a, b, backbone, linear):
    """LPIPS v0.1 written out in float64: AlexNet's convs one by one, the five ReLU taps."""
    # the lpips package holds its ScalingLayer constants as float32 tensors
    shift = torch.tensor([-0.030, -0.088, -0.188]).double().view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).double().view(1, 3, 1, 1)
    w = {k: v.double() for k, v in backbone.items()}

    def taps(x):
        x = (x - shift) / scale
        x = F.relu(F.conv2d(x, w["features.0.weight"], w["features.0.bias"], 4, 2))
        out = [x]
        x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, w["features.3.weight"], w["features.3.bias"], 1, 2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for i in (6, 8, 10):
            x = F.relu(F.conv2d(x, w[f"features.{i}.weight"], w[f"features.{i}.bias"], 1, 1))
            out.append(x)
        return out

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for i, (fa, fb) in enumerate(zip(taps(a), taps(b), strict=True)):
        na = fa / (torch.sqrt((fa**2).sum(1, keepdim=True)) + 1e-10)
        nb = fb / (torch.sqrt((fb**2).sum(1, keepdim=True)) + 1e-10)
        lin = linear[f"lin{i}.model.1.weight"].double()
        total += F.conv2d((na - nb) ** 2, lin).mean((1, 2, 3))
    return total


def test_lpips_matches_the_formula_by_hand(tmp_path, gen):
    from attnbench.metrics.lpips import LPIPS, lpips_distances, read_weights, to_input

    bb, lin, backbone, linear = _lpips_files(tmp_path, gen)
    model = LPIPS(read_weights(bb, "--lpips-backbone"), read_weights(lin, "--lpips-weights"))
    a = torch.randint(0, 256, (3, 40, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    b = torch.randint(0, 256, (3, 40, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    want = _lpips_by_hand(to_input(a).double(), to_input(b).double(), backbone, linear)
    np.testing.assert_allclose(lpips_distances(model, a, b), want.numpy(), rtol=1e-5)  # float32
    got = lpips_distances(model.double(), a, b)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    assert np.all(lpips_distances(model, a, a) == 0)
    assert (got > 0).all()


def test_lpips_and_clip_refuse_missing_inputs_naming_the_flag(tmp_path, gen):
    bb, lin, _, _ = _lpips_files(tmp_path, gen)
    ctx = groups.EvalContext("pair", settings={"size": (32, 48)})
    with pytest.raises(ValueError, match="--lpips-backbone FILE"):
        groups.check(("lpips",), ctx)
    ctx.settings.update(lpips_backbone=str(tmp_path / "none.pth"), lpips_weights=str(lin))
    with pytest.raises(ValueError, match="--lpips-backbone .*none.pth: no such file"):
        groups.check(("lpips",), ctx)
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pth")  # a module: a pickle
    ctx.settings["lpips_backbone"] = str(tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="--lpips-backbone .*pickle.pth: not a readable"):
        groups.check(("lpips",), ctx)
    ctx.settings.update(lpips_backbone=str(bb), size=(16, 16))
    with pytest.raises(ValueError, match="too small"):
        groups.check(("lpips",), ctx)
    with pytest.raises(ValueError, match="--clip-model DIR"):
        groups.check(("clip",), groups.EvalContext("pair"))
    (tmp_path / "clip").mkdir()
    with pytest.raises(ValueError, match="--clip-model .*: no config.json"):
        groups.check(("clip",), groups.EvalContext("pair", settings={"clip_model":
                                                                      str(tmp_path / "clip")}))


# --------------------------------------------------------------------------- CLIP


def save_tiny_clip(folder):
    """A CLIP built from a config (random weights) with a local tokenizer and processor."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from attnbench.integrations.diffusers.tiny import tokenizer, vocab_size

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size(), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_clamped_cosine(tmp_path, gen):
    from attnbench.metrics.clip_score import clip_scores, load

    model, tok, proc = load(save_tiny_clip(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 40, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    prompts = ["a red cat", "a blue car on the sea", "tree"]
    got = clip_scores(images, prompts, model, tok, proc)  # one batch: the same padding
    with torch.no_grad():
        pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = tok(prompts, padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**text).pooler_output)
    img, txt = img.double(), txt.double()
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    np.testing.assert_allclose(got, (100 * cos.clamp(min=0)).numpy(), rtol=1e-9)
    assert ((got >= 0) & (got <= 100)).all()
