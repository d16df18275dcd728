"""Zero-shot fidelity: the streamed statistics, the shipped teacher's layers, the command."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attnbench import attention
from attnbench.attention import Layout
from attnbench.cli import main
from attnbench.metrics import zero_shot as zs
from attnbench.results import ZERO_SHOT_LEVEL

GRID = (4, 5)


def _dense_stats(q, k, v, grid, mask):
    """Everything the streamed pass computes, from the whole N×N map at once (float64)."""
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    n = q.shape[2]
    rows = p.shape[0] * p.shape[1] * n
    d2 = zs.squared_distances(grid, 0, n)
    hist = torch.zeros(int(d2.max()) + 1, dtype=torch.float64)
    hist.scatter_add_(0, d2.flatten(), p.sum((0, 1)).flatten())
    return {
        "out": p @ v,
        "entropy": -(p * p.log()).sum().item() / rows,
        "locality": hist / rows,
        "recall": (p * mask).sum().item() / rows,
        "erank": zs.effective_rank(p).mean().item(),
    }


@pytest.mark.parametrize("chunk", [1, 7 * 2 * 3 * 20, 1 << 22])  # 1 row, 7 rows, all rows
def test_streamed_statistics_equal_a_dense_computation(chunk):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.rand(20, 20, generator=g) < 0.4
    got = zs.softmax_pass(q, k, v, GRID, {"m": lambda r0, r1: mask[r0:r1]},
                          chunk_elements=chunk)
    want = _dense_stats(q, k, v, GRID, mask)
    torch.testing.assert_close(got.out, want["out"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.locality, want["locality"], rtol=1e-12, atol=1e-12)
    assert got.entropy == pytest.approx(want["entropy"], rel=1e-12)
    assert got.entropy_norm == pytest.approx(want["entropy"] / math.log(20), rel=1e-12)
    assert got.mass_recall["m"] == pytest.approx(want["recall"], rel=1e-12)
    assert got.erank_rows == 20 and got.erank == pytest.approx(want["erank"], rel=1e-10)
    assert got.locality.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_effective_rank_and_locality_on_known_maps():
    assert zs.effective_rank(torch.eye(6, dtype=torch.float64)).item() == pytest.approx(6)
    assert zs.effective_rank(torch.ones(6, 6, dtype=torch.float64) / 6).item() == \
        pytest.approx(1, abs=1e-6)
    hist = torch.tensor([0.5, 0.3, 0.1, 0.0, 0.1], dtype=torch.float64)  # per dy² + dx²
    assert zs.mass_within(hist, 1) == pytest.approx(0.5)  # d² < 1
    assert zs.mass_within(hist, 1.5) == pytest.approx(0.9)  # d² < 2.25: d² ∈ {0, 1, 2}
    assert zs.radius_holding(hist, 0.5) == 1 and zs.radius_holding(hist, 0.95) == 3


def test_the_row_sample_of_the_effective_rank_is_spread_and_bounded():
    rows = zs.erank_sample(100, batch_heads=4, budget=4 * 100 * 10)
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 99
    assert torch.equal(zs.erank_sample(100, 4), torch.arange(100))


def test_heads_are_regrouped_over_the_same_channels():
    x = torch.randn(2, 4, 5, 8)
    merged = zs.merge_heads(x)
    assert torch.equal(zs.merge_heads(zs.split_heads(x, 2)), merged)
    assert zs.split_heads(x, 2).shape == (2, 2, 5, 16)


def test_variants_reuse_the_method_parser_and_take_heads_off():
    variants = zs.parse_variants("lit:heads=4,clear:radius=3,sla:topk=0.25:block_q=8")
    assert [(v.method, v.heads) for v in variants] == [("lit", 4), ("clear", None),
                                                       ("sla", None)]
    assert variants[1].options == {"radius": 3.0}
    assert variants[0].label == "lit:heads=4"
    assert zs.with_softmax(variants)[0].label == "softmax"
    with pytest.raises(ValueError, match="unknown option"):
        zs.parse_variants("clear:radios=3")
    with pytest.raises(ValueError, match="heads"):
        zs.parse_variants("lit:heads=0")


# --------------------------------------------------------------------------- the teacher


@pytest.fixture(scope="module")
def teacher_layer():
    """q, k, v of the shipped teacher's block 2 on noised shapes-world images (float64)."""
    from attnbench.diffusion import Diffusion
    from attnbench.models import load_dit
    from attnbench.models.teacher import default_teacher_path

    teacher = load_dit(default_teacher_path()).double()
    x0, y, noise = zs.shapes_inputs(teacher.config, 2, seed=0)
    t = torch.full((2,), 500)
    xt = Diffusion().q_sample(x0.double(), t, noise.double())
    captured = {}

    def grab(layer, mixer, x, grid):
        if layer == 2:
            captured["qkv"], captured["grid"] = mixer.split_heads(x), grid

    with torch.no_grad(), zs.on_each_layer(teacher, grab):
        teacher(xt, t, y)
    return teacher, captured["qkv"], captured["grid"]


