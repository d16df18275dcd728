"""scripts/world_t2i_study.py: its matrix of students and its readings of the stages' outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "world_t2i_study.py"


def _study():
    if "world_t2i_study" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("world_t2i_study", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["world_t2i_study"] = module
        spec.loader.exec_module(module)
    return sys.modules["world_t2i_study"]


def test_the_matrix_is_budget_matched_and_names_each_cell_once():
    study = _study()
    cells = study.cells(1000, [0, 100, 300])
    assert len({c.slug for c in cells}) == len(cells)
    main = [c for c in cells if c.what == "main"]
    assert [c.variant for c in main] == ["lit", "clear:radius=3", "clear:radius=6",
                                         "sla:block_q=16:block_kv=16:topk=0.1",
                                         "sla:block_q=16:block_kv=16:topk=0.25"]
    assert {c.steps for c in main} == {1000}
    for variant in {c.variant for c in cells}:
        mine = [c for c in cells if c.variant == variant]
        assert sorted(c.steps for c in mine if c.what == "steps") == [0, 100, 300]
        kd = next(c for c in mine if c.what == "kd_attn")
        assert kd.weights == {"kd_attn": 0.0 if variant.startswith("clear") else 0.5}
        trainable = next(c for c in mine if c.what == "trainable")
        assert trainable.trainable == ("all" if variant.startswith("clear") else "attention")
    quick = study.cells(2, [0, 1], ablate_all=False)
    assert [c.what for c in quick if c.method != "lit"] == ["main"] * 4
    assert {c.what for c in quick if c.method == "lit"} == {"main", "steps", "trainable",
                                                            "kd_attn"}


def test_variants_parse_as_run_and_fidelity_read_them():
    from attnbench.metrics.zero_shot import parse_variants

    study = _study()
    for cell in study.cells(10, [0]):
        [variant] = parse_variants(cell.variant)
        assert variant.method == cell.method
        assert set(variant.options) == set(cell.options)
        assert all(study._close(variant.options[k], v) for k, v in cell.options.items())


def test_geneval_of_a_sample_folder_reads_labels_from_its_prompts(tmp_path):
    from attnbench.data.shapes import ShapesWorld, render
    from attnbench.integrations.diffusers.world_t2i import prompt_text

    world = ShapesWorld(64, seed=3)
    labels = [0, 20, 40, 60, 90]
    images = np.stack([render(world.scene(i, label=label)) for i, label in enumerate(labels)])
    np.savez(tmp_path / "samples.npz", images, np.arange(len(labels)))
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"index": i, "prompt": prompt_text(label)}) + "\n"
        for i, label in enumerate(labels)))
    result = _study().geneval_of(tmp_path)
    assert result["geneval"] == 1.0 and result["geneval_images"] == len(labels)
    (tmp_path / "samples.npz").unlink()
    np.savez(tmp_path / "samples.npz", np.zeros_like(images), np.arange(len(labels)))
    assert _study().geneval_of(tmp_path)["geneval"] == 0.0
