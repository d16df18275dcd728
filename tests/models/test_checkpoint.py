"""Checkpoint loading: official layout, train.py files, safetensors, and every bad input."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from attnbench.models import (
    build_dit,
    infer_config,
    load_dit,
    read_checkpoint,
    save_dit,
)

from .conftest import make_inputs
from .spec import random_state, tiny_shapes, train_py_checkpoint


def assert_same_state(model, state):
    got = model.state_dict()
    assert set(got) == set(state), "every key accounted for"
    for key, value in state.items():
        assert torch.equal(got[key], value), key


# --------------------------------------------------------------------------- good files


def test_official_layout_loads_unchanged(tiny_ckpt, tiny_state):
    model = load_dit(tiny_ckpt)
    assert_same_state(model, tiny_state)
    c = model.config
    assert (c.hidden_size, c.depth, c.patch_size, c.in_channels) == (64, 2, 2, 4)
    assert (c.num_classes, c.learn_sigma, c.input_size, c.num_heads) == (10, True, 8, 4)
    assert c.name == "DiT-T/2" and c.attention == "softmax"
    assert not model.training and model.checkpoint.format == "torch"
    assert model.checkpoint.sha256() == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()


def test_config_inferred_from_shapes(gen):
    shapes = tiny_shapes(patch=4, in_channels=3, num_classes=7, learn_sigma=False, input_size=16)
    config = infer_config(random_state(shapes, gen))
    assert (config.patch_size, config.in_channels, config.num_classes) == (4, 3, 7)
    assert (config.learn_sigma, config.input_size, config.depth) == (False, 16, 2)
    assert config.num_heads == 4  # from the zoo: hidden 64, depth 2 is DiT-T


def test_train_py_checkpoint_takes_ema(tmp_path, gen):
    ema, raw = (random_state(tiny_shapes(), gen) for _ in range(2))
    path = tmp_path / "0050000.pt"
    torch.save(train_py_checkpoint(ema, raw), path)  # includes an argparse.Namespace
    model = load_dit(path)
    assert_same_state(model, ema)
    assert model.checkpoint.entry == "ema"
    assert_same_state(load_dit(path, entry="model"), raw)
    with pytest.raises(ValueError, match="no state dict under 'nope'"):
        load_dit(path, entry="nope")


def test_safetensors_and_wrapper_prefixes(tmp_path, tiny_state):
    path = tmp_path / "dit.safetensors"
    save_file({f"module.{k}": v for k, v in tiny_state.items()}, str(path))
    model = load_dit(path)
    assert_same_state(model, tiny_state)
    assert model.checkpoint.format == "safetensors"


def test_load_to_dtype(tiny_ckpt):
    model = load_dit(tiny_ckpt, dtype=torch.float64)
    assert model.pos_embed.dtype == torch.float64


@pytest.mark.parametrize("target", ["dir", "model.safetensors", "model.pt"])
def test_save_load_round_trip(tmp_path, tiny_state, gen, target):
    model = load_dit_from_state(tmp_path, tiny_state)
    weights = save_dit(model, tmp_path / "saved" / target if target != "dir" else tmp_path / "d")
    again = load_dit(weights if target != "dir" else tmp_path / "d")
    assert again.config == model.config
    assert_same_state(again, model.state_dict())
    x, t, y = make_inputs(gen)
    assert torch.equal(again(x, t, y), model(x, t, y))


def load_dit_from_state(tmp_path, state):
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    return load_dit(path)


def test_heads_override_for_sizes_outside_the_zoo(tmp_path, gen):
    path = tmp_path / "odd.pt"
    torch.save(random_state(tiny_shapes(hidden=96, depth=3), gen), path)
    with pytest.raises(ValueError, match="cannot infer the number of heads.*num_heads=N"):
        load_dit(path)
    assert load_dit(path, num_heads=6).config.num_heads == 6


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nope.pt.*dl.fbaipublicfiles"):
        load_dit(tmp_path / "nope.pt")


def test_directory_without_model(tmp_path):
    with pytest.raises(ValueError, match="directory without model.safetensors"):
        load_dit(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_dit(path)


@pytest.mark.parametrize("content", [b"<html>404 Not Found</html>", b"\x00" * 64])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "page.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_dit(path)


def test_truncated_torch_file(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.pt is truncated or corrupted.*download or copy"):
        load_dit(path)


def test_truncated_safetensors(tmp_path, tiny_state):
    full = tmp_path / "full.safetensors"
    save_file(tiny_state, str(full))
    data = full.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_dit(path)


def test_corrupted_safetensors_header(tmp_path, tiny_state):
    full = tmp_path / "full.safetensors"
    save_file(tiny_state, str(full))
    data = bytearray(full.read_bytes())
    data[9:30] = b"x" * 21  # break the JSON header, keep the magic
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_dit(path)


class Payload:
    """Unpickling this would run code: the safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, tiny_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**tiny_state, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="refused by the safe loader.*never unpickles"):
        load_dit(path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_dit(path)
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(1), "step": 3}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_dit(path)


