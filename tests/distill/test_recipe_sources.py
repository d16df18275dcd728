"""The recipes against their sources: SLA's published fine-tuning, CLEAR's optimiser and
KD-layer rule, and the optimiser the trainer builds from a recipe."""

from __future__ import annotations

import pytest
import torch

from attnbench import attention
from attnbench.attention.recipes import DistillRecipe, Optimisation
from attnbench.distill import RECIPES, TrainConfig
from attnbench.distill import optim as optim_module
from attnbench.distill.optim import build, resolve


def test_sla_recipe_is_turbodiffusions():
    """TurboDiffusion's t2v_model_sla.py / wan2pt1_t2v.py: teacher-output MSE only, all
    parameters, AdamW 1e-5 with weight decay 0.01, topk 0.1, linear branch over all."""
    sla = RECIPES["sla"]
    assert sla.weights == {"kd_out": 1.0} and sla.trainable == "all"
    opt = sla.optimisation
    assert (opt.optimizer, opt.lr, opt.weight_decay, opt.steps) == ("adamw", 1e-5, 0.01, 100_000)
    assert opt.grad_clip == 0 and opt.warmup_steps == 100
    assert sla.options == {"topk": 0.1, "linear_over": "all"}
    assert "TurboDiffusion" in sla.source and "wan2pt1_t2v.py" in opt.source
    assert "attnbench's choice" not in sla.source
    assert "EMA" in opt.substitutes  # the power EMA is approximated, and said
    variant = RECIPES["sla-attnbench"]
    assert "attnbench's choice" in variant.source and "1e-5" in variant.summary
    # the method's own default follows the official main branch
    assert attention.get("sla").resolve()["linear_over"] == "all"


def test_clear_optimisation_is_the_released_scripts():
    opt = RECIPES["clear"].optimisation
    assert (opt.optimizer, opt.lr, opt.weight_decay, opt.ema_decay) == ("prodigy", 1.0, 1e-4, 0)
    assert opt.steps == 50_000 and "10K" in opt.substitutes
    assert opt.settings["decouple"] and opt.settings["safeguard_warmup"]
    assert "distill.sh" in opt.source
    with pytest.raises(ValueError, match="takes no setting"):
        Optimisation("adamw", settings={"decouple": True})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Optimisation("sgd")


def official_clear_taps(names: list[str]) -> list[str]:
    """Huage001/CLEAR distill.py, restated: enumerate every attention processor and
    distil those with 'single' in the name at an index ≡ 0 mod 4."""
    return [name for idx, name in enumerate(names) if "single" in name and idx % 4 == 0]


def flux_processor_names(double: int = 19, single: int = 38) -> list[str]:
    return ([f"transformer_blocks.{i}.attn.processor" for i in range(double)]
            + [f"single_transformer_blocks.{i}.attn.processor" for i in range(single)])


def test_clear_kd_layers_on_flux_are_the_official_rule():
    names = flux_processor_names()
    kinds = ["double"] * 19 + ["single"] * 38
    ours = [names[i] for i in RECIPES["clear"].tapped_layers(kinds)]
    assert ours == official_clear_taps(names)
    assert ours == [f"single_transformer_blocks.{i}.attn.processor" for i in range(1, 38, 4)]
    # other block counts: the same rule, not a fixed list
    for double, single in ((2, 5), (3, 9), (0, 8)):
        names = flux_processor_names(double, single)
        kinds = ["double"] * double + ["single"] * single
        assert [names[i] for i in RECIPES["clear"].tapped_layers(kinds)] == \
            official_clear_taps(names)


def test_clear_kd_layers_on_dit_are_every_fourth_block():
    """attnbench's DiT: single-stream blocks only, so blocks 0, 4, 8, ... (stated)."""
    assert RECIPES["clear"].tapped_layers(["single"] * 12) == [0, 4, 8]
    assert RECIPES["clear-post-proj"].tapped_layers(["single"] * 3) == [0, 1, 2]
    assert "single blocks 1, 5, ..., 37" in RECIPES["clear"].summary


