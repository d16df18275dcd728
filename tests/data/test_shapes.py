"""The shapes world: label space, determinism, exact ground truth, sources, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnbench.cli import main
from attnbench.data import (
    NUM_CLASSES,
    PALETTE,
    PROMPTS,
    TASKS,
    ShapesWorld,
    TensorSource,
    check_compatible,
    check_scene,
    encode_png,
    load_npz,
    make_grid,
    open_source,
    render,
    task_labels,
)
from attnbench.data.sources import load_folder


def test_label_space_covers_genevals_six_tasks():
    assert NUM_CLASSES == len(PROMPTS) == 91
    assert [p.label for p in PROMPTS] == list(range(NUM_CLASSES))
    counts = {task: len(task_labels(task)) for task in TASKS}
    assert counts == {"single_object": 12, "two_object": 3, "counting": 12, "colors": 4,
                      "position": 24, "color_attr": 36}
    texts = [p.text for p in PROMPTS]
    assert len(set(texts)) == len(texts)
    assert "three triangles" in texts and "a circle left of a square" in texts
    assert {p.count for p in PROMPTS if p.task == "counting"} == {1, 2, 3, 4}


@pytest.mark.parametrize("size", [32, 64])
def test_every_scene_satisfies_its_prompt(size):
    world = ShapesWorld(size, seed=3)
    for index in range(300):
        scene = world.scene(index)
        assert check_scene(scene) == [], (scene.prompt.text, scene.objects)
    for label in range(NUM_CLASSES):  # every label, forced
        assert check_scene(world.scene(1000 + label, label=label)) == []


def test_ground_truth_is_exact():
    """Pixels of each palette colour are exactly the objects of that colour, inside their boxes."""
    world = ShapesWorld(32, seed=1)
    for index in range(60):
        scene = world.scene(index)
        image = render(scene)
        colours = {name: np.all(image == np.array(rgb), axis=-1) for name, rgb in PALETTE.items()}
        covered = np.zeros(image.shape[:2], dtype=bool)
        for name, mask in colours.items():
            objs = [o for o in scene.objects if o.color == name]
            assert int(mask.sum()) == sum(o.pixels for o in objs)
            for o in objs:
                x0, y0, x1, y1 = o.box
                sub = mask[y0:y1, x0:x1]
                assert sub.any(axis=0).all() and sub.any(axis=1).all()  # tight box
            covered |= mask
        assert np.all(image[~covered] == 0)  # the rest is background


def test_world_is_deterministic_and_seeded():
    a, b = ShapesWorld(32, seed=0), ShapesWorld(32, seed=0)
    x1, y1 = a.get([0, 5, 9])
    x2, y2 = b.get([0, 5, 9])
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 3, 32, 32) and x1.min() >= -1 and x1.max() <= 1
    x3, _ = ShapesWorld(32, seed=1).get([0, 5, 9])
    assert not torch.equal(x1, x3)
    x, y = a[5]
    assert torch.equal(x, x1[1]) and y == int(y1[1])


def test_label_subsets_and_bad_arguments():
    world = ShapesWorld(32, labels=task_labels("counting"))
    assert {world.scene(i).prompt.task for i in range(40)} == {"counting"}
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(8)
    with pytest.raises(ValueError, match="labels"):
        ShapesWorld(32, labels=[NUM_CLASSES])
    with pytest.raises(ValueError, match="task"):
        task_labels("styles")


def test_png_and_grid():
    images = np.stack([ShapesWorld(32).image(i) for i in range(6)])
    grid = make_grid(images, nrow=3, pad=2)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    png = encode_png(grid)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), grid)


# --------------------------------------------------------------------------- sources


def test_npz_and_folder_sources(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 4, 8, 8)).astype(np.float32)
    y = np.arange(10)
    np.savez(tmp_path / "lat.npz", latents=x, labels=y)
    src = load_npz(tmp_path / "lat.npz")
    assert len(src) == 10 and src.channels == 4 and src.image_size == 8
    xb, yb = src.get([3, 1])
    assert torch.equal(xb, torch.from_numpy(x[[3, 1]])) and yb.tolist() == [3, 1]
    # DiT's sample .npz: uint8 N×H×W×3 under arr_0 (+ labels under arr_1)
    imgs = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    imgs[1] = 255
    np.savez(tmp_path / "samples.npz", imgs, np.array([0, 1]))
    s = open_source(tmp_path / "samples.npz")
    assert s.channels == 3 and float(s.x[0].max()) == -1 and float(s.x[1].min()) == 1
    # fast-DiT's layout: one .npy per sample
    (tmp_path / "fd" / "features").mkdir(parents=True)
    (tmp_path / "fd" / "labels").mkdir()
    for i in range(3):
        np.save(tmp_path / "fd" / "features" / f"{i}.npy", x[i:i + 1])
        np.save(tmp_path / "fd" / "labels" / f"{i}.npy", np.array([i]))
    fd = load_folder(tmp_path / "fd")
    assert len(fd) == 3 and fd.channels == 4
    xb, yb = fd.get([2])
    assert torch.equal(xb[0], torch.from_numpy(x[2])) and yb.tolist() == [2]
    assert isinstance(open_source("shapes"), ShapesWorld)


def test_bad_data_is_refused(tmp_path):
    np.savez(tmp_path / "nolabels.npz", latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="labels"):
        load_npz(tmp_path / "nolabels.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="NaN"):
        TensorSource(torch.full((1, 3, 4, 4), float("nan")), torch.zeros(1))
    src = TensorSource(torch.zeros(2, 4, 8, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="channels"):
        check_compatible(src, 3, 10, 2)
    with pytest.raises(ValueError, match="labels outside"):
        check_compatible(src, 4, 3, 2)
    with pytest.raises(ValueError, match="patch"):
        check_compatible(src, 4, 10, 3)


# --------------------------------------------------------------------------- CLI


def test_world_cli(tmp_path, capsys):
    assert main(["world", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "91 class labels" in out and "color_attr" in out and "a red circle" in out
    assert main(["world", "--describe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_classes"] == 91 and len(data["labels"]) == 91
    assert main(["world", "--render", str(tmp_path / "g.png"), "--count", "4",
                 "--size", "64"]) == 0
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["world", "--scene", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"]
    assert main(["world", "--task", "nope", "--scene", "1"]) == 2
