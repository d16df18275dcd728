"""The shapes world: a procedural, seeded, GenEval-style dataset with exact ground truth.

Images of 1-4 flat shapes (circle, square, triangle) in a fixed palette on a
black background. Every class label is a prompt of one of GenEval's six tasks
(Ghosh et al., 2023), so a later detector can score samples task by task:

=================  =====================================  ======
task               prompt                                 labels
=================  =====================================  ======
single_object      "a red circle" (shape and colour)      3 × 4
two_object         "a circle and a square" (colours free)  3
counting           "three triangles" (1-4, colours free)  3 × 4
colors             "a blue object" (the shape is free)       4
position           "a circle left of a square"            6 × 4
color_attr         "a red circle and a blue square"       3 × 12
=================  =====================================  ======

91 labels in all (``python -m attnbench world --describe`` prints them).
Conventions the detector can rely on, because rendering guarantees them:

* shapes never overlap or touch (boxes at least one pixel apart) and lie
  inside the image; colours are exact palette values (no anti-aliasing), so
  connected components of one palette colour are exactly the objects;
* "A left of B" means A's box ends before B's begins (``A.x1 <= B.x0``);
  "above" likewise on y (y grows downwards); the other axis is free;
* an object's box is the tight box of its pixels, ``(x0, y0, x1, y1)`` with
  exclusive ends;
* what a prompt leaves free (colours in two_object/counting, the shape in
  colors) is drawn uniformly.

A scene is a pure function of ``(seed, index)``: the same world yields the same
image for an index on every machine and in every process.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: the palette: name → RGB (uint8); exact values, far apart in RGB
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
MAX_OBJECTS = 4
_NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Prompt:
    """One class label: its GenEval task, its text, and what it constrains.

    ``shapes``/``colors`` list the objects the prompt names, in order; a
    ``None`` colour is free. ``count`` is the number of objects in the image;
    ``relation`` (position task) relates object 0 to object 1.
    """

    label: int
    task: str
    text: str
    shapes: tuple[str | None, ...]
    colors: tuple[str | None, ...]
    count: int
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plural(shape: str) -> str:
    return shape + "s"


def build_prompts() -> list[Prompt]:
    """The label space, in task order (label ids are positions in this list)."""
    specs: list[tuple] = []
    colors = list(PALETTE)
    for shape in SHAPES:
        for color in colors:
            specs.append(("single_object", f"a {color} {shape}", (shape,), (color,), 1, None))
    for a, b in itertools.combinations(SHAPES, 2):
        specs.append(("two_object", f"a {a} and a {b}", (a, b), (None, None), 2, None))
    for shape in SHAPES:
        for n in range(1, MAX_OBJECTS + 1):
            noun = shape if n == 1 else _plural(shape)
            specs.append(("counting", f"{_NUMBERS[n]} {noun}", (shape,) * n, (None,) * n, n,
                          None))
    for color in colors:
        specs.append(("colors", f"a {color} object", (None,), (color,), 1, None))
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            specs.append(("position", f"a {a} {rel} a {b}", (a, b), (None, None), 2, rel))
    for a, b in itertools.combinations(SHAPES, 2):
        for ca, cb in itertools.permutations(colors, 2):
            specs.append(("color_attr", f"a {ca} {a} and a {cb} {b}", (a, b), (ca, cb), 2,
                          None))
    return [Prompt(i, *spec) for i, spec in enumerate(specs)]


PROMPTS: list[Prompt] = build_prompts()
NUM_CLASSES = len(PROMPTS)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: shape, palette colour, tight box ``(x0, y0, x1, y1)`` (exclusive)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    pixels: int


@dataclass(frozen=True)
class Scene:
    """An image's ground truth: its label (prompt) and every object in it."""

    index: int
    label: int
    image_size: int
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    @property
    def prompt(self) -> Prompt:
        return PROMPTS[self.label]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt"] = self.prompt.text
        data["task"] = self.prompt.task
        return data


# --------------------------------------------------------------------------- rendering


