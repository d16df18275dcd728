"""The GenEval proxy: the detector is exact on real images, the rules match ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from attnbench.data import PROMPTS, TASKS, ShapesWorld, render, task_labels
from attnbench.metrics.geneval import classify_shape, detect, geneval_score, satisfies


def _key(objects):
    return sorted((o.shape, o.color, tuple(o.box)) for o in objects)


@pytest.mark.parametrize("size", [32, 64])
def test_detector_accuracy_on_dataset_images(size):
    """Every object found with its shape, colour and exact box (the bar is 99%)."""
    world = ShapesWorld(size, seed=7)
    n = 400 if size == 32 else 150
    exact = objects = found = 0
    for i in range(n):
        scene = world.scene(i)
        detections = detect(render(scene))
        exact += _key(detections) == _key(scene.objects)
        truth = _key(scene.objects)
        objects += len(truth)
        found += sum(1 for d in _key(detections) if d in truth)
    assert exact / n >= 0.99, f"scenes recovered exactly: {exact}/{n}"
    assert found / objects >= 0.99


def test_every_label_scores_its_own_images():
    world = ShapesWorld(32, seed=3)
    for label in range(len(PROMPTS)):
        for k in range(3):
            scene = world.scene(1000 * label + k, label=label)
            assert satisfies(label, detect(render(scene))), PROMPTS[label].text


def test_judgements_on_wrong_labels_match_ground_truth():
    """Judging an image against another label: detections agree with the true objects."""
    world = ShapesWorld(32, seed=4)
    rng = np.random.default_rng(0)
    agree = positives = 0
    n = 600
    for i in range(n):
        scene = world.scene(i)
        other = int(rng.integers(len(PROMPTS)))
        truth = satisfies(other, scene.objects)
        agree += satisfies(other, detect(render(scene))) == truth
        positives += truth
    assert agree / n >= 0.99
    assert 0 < positives < n  # both outcomes occur


def test_scores_per_task_and_overall():
    world = ShapesWorld(32, seed=5)
    scenes = [world.scene(i) for i in range(240)]
    images = np.stack([render(s) for s in scenes])
    labels = [s.label for s in scenes]
    result = geneval_score(images, labels)
    assert result.overall == 1.0 and set(result.tasks) == set(TASKS)
    assert result.strict_overall == 1.0
    # a blank image fails everything; wrong labels lower the right tasks only
    blank = np.zeros_like(images)
    assert geneval_score(blank, labels).overall == 0.0
    counting = task_labels("counting")
    shifted = [counting[(counting.index(y) + 1) % len(counting)] if y in counting else y
               for y in labels]
    mixed = geneval_score(images, shifted)
    assert mixed.tasks["counting"] < 0.5
    assert all(mixed.tasks[t] == 1.0 for t in TASKS if t != "counting")
    assert mixed.overall == pytest.approx(np.mean(list(mixed.tasks.values())))
    assert mixed.metrics()["geneval_counting"] == mixed.tasks["counting"]


def test_rules_follow_geneval_semantics():
    from attnbench.data.shapes import ShapeObject

    def obj(shape, color, x0, y0=0, side=5):
        return ShapeObject(shape, color, (x0, y0, x0 + side, y0 + side), side * side)

    two = next(p for p in PROMPTS if p.text == "a circle and a square")
    scene = [obj("circle", "red", 0), obj("square", "blue", 10), obj("triangle", "green", 20)]
    assert satisfies(two, scene)  # an extra object is allowed ...
    assert not satisfies(two, scene, strict=True)  # ... except in strict mode
    three = next(p for p in PROMPTS if p.text == "three circles")
    circles = [obj("circle", "red", 7 * i) for i in range(4)]
    assert satisfies(three, circles[:3]) and not satisfies(three, circles)  # exact count
    left = next(p for p in PROMPTS if p.text == "a circle left of a square")
    assert satisfies(left, [obj("circle", "red", 0), obj("square", "red", 6)])
    assert not satisfies(left, [obj("circle", "red", 6), obj("square", "red", 0)])
    attr = next(p for p in PROMPTS if p.text == "a red circle and a blue square")
    assert not satisfies(attr, [obj("circle", "blue", 0), obj("square", "red", 10)])


def test_detector_tolerates_noise_and_drops_specks():
    world = ShapesWorld(32, seed=6)
    rng = np.random.default_rng(0)
    ok = 0
    for i in range(100):
        scene = world.scene(i)
        noisy = np.clip(render(scene) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        ok += [(o.shape, o.color) for o in sorted(detect(noisy), key=lambda d: d.box)] == [
            (o.shape, o.color) for o in sorted(scene.objects, key=lambda o: o.box)]
    assert ok >= 95
    speck = np.zeros((32, 32, 3), np.uint8)
    speck[3:5, 3:5] = (230, 30, 30)  # 4 red pixels: noise, not an object
    assert detect(speck) == []


def test_shape_templates():
    from attnbench.data import shape_mask

    for shape in ("circle", "square", "triangle"):
        for side in range(5, 28):
            mask = shape_mask(shape, side)
            ys, xs = np.nonzero(mask)
            crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert classify_shape(crop) == (shape, 1.0), (shape, side)


def test_bad_input():
    with pytest.raises(ValueError, match="labels"):
        geneval_score(np.zeros((2, 16, 16, 3), np.uint8), [0])
    with pytest.raises(ValueError, match="shapes-world labels"):
        geneval_score(np.zeros((1, 16, 16, 3), np.uint8), [500])
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((16, 16), np.uint8))