def test_not_a_dit(tmp_path, gen):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.randn(8, 3, 3, 3, generator=gen)}, path)
    with pytest.raises(ValueError, match="does not look like a DiT.*x_embedder.proj.weight"):
        load_dit(path)


def test_missing_keys_are_listed(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k not in {"blocks.1.mlp.fc2.bias",
                                                               "t_embedder.mlp.2.weight"}}
    with pytest.raises(ValueError, match=r"missing keys \(2\): t_embedder.mlp.2.weight, "
                                         r"blocks.1.mlp.fc2.bias"):
        load_dit_from_state(tmp_path, state)


def test_unexpected_keys_are_listed(tmp_path, tiny_state, gen):
    state = {**tiny_state, "blocks.0.attn.dwc.weight": torch.randn(16, 1, 5, 5, generator=gen)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks.0.attn.dwc.weight.*"
                                         r"attention=METHOD"):
        load_dit_from_state(tmp_path, state)


def test_shape_mismatches_are_listed(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): blocks.1.mlp.fc2.weight: "
                                         r"checkpoint \(64, 100\) vs model \(64, 256\)"):
        load_dit_from_state(tmp_path, state)


def test_bad_inference_tensor(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["pos_embed"] = torch.zeros(1, 15, 64)
    with pytest.raises(ValueError, match="pos_embed has shape .*a square token grid"):
        load_dit_from_state(tmp_path, state)


def test_config_that_contradicts_the_tensors(tiny_ckpt):
    with pytest.raises(ValueError, match="hidden_size=384 in config DiT-S/2 but "
                                         "x_embedder.proj.weight says 64"):
        load_dit(tiny_ckpt, config="DiT-S/2")
    with pytest.raises(ValueError, match="learn_sigma=False given but final_layer"):
        load_dit(tiny_ckpt, learn_sigma=False)
    with pytest.raises(ValueError, match="num_classes=1000 given"):
        load_dit(tiny_ckpt, num_classes=1000)
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        load_dit(tiny_ckpt, num_heads=5)
    # what shapes cannot say is free to set
    assert load_dit(tiny_ckpt, num_heads=2).config.num_heads == 2


def test_saved_config_that_contradicts_the_tensors(tmp_path, tiny_state):
    model = load_dit_from_state(tmp_path, tiny_state)
    weights = save_dit(model, tmp_path / "m")
    config_file = weights.parent / "config.json"
    config_file.write_text(config_file.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(ValueError, match="depth=3 in config .* says 2"):
        load_dit(tmp_path / "m")
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_dit(tmp_path / "m")


def test_saved_student_of_an_unknown_method(tmp_path, tiny_state):
    weights = save_dit(load_dit_from_state(tmp_path, tiny_state), tmp_path / "m")
    config_file = weights.parent / "config.json"
    text = config_file.read_text().replace('"attention": "softmax"', '"attention": "lin"')
    config_file.write_text(text)
    with pytest.raises(ValueError, match="cannot build its attention 'lin'.*unknown attention"):
        load_dit(tmp_path / "m")


def test_read_checkpoint_returns_cpu_tensors(tiny_ckpt):
    raw = read_checkpoint(tiny_ckpt)
    assert raw.config is None and all(v.device.type == "cpu" for v in raw.state_dict.values())


def test_build_and_load_agree_on_keys(tiny_ckpt):
    assert set(build_dit("DiT-T/2").state_dict()) == set(load_dit(tiny_ckpt).state_dict())