def shape_mask(shape: str, side: int) -> np.ndarray:
    """A ``side × side`` boolean mask of ``shape`` (pixel centres inside the figure).

    Circle: the inscribed disc; square: the whole box; triangle: upright
    isosceles, apex at the top centre, base on the bottom row.
    """
    c = (np.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return np.abs(xx - 0.5) <= 0.5 * yy + 1e-9
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _tight_box(mask: np.ndarray, x0: int, y0: int) -> tuple[tuple[int, int, int, int], int]:
    ys, xs = np.nonzero(mask)
    box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
           y0 + int(ys.max()) + 1)
    return box, int(mask.sum())


def render(scene: Scene) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 image of ``scene``."""
    n = scene.image_size
    image = np.empty((n, n, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        side = max(x1 - x0, y1 - y0)
        mask = shape_mask(obj.shape, side)
        # the mask's tight box sits at the top-left of its side × side square
        ys, xs = np.nonzero(mask)
        ox, oy = x0 - int(xs.min()), y0 - int(ys.min())
        region = image[oy:oy + side, ox:ox + side]
        region[mask[: region.shape[0], : region.shape[1]]] = PALETTE[obj.color]
    return image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` → float32 ``[..., 3, H, W]`` in [-1, 1] (DiT's pixel range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return x.movedim(-1, -3).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[..., 3, H, W]`` in [-1, 1] → uint8 ``[..., H, W, 3]`` (DiT's sample packing)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


# --------------------------------------------------------------------------- the world


class ShapesWorld(torch.utils.data.Dataset):
    """The seeded dataset: ``world[i]`` → ``(image [3, H, W] in [-1, 1], label)``.

    ``image_size`` is 32 or 64 (any size ≥ 16 works); ``length`` only bounds
    iteration (every index has an image); ``labels`` restricts the label space
    (a subset of label ids, e.g. one task's) while keeping the ids.
    """

    def __init__(self, image_size: int = 32, *, seed: int = 0, length: int = 1 << 20,
                 labels: list[int] | None = None, min_size: float = 0.25,
                 max_size: float = 0.42) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        if not 0 < min_size <= max_size < 0.5:
            raise ValueError("object sizes must satisfy 0 < min_size <= max_size < 0.5 "
                             f"(fractions of the image side), got {min_size}, {max_size}")
        self.image_size = image_size
        self.seed = int(seed)
        self.length = int(length)
        self.labels = list(range(NUM_CLASSES)) if labels is None else [int(i) for i in labels]
        bad = [i for i in self.labels if not 0 <= i < NUM_CLASSES]
        if bad or not self.labels:
            raise ValueError(f"labels must be ids in [0, {NUM_CLASSES}), got {bad or labels}")
        self.min_size, self.max_size = min_size, max_size

    num_classes = NUM_CLASSES
    channels = 3

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"ShapesWorld({self.image_size}px, seed={self.seed}, "
                f"{len(self.labels)}/{NUM_CLASSES} labels)")

    def describe(self) -> dict[str, Any]:
        return {"kind": "shapes", "image_size": self.image_size, "seed": self.seed,
                "num_classes": NUM_CLASSES, "labels": len(self.labels)}

    # ----- scenes -----------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def scene(self, index: int, label: int | None = None) -> Scene:
        """The ground truth of image ``index`` (its label drawn from the seed, or ``label``)."""
        rng = self._rng(index)
        drawn = self.labels[int(rng.integers(len(self.labels)))]
        label = drawn if label is None else int(label)
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"label must lie in [0, {NUM_CLASSES}), got {label}")
        return self._compose(index, PROMPTS[label], rng)

    def _compose(self, index: int, prompt: Prompt, rng: np.random.Generator) -> Scene:
        n = self.image_size
        colors = list(PALETTE)
        count = prompt.count
        lo, hi = self.min_size, self.max_size
        if count >= 3:  # room for three or four objects
            lo, hi = 0.2, 0.3
        for attempt in range(200):
            shrink = 1.0 - 0.002 * attempt
            boxes: list[tuple[int, int, int, int]] = []
            sides = rng.integers(max(4, round(lo * n * shrink)),
                                 max(5, round(hi * n * shrink)) + 1, size=count)
            for side in sides:
                side = int(side)
                x0 = int(rng.integers(0, n - side + 1))
                y0 = int(rng.integers(0, n - side + 1))
                boxes.append((x0, y0, x0 + side, y0 + side))
            if not _apart(boxes):
                continue
            if prompt.relation is not None and not related(boxes[0], boxes[1],
                                                            prompt.relation):
                continue
            break
        else:  # pragma: no cover - 200 tries always suffice for <= 4 objects of <= 0.42·n
            raise RuntimeError(f"could not place {count} objects for {prompt.text!r}")
        objects = []
        for i, (x0, y0, x1, _) in enumerate(boxes):
            shape = prompt.shapes[i] if i < len(prompt.shapes) else prompt.shapes[-1]
            if shape is None:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = prompt.colors[i] if i < len(prompt.colors) else None
            if color is None:
                color = colors[int(rng.integers(len(colors)))]
            side = x1 - x0
            box, pixels = _tight_box(shape_mask(shape, side), x0, y0)
            objects.append(ShapeObject(shape, color, box, pixels))
        return Scene(index=int(index), label=prompt.label, image_size=n, objects=tuple(objects))

    # ----- images -----------------------------------------------------------------------
    def image(self, index: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` of image ``index``."""
        return render(self.scene(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.scene(index)
        return to_tensor(render(scene)), scene.label

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: ``(x [B, 3, H, W] in [-1, 1], y [B])`` for ``indices``."""
        scenes = [self.scene(int(i)) for i in indices]
        images = np.stack([render(s) for s in scenes])
        return to_tensor(images), torch.tensor([s.label for s in scenes], dtype=torch.long)


def _apart(boxes: list[tuple[int, int, int, int]], gap: int = 1) -> bool:
    """No two boxes overlap or touch (at least ``gap`` background pixels between)."""
    for a, b in itertools.combinations(boxes, 2):
        if not (a[2] + gap <= b[0] or b[2] + gap <= a[0]
                or a[3] + gap <= b[1] or b[3] + gap <= a[1]):
            return False
    return True


def related(a: tuple[int, int, int, int], b: tuple[int, int, int, int], relation: str) -> bool:
    """Is box ``a`` ``relation`` box ``b``? The world's convention (boxes, not centres)."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return b[2] <= a[0]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return b[3] <= a[1]
    raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")


def check_scene(scene: Scene) -> list[str]:
    """What in ``scene`` contradicts its prompt (empty when it satisfies it).

    The reference for a detector: the same rules, on ground truth instead of
    detections.
    """
    p = scene.prompt
    objs = scene.objects
    problems = []
    if len(objs) != p.count:
        problems.append(f"{len(objs)} objects, prompt wants {p.count}")
    for i, obj in enumerate(objs):
        want_shape = p.shapes[i] if i < len(p.shapes) else p.shapes[-1]
        want_color = p.colors[i] if i < len(p.colors) else None
        if want_shape is not None and obj.shape != want_shape:
            problems.append(f"object {i} is a {obj.shape}, prompt wants a {want_shape}")
        if want_color is not None and obj.color != want_color:
            problems.append(f"object {i} is {obj.color}, prompt wants {want_color}")
    if p.relation is not None and len(objs) >= 2 and not related(
            objs[0].box, objs[1].box, p.relation):
        problems.append(f"object 0 is not {p.relation} object 1")
    if not _apart([o.box for o in objs]):
        problems.append("objects touch or overlap")
    return problems


def describe_labels(as_json: bool = False) -> str:
    """The label space, one line per label grouped by task (or JSON)."""
    if as_json:
        return json.dumps({"num_classes": NUM_CLASSES, "tasks": list(TASKS),
                           "shapes": list(SHAPES), "palette": PALETTE,
                           "relations": list(RELATIONS),
                           "labels": [p.to_dict() for p in PROMPTS]}, indent=2)
    lines = [f"shapes world: {NUM_CLASSES} class labels, GenEval's six tasks",
             f"  shapes {', '.join(SHAPES)}; palette "
             + ", ".join(f"{k} {v}" for k, v in PALETTE.items())
             + f"; background {BACKGROUND}",
             f"  {MAX_OBJECTS} objects at most; CFG null label = {NUM_CLASSES}"]
    for task in TASKS:
        members = [p for p in PROMPTS if p.task == task]
        lines.append(f"\n{task} ({len(members)} labels, ids {members[0].label}-"
                     f"{members[-1].label}):")
        lines.extend(f"  {p.label:>3}  {p.text}" for p in members)
    return "\n".join(lines)


def task_labels(task: str) -> list[int]:
    """The label ids of one task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return [p.label for p in PROMPTS if p.task == task]