def _measure(teacher, qkv, grid, spec):
    from attnbench.attention import get

    (variant,) = zs.parse_variants(spec)
    student, _ = zs.convert_variant(teacher, variant)
    opts = get(variant.method).resolve(variant.options, mixer=True)
    q, k, v = qkv
    mask, note = zs.exact_pairs(variant, q, k, grid, opts)
    sm = zs.softmax_pass(q, k, v, grid, {} if mask is None else {"m": mask})
    core = student.blocks[2].attn.core if zs.inherits_layer(student, teacher, 2) else None
    out = zs.layer_outputs(variant, q, k, v, grid, opts, student.config.heads, core)
    err, cos = zs.compare(out, zs.merge_heads(sm.out))
    return err, cos, sm.mass_recall.get("m", float("nan")), note


def test_softmax_on_the_teacher_has_error_zero_and_mass_one(teacher_layer):
    err, cos, recall, _ = _measure(*teacher_layer, "softmax")
    assert err < 1e-12 and cos == pytest.approx(1, abs=1e-12)
    assert recall == pytest.approx(1, abs=1e-12)


def test_a_clear_radius_covering_the_grid_is_softmax(teacher_layer):
    err, _cos, recall, _ = _measure(*teacher_layer, "clear:radius=12")  # 8×8 grid: d < 10
    assert err < 1e-10 and recall == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("spec", ["lit", "lit:heads=4", "clear:radius=2",
                                  "sla:topk=0.25:block_q=8:block_kv=8"])
def test_every_method_gives_finite_numbers_on_the_teacher(teacher_layer, spec):
    err, cos, recall, note = _measure(*teacher_layer, spec)
    assert 0 < err < 5 and -1 <= cos <= 1
    if spec.startswith("lit"):
        assert math.isnan(recall) and "not defined" in note
    else:
        assert 0 < recall < 1


def test_sla_mass_recall_is_the_mass_on_its_critical_blocks(teacher_layer):
    from attnbench.attention.sla import block_map

    _, (q, k, v), grid = teacher_layer
    # row-major blocks, so that the map below is SLA's own (tile order is tested in
    # tests/attention/test_exact_pairs.py)
    (variant,) = zs.parse_variants("sla:topk=0.25:block_q=8:block_kv=8:order=row-major")
    opts = attention.get("sla").resolve({"block_q": 8, "block_kv": 8, "topk": 0.25,
                                         "order": "row-major"})
    mask, _ = zs.exact_pairs(variant, q, k, grid, opts)
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    blocks = block_map(q, k, 8, 8, 0.25)
    dense = blocks.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
    want = (p * dense).sum().item() / (p.shape[0] * p.shape[1] * p.shape[2])
    got = zs.softmax_pass(q, k, v, grid, {"m": mask}, chunk_elements=3 * 64 * 8).mass_recall
    assert got["m"] == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- the command


FAST = ["--timesteps", "200,800", "--num", "2", "--sample-steps", "2", "--no-progress"]