def _config(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_resolve_takes_the_recipes_optimisation_and_flags_win():
    clear = RECIPES["clear"].optimisation
    cfg = resolve(_config(), clear)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.ema_decay) == ("prodigy", 1.0, 1e-4, 0)
    assert cfg.optimizer_settings["decouple"] is True and not cfg.substituted
    flagged = resolve(_config(lr=0.5, ema_decay=0.99), clear)
    assert (flagged.lr, flagged.ema_decay, flagged.optimizer) == (0.5, 0.99, "prodigy")
    other = resolve(_config(optimizer="adamw"), clear)  # another optimiser: its own lr
    assert (other.optimizer, other.lr, other.weight_decay) == ("adamw", 2e-4, 1e-4)
    assert "decouple" not in other.optimizer_settings
    sla = resolve(_config(), RECIPES["sla"].optimisation)
    assert (sla.optimizer, sla.lr, sla.weight_decay, sla.grad_clip) == ("adamw", 1e-5, 0.01, 0)


def test_prodigy_missing_is_substituted_and_said(monkeypatch):
    monkeypatch.setattr(optim_module, "prodigy_available", lambda: False)
    cfg = resolve(_config(), RECIPES["clear"].optimisation)
    assert (cfg.optimizer, cfg.lr) == ("adamw", 2e-4)
    assert (cfg.weight_decay, cfg.ema_decay) == (1e-4, 0)  # the recipe's other settings
    assert "prodigyopt is not installed" in cfg.substituted
    with pytest.raises(ValueError, match="--optimizer prodigy needs"):
        resolve(_config(optimizer="prodigy"), RECIPES["clear"].optimisation)


def test_fsdp_substitutes_adamw_for_the_recipes_prodigy_and_refuses_an_asked_one(monkeypatch):
    monkeypatch.setattr(optim_module, "prodigy_available", lambda: True)
    cfg = resolve(_config(fsdp=True), RECIPES["clear"].optimisation)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", 2e-4, 1e-4)
    assert "--fsdp" in cfg.substituted and "shard" in cfg.substituted
    with pytest.raises(ValueError, match="--optimizer prodigy does not combine with --fsdp"):
        resolve(_config(optimizer="prodigy", fsdp=True), RECIPES["clear"].optimisation)


def test_build_makes_the_named_optimiser():
    params = [torch.nn.Parameter(torch.ones(3))]
    adamw = build(resolve(_config(), RECIPES["sla"].optimisation), params)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.01
    prodigyopt = pytest.importorskip("prodigyopt")
    prodigy = build(resolve(_config(), RECIPES["clear"].optimisation), params)
    assert isinstance(prodigy, prodigyopt.Prodigy)
    group = prodigy.param_groups[0]
    assert group["lr"] == 1.0 and group["weight_decay"] == 1e-4 and group["decouple"]


def test_recipe_options_need_valid_fields():
    recipe = DistillRecipe("x", {"kd_out": 1.0}, options={"topk": 0.1})
    assert "topk=0.1" in recipe.describe()
    assert recipe.with_overrides(options={"topk": 0.2}).options == {"topk": 0.2}


def test_distill_trains_with_the_recipes_optimiser(teacher_dir, tmp_path):
    """CLEAR's run uses Prodigy at lr 1.0 without EMA (exported = trained weights);
    --recipe picks a named variant; the summary records what ran."""
    import json

    from attnbench.cli import main
    from tests.distill.test_distill import tiny_args

    pytest.importorskip("prodigyopt")
    out = tmp_path / "clear"
    args = tiny_args(teacher_dir, out, "clear", "--option", "radius=2", "impl=masked_sdpa",
                     "--data", "shapes", "--steps", "2")
    args.remove("--lr"), args.remove("1e-3")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert (config["optimizer"], config["lr"], config["weight_decay"]) == ("prodigy", 1.0, 1e-4)
    assert config["ema_decay"] == 0 and not config["substituted"]
    assert summary["eval"]["final_ema"] == summary["eval"]["final_raw"]
    out = tmp_path / "sla"
    assert main(tiny_args(teacher_dir, out, "sla", "--recipe", "sla-attnbench", "--steps", "1",
                          "--option", "block_q=4", "block_kv=4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["name"] == "sla-attnbench"
    assert summary["config"]["optimizer"] == "adamw" and summary["config"]["lr"] == 1e-3
