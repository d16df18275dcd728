"""The world-t2i pipeline: built from configs, trained resumably, saved stock, checked at load."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from attnbench.cli import main
from attnbench.data.shapes import NUM_CLASSES, PROMPTS
from attnbench.distill import world_t2i as train
from attnbench.integrations.diffusers import world_t2i as w


def _settings(**kw):
    return train.settings_from(True, eval_samples=0, **kw)


def test_vocabulary_covers_every_prompt():
    tok = w.tokenizer()
    for p in PROMPTS:
        ids = tok(w.prompt_text(p.label), padding="max_length", max_length=w.TEXT_TOKENS).input_ids
        assert len(ids) == w.TEXT_TOKENS
        assert tok.unk_token_id not in ids, p.text
        assert ids.count(tok.eos_token_id) == 1
    assert w.prompt_text(0).startswith("a photo of ")
    assert w.CONFIGS["default"].image_tokens >= 256 and w.CONFIGS["quick"].image_tokens >= 256


def test_quick_training_saves_a_stock_pipeline(tmp_path):
    out = tmp_path / "run"
    assert main(["world", "--train-pipeline", str(out), "--quick", "--no-progress"]) == 0
    folder = out / train.PIPELINE_DIR
    w.verify_sums(folder)
    diffusers = w.import_diffusers()
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "FluxPipeline"
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.set_progress_bar_config(disable=True)
    size = w.CONFIGS["quick"].image_size
    image = pipe(w.prompt_text(5), height=size, width=size, num_inference_steps=2,
                 max_sequence_length=w.TEXT_TOKENS, output_type="np").images
    assert image.shape == (1, size, size, 3) and torch.isfinite(torch.from_numpy(image)).all()
    rows = [json.loads(line) for line in (out / train.LOG_FILE).read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"vae", "vae_stats", "flow"}
    training = json.loads((folder / w.TRAINING_FILE).read_text())
    assert training["stage"] == "done" and "eval" in training
    assert (out / train.SAMPLES_PNG).read_bytes().startswith(b"\x89PNG")
    assert (out / train.LOSS_PNG).read_bytes().startswith(b"\x89PNG")
    # a checkpoint's pipeline, scored with the exact detector on the six tasks in turn
    assert main(["world", "--eval-pipeline", str(folder), "--count", "6", "--sample-steps",
                 "1", "--render", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")
    assert main(["world", "--eval-pipeline", str(out)]) == 2  # the run, not its pipeline


def test_resume_continues_bit_for_bit(tmp_path):
    whole = train.WorldTrainer(tmp_path / "whole", _settings(), progress=False)
    whole.run()
    first = train.WorldTrainer(tmp_path / "split", _settings(), progress=False)
    assert first.run(stop_at=5)["stopped"] == "stop_at"  # 3 VAE steps + 2 flow steps
    second = train.WorldTrainer(tmp_path / "split", _settings(), progress=False)
    assert second.run(resume=True)["stage"] == "done"
    for a, b in ((whole.tr, second.tr), (whole.ema, second.ema), (whole.vae, second.vae)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(),
                                     strict=True):
            assert torch.equal(x, y), name
    assert whole.vae.config.scaling_factor == second.vae.config.scaling_factor
    log = [json.loads(line) for line in (tmp_path / "whole" / train.LOG_FILE).read_text()
           .splitlines()]
    split = [json.loads(line) for line in (tmp_path / "split" / train.LOG_FILE).read_text()
             .splitlines()]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa
    assert drop(log) == drop(split)


def test_resume_may_change_the_length_and_says_so(tmp_path):
    out = tmp_path / "run"
    train.WorldTrainer(out, _settings(), progress=False).run(stop_at=5)  # 2 flow steps done
    with pytest.raises(ValueError, match="--steps 2: .* already trained 2 transformer steps"):
        train.WorldTrainer(out, _settings(steps=2), progress=False).run(resume=True)
    longer = train.WorldTrainer(out, _settings(steps=6), progress=False)
    assert longer.run(resume=True)["step"] == 6
    record = json.loads((out / train.RUN_FILE).read_text())
    (change,) = record["length_changes"]
    assert not change["warm_restart"]
    assert (change["flow_step"], change["steps_before"], change["steps_after"]) == (2, 4, 6)
    assert change["lr_after"] > change["lr_before"]  # a longer cosine decays later
    assert record["identity"]["steps"] == 6
    # a finished run trains longer from a warm restart, said so
    again = train.WorldTrainer(out, _settings(steps=8), progress=False)
    assert again.run(resume=True)["step"] == 8
    last = json.loads((out / train.RUN_FILE).read_text())["length_changes"][-1]
    assert last["warm_restart"] and last["lr_before"] == 0.0 and last["lr_after"] > 0
    assert last["flow_step"] == 6


def test_text_table_gives_every_prompt_its_own_features():
    pipe = w.build_pipeline(w.CONFIGS["quick"])
    embeds, pooled = train.text_table(pipe)
    assert embeds.shape[:2] == (NUM_CLASSES + 1, w.TEXT_TOKENS)
    assert torch.unique(pooled.round(decimals=5), dim=0).shape[0] == NUM_CLASSES + 1


def test_sha_mismatch_is_refused(tmp_path):
    folder = tmp_path / "p"
    w.build_pipeline(w.CONFIGS["quick"]).save_pretrained(folder, safe_serialization=True)
    with pytest.raises(ValueError, match="no SHA256SUMS"):
        w.verify_sums(folder)
    w.write_sums(folder)
    w.verify_sums(folder)
    config = folder / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": 1', '"num_layers": 2'))
    with pytest.raises(ValueError, match="transformer/config.json does not match its sha256"):
        w.load_world_pipeline(folder)
    config.unlink()
    with pytest.raises(ValueError, match="which .* does not hold"):
        w.verify_sums(folder)


def _code(argv: list[str]) -> int:
    """The exit code of the CLI (argparse's refusals exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def test_bad_flags_are_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["world", "--resume"]) == 2
    assert "--train-pipeline" in capsys.readouterr().err
    assert main(["world", "--train-pipeline", out, "--size", "64"]) == 2
    assert _code(["world", "--train-pipeline", out, "--steps", "0"]) == 2
    assert _code(["world", "--train-pipeline", out, "--lr", "nan"]) == 2
    assert main(["world", "--train-pipeline", out, "--render", str(tmp_path / "g.png")]) == 2
    assert _code(["world", "--train-pipeline", ""]) == 2
    assert main(["world", "--train-pipeline", out, "--resume", "--quick"]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    # an existing run is neither overwritten nor resumed with other settings
    train.WorldTrainer(out, _settings(), progress=False).run(stop_at=1)
    before = (tmp_path / "run" / train.CHECKPOINT_FILE).read_bytes()
    assert main(["world", "--train-pipeline", out, "--quick"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["world", "--train-pipeline", out, "--quick", "--resume", "--batch", "9"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (tmp_path / "run" / train.CHECKPOINT_FILE).read_bytes() == before


def test_default_model_is_explained_until_trained(monkeypatch, tmp_path):
    monkeypatch.setattr(w, "ASSET_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="not trained yet.*--train-pipeline"):
        w.default_pipeline_path()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A quick world-t2i run's pipeline, standing in for the shipped folder."""
    out = tmp_path_factory.mktemp("world") / "run"
    train.WorldTrainer(out, _settings(), progress=False).run()
    return out / train.PIPELINE_DIR


def test_model_world_t2i_samples_and_distils_offline(shipped, monkeypatch, tmp_path):
    monkeypatch.setattr(w, "ASSET_DIR", shipped)
    assert main(["sample", "--model", "world-t2i", "--out", str(tmp_path / "s"), "--num", "2",
                 "--steps", "2", "--no-progress"]) == 0
    info = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert info["model_path"] == str(shipped)
    assert main(["sample", "--model", "world-t2i", "--model-path", str(shipped), "--out",
                 str(tmp_path / "t"), "--num", "2"]) == 2
    assert main(["sample", "--model", "flux-dev", "--out", str(tmp_path / "t"), "--num", "2"]) == 2


@pytest.mark.slow
def test_distill_sample_eval_chain_on_world_t2i(shipped, monkeypatch, tmp_path):
    """``distill --model world-t2i --method clear`` → ``sample`` → ``eval``, offline."""
    monkeypatch.setattr(w, "ASSET_DIR", shipped)
    run, teacher, student = tmp_path / "d", tmp_path / "t", tmp_path / "s"
    assert main(["distill", "--model", "world-t2i", "--method", "clear", "--out", str(run),
                 "--steps", "2", "--batch-size", "2", "--gen-samples", "4", "--gen-steps", "2",
                 "--eval-samples", "2", "--no-progress", "--option", "radius=2"]) == 0
    for out, extra in ((teacher, []), (student, ["--student", str(run / "student")])):
        assert main(["sample", "--model", "world-t2i", "--out", str(out), "--num", "4",
                     "--steps", "2", "--no-progress", *extra]) == 0
    assert main(["eval", "--pipeline-samples", str(student), "--teacher-samples", str(teacher),
                 "--out", str(tmp_path / "e"), "--feature-extractor", "shapes"]) == 0
    assert main(["distill", "--model", "world-t2i", "--model-path", str(shipped), "--method",
                 "clear", "--out", str(tmp_path / "x")]) == 2


def test_a_pipeline_folder_fixes_its_transformers_shapes(shipped):
    """The VAE's factor and the tokenizer's length come from the folder, not from FLUX's
    published pipeline (8 and 512): fidelity and run measure the model as it samples."""
    from attnbench.integrations.diffusers import read_transformer_config

    _, entry = read_transformer_config(shipped)
    assert entry.vae_factor == w.CONFIGS["quick"].vae_factor == 1
    assert entry.text_tokens == w.TEXT_TOKENS
    assert entry.pixels_per_token == (2, 2)