def test_the_command_writes_tables_rows_and_a_report(teacher_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["fidelity", "--ckpt", str(teacher_dir), *FAST, "--out", str(out),
                 "--methods", "lit,sla:topk=0.5:block_q=4:block_kv=4"]) == 0
    layers = pd.read_csv(out / zs.FIDELITY_CSV)
    labels = ["softmax", "lit", "sla:block_kv=4:block_q=4:topk=0.5"]
    assert list(dict.fromkeys(layers["label"])) == labels
    assert len(layers) == len(labels) * 2 * 2  # variants × layers × timesteps
    for column in ("rel_error", "cosine", "entropy", "erank", "radius_50"):
        assert layers[column].notna().all(), column
    soft = layers[layers["label"] == "softmax"]
    assert (soft["rel_error"] < 1e-12).all() and ((soft["mass_recall"] - 1).abs() < 1e-12).all()
    assert layers[layers["label"] == "lit"]["mass_recall"].isna().all()
    e2e = pd.read_csv(out / zs.END_TO_END_CSV)
    assert len(e2e) == len(labels) * 2 and e2e["eps_rel_error"].notna().all()

    from attnbench.results import load_table

    frame, _ = load_table(out)
    rows = frame[frame["level"] == ZERO_SHOT_LEVEL]
    assert len(rows) == len(labels)
    report = (out / "report.md").read_text()
    assert "Zero-shot: each method against softmax" in report and "zero_shot_heatmap.png" in report
    assert (out / "plots" / "zero_shot_locality.png").is_file()

    from attnbench.report import write_report

    full = write_report([out]).markdown.read_text()  # the full report keeps the section
    assert "Zero-shot: each method against softmax" in full


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown"),
    (["--methods", "lit:heads=x"], "heads"),
    (["--methods", "clear:radius=-1"], "radius"),
    (["--timesteps", "1000"], "--timesteps"),
    (["--timesteps", "a,b"], "--timesteps"),
    (["--num", "0"], "--num"),
    (["--ckpt", "/nonexistent/ckpt"], "--ckpt"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert main(["fidelity", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "attnbench fidelity: error:" in err and message in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_a_users_file_in_out_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "fidelity.csv").write_text("my own table\n")
    assert main(["fidelity", *FAST, "--methods", "clear:radius=3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fidelity.csv" in err and "--force" in err
    assert (out / "fidelity.csv").read_text() == "my own table\n"


# --------------------------------------------------------------------------- given inputs

LATENT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
              num_classes=10, learn_sigma=True, name="tiny-latent")


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """A tiny latent (4-channel) softmax DiT: not a shapes-world model."""
    from attnbench.models import DiTConfig, save_dit
    from tests.helpers import tiny_pixel_dit

    path = tmp_path_factory.mktemp("latent") / "dit"
    save_dit(tiny_pixel_dit(config=DiTConfig(**LATENT)), path)
    return path


def _inputs_file(path, **tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_given_latents_on_a_latent_model(latent_ckpt, tmp_path):
    """--inputs: a latent DiT on its own non-square latents (6x10: a 3x5 token grid)."""
    g = torch.Generator().manual_seed(0)
    inputs = _inputs_file(tmp_path / "x.safetensors", x0=torch.randn(3, 4, 6, 10, generator=g),
                          y=torch.tensor([1, 7, 10]))  # 10: the null class
    out = tmp_path / "run"
    assert main(["fidelity", "--ckpt", str(latent_ckpt), "--inputs", str(inputs), "--num", "2",
                 "--timesteps", "300", "--sample-steps", "2", "--no-progress",
                 "--methods", "clear:radius=9", "--out", str(out)]) == 0
    layers = pd.read_csv(out / zs.FIDELITY_CSV)
    for label in ("softmax", "clear:radius=9.0"):  # a radius covering the 3x5 grid
        rows = layers[layers["label"] == label]
        assert len(rows) == 2 and (rows["rel_error"] < 1e-10).all(), label
        assert ((rows["mass_recall"] - 1).abs() < 1e-12).all(), label
    from attnbench.results import load_table

    frame, meta = load_table(out)
    row = frame[frame["method"] == "clear"].iloc[0]
    assert (row["resolution"], row["height"], row["tokens"]) == (80, 48, 15)  # latents × 8
    assert row["batch"] == 2
    assert "--inputs" in meta["inputs"]["data"] and "sha256" in meta["inputs"]["data"]


def test_labels_default_to_the_null_class(latent_ckpt, tmp_path):
    from attnbench.models import load_dit

    config = load_dit(latent_ckpt).config
    given = zs.load_inputs(_inputs_file(tmp_path / "x.safetensors", x0=torch.zeros(2, 4, 8, 8)),
                           config)
    assert given.y.tolist() == [config.num_classes] * 2


@pytest.mark.parametrize("tensors, suffix, message", [
    ({"z": torch.zeros(1, 4, 8, 8)}, ".safetensors", "it needs x0"),
    ({"x0": torch.zeros(1, 3, 8, 8)}, ".safetensors", "[N, 4, H, W]"),
    ({"x0": torch.zeros(1, 4, 7, 8)}, ".safetensors", "multiples of its patch size 2"),
    ({"x0": torch.full((1, 4, 8, 8), math.nan)}, ".safetensors", "NaN"),
    ({"x0": torch.zeros(2, 4, 8, 8), "y": torch.tensor([0, 11])}, ".safetensors",
     "labels must lie in [0, 10]"),
    ({"x0": torch.zeros(2, 4, 8, 8), "y": torch.tensor([0])}, ".safetensors",
     "2 integer class labels"),
    ({"x0": torch.zeros(1, 4, 8, 8)}, ".bin", "unknown suffix"),
    (None, ".pt", "cannot read it as .pt"),  # a pickled object: weights_only refuses it
])
def test_bad_inputs_exit_2_before_any_work(latent_ckpt, tmp_path, capsys, tensors, suffix,
                                           message):
    path = tmp_path / f"x{suffix}"
    if tensors is None:
        torch.save({"x0": torch.zeros(1, 4, 8, 8), "code": object()}, path)
    elif suffix == ".safetensors":
        _inputs_file(path, **tensors)
    else:
        path.write_bytes(b"\0" * 16)
    out = tmp_path / "x"
    assert main(["fidelity", "--ckpt", str(latent_ckpt), "--inputs", str(path),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--inputs" in err and message in err, err
    assert not out.exists()


def test_a_latent_model_without_inputs_is_told_to_pass_them(latent_ckpt, tmp_path, capsys):
    assert main(["fidelity", "--ckpt", str(latent_ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "pass --inputs FILE" in capsys.readouterr().err


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", [
    Layout((3, 4), text=5), Layout((3, 4), text=5, text_first=False),
    Layout((2, 3, 4)), Layout((2, 2, 3), text=4)])
def test_streamed_statistics_on_text_and_video_layouts(layout):
    """Locality over image–image pairs (dt² + dy² + dx², built here independently), the
    rest of the mass on pairs with a text token; outputs and recall as with a grid."""
    g = torch.Generator().manual_seed(5)
    n = layout.tokens
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.rand(n, n, generator=g) < 0.5
    got = zs.softmax_pass(q, k, v, layout, {"m": lambda r0, r1: mask[r0:r1]}, chunk_elements=90)
    p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
    position = {}  # token index -> (t, y, x) for image tokens
    grid = layout.grid if layout.is_video else (1, *layout.grid)
    first = layout.text if layout.text_first else 0
    for i in range(layout.image_tokens):
        position[first + i] = (i // (grid[1] * grid[2]), i // grid[2] % grid[1], i % grid[2])
    hist = torch.zeros(sum((s - 1) ** 2 for s in grid) + 1, dtype=torch.float64)
    text = 0.0
    rows = p.shape[0] * p.shape[1] * n
    for i in range(n):
        for j in range(n):
            mass = p[:, :, i, j].sum().item() / rows
            if i in position and j in position:
                pairs = zip(position[i], position[j], strict=True)
                hist[sum((a - b) ** 2 for a, b in pairs)] += mass
            else:
                text += mass
    torch.testing.assert_close(got.out, p @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.locality, hist, rtol=1e-10, atol=1e-12)
    assert got.text_mass == pytest.approx(text, rel=1e-10, abs=1e-14)
    assert got.locality.sum().item() + got.text_mass == pytest.approx(1.0, abs=1e-12)
    assert got.mass_recall["m"] == pytest.approx((p * mask).sum().item() / rows, rel=1e-12)
    assert (got.text_mass > 0) == bool(layout.text)
