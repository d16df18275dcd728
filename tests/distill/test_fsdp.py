"""``distill --fsdp`` under torchrun (2 gloo processes on CPU, spawned here).

What runs where: everything below runs on CPU with gloo. FSDP2's sharding, its
all-gathers and reduce-scatters, activation checkpointing and the distributed
checkpoint state-dict API all work there; the NCCL/CUDA path runs the same code and
is not exercised by this suite.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from attnbench.cli import main
from attnbench.distill.fsdp import blocks, by_index, by_name
from attnbench.distill.io import load_training_checkpoint
from attnbench.models.checkpoint import load_dit

from .test_distill import tiny_args

EXTRA = ("--batch-size", "8", "--device", "cpu")


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_checkpoints(a, b, **tol) -> None:
    a, b = load_training_checkpoint(a / "checkpoint.pt"), load_training_checkpoint(
        b / "checkpoint.pt")
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert set(a[part]) == set(b[part])
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], **tol), (part, key)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]  # ids, lr, betas: one file format
    assert set(oa["state"]) == set(ob["state"])
    for index, state in oa["state"].items():
        for key, value in state.items():
            assert torch.allclose(value, ob["state"][index][key], **tol), (index, key)


@pytest.mark.slow
def test_fsdp_steps_equal_ddp_and_checkpoints_cross_with_one_process(teacher_dir, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(*tiny_args(teacher_dir, ddp, "lit", "--steps", "3"), *EXTRA)
    _torchrun(*tiny_args(teacher_dir, fsdp, "lit", "--steps", "3", "--fsdp"), *EXTRA)

    run = json.loads((fsdp / "run.json").read_text())
    assert run["config"]["fsdp"] is True and run["world_size"] == 2
    parameters = json.loads((fsdp / "summary.json").read_text())["parameters"]
    assert parameters["held_by_rank0"] < parameters["total"]  # really sharded
    built = parameters["bytes_built_by_rank"]  # rank 1 built the models on the meta device
    assert built[1] == 0 and built[0] >= 4 * parameters["total"]
    # the same steps as DDP: losses, gradient norms, weights, EMA and AdamW moments
    for ra, rb in zip(_metrics(ddp), _metrics(fsdp), strict=True):
        for key in ("loss", "diffusion", "kd_eps", "kd_sigma", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key
    _same_checkpoints(ddp, fsdp, atol=1e-6, rtol=1e-5)
    # the exported student is the same model file
    a, b = load_dit(ddp / "student"), load_dit(fsdp / "student")
    for key, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[key], atol=1e-6, rtol=1e-5), key

    # one process → FSDP (with activation checkpointing): 2 steps, then resumed to 3
    one = tmp_path / "one"
    assert main([*tiny_args(teacher_dir, one, "lit", "--steps", "2"), *EXTRA]) == 0
    _torchrun(*tiny_args(teacher_dir, one, "lit", "--steps", "3", "--fsdp",
                         "--activation-checkpointing", "--resume"), *EXTRA)
    # FSDP → one process
    sharded = tmp_path / "sharded"
    _torchrun(*tiny_args(teacher_dir, sharded, "lit", "--steps", "2", "--fsdp"), *EXTRA)
    assert main([*tiny_args(teacher_dir, sharded, "lit", "--steps", "3", "--resume"),
                 *EXTRA]) == 0
    for resumed in (one, sharded):  # one process and 2 ranks agree to float rounding
        _same_checkpoints(ddp, resumed, atol=2e-5, rtol=1e-4)
        assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3]


def test_fsdp_needs_torchrun(teacher_dir, tmp_path, capsys):
    assert main([*tiny_args(teacher_dir, tmp_path / "x", "lit", "--fsdp"), *EXTRA]) == 2
    err = capsys.readouterr().err
    assert "--fsdp" in err and "torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_activation_checkpointing_under_bf16_autocast(teacher_dir, tmp_path):
    """A recomputed block meets the forward's autocast and SDPA kernel choice."""
    out = tmp_path / "ac"
    assert main([*tiny_args(teacher_dir, out, "sla", "--steps", "1", "--option", "block_q=8",
                            "--option", "block_kv=8", "--activation-checkpointing",
                            "--precision", "bf16"), "--device", "cpu"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["activation_checkpointing"]


def test_optimiser_state_keyed_by_name_and_back():
    """The distributed-checkpoint form (keys: parameter names) and Optimizer.state_dict's
    (keys: indices in the optimiser's order) convert into each other without loss."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    native = optimizer.state_dict()
    names = [n for n, _ in named]
    keyed = by_name(native, names)
    assert set(keyed["state"]) == set(names) and keyed["param_groups"][0]["params"] == names
    back = by_index(keyed)
    assert back["param_groups"] == native["param_groups"]
    assert set(back["state"]) == set(native["state"])
    for i, state in native["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][i][key], value)


def test_blocks_are_found_or_named_missing():
    from tests.helpers import tiny_pixel_dit

    model = tiny_pixel_dit()
    assert blocks(model) == list(model.blocks)
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        blocks(torch.nn.Linear(2, 2))


def test_activation_checkpointing_keeps_names_outputs_and_gradients(gen):
    from attnbench.distill.fsdp import checkpoint_blocks
    from tests.helpers import tiny_pixel_dit

    model = tiny_pixel_dit().double()
    twin = tiny_pixel_dit().double()
    twin.load_state_dict(model.state_dict())
    checkpoint_blocks(twin)
    assert list(twin.state_dict()) == list(model.state_dict())
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen,
                    dtype=torch.float64)
    t, y = torch.tensor([3.0, 700.0], dtype=torch.float64), torch.tensor([0, 1])
    for m in (model, twin):
        m(x, t, y).square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(),
                                 strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-12, rtol=1e-10), name


@pytest.mark.slow
def test_fsdp_distils_a_diffusers_transformer_as_ddp_does(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from attnbench.integrations.diffusers.tiny import save_tiny_pipeline

    flux = save_tiny_pipeline("flux", tmp_path / "flux")
    args = ("distill", "--model-path", str(flux), "--method", "clear", "--option", "radius=2",
            "--steps", "2", "--batch-size", "2", "--gen-samples", "2", "--gen-steps", "2",
            "--height", "32", "--width", "48", "--optimizer", "adamw", "--lr", "1e-3",
            "--no-progress", "--device", "cpu")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(*args, "--out", str(ddp))
    _torchrun(*args, "--out", str(fsdp), "--fsdp", "--activation-checkpointing")
    built = json.loads((fsdp / "summary.json").read_text())["parameters"]["bytes_built_by_rank"]
    assert built[1] == 0 < built[0]  # the transformer read by rank 0 only
    for ra, rb in zip(_metrics(ddp), _metrics(fsdp), strict=True):
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key
    # AdamW divides by the root of tiny second moments: weights agree to 1e-5 of a unit
    _same_checkpoints(ddp, fsdp, atol=1e-5, rtol=1e-4)
    a = load_file(ddp / "student" / "student.safetensors")
    b = load_file(fsdp / "student" / "student.safetensors")
    assert set(a) == set(b) and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


# --------------------------------------------------------------------------- built on rank 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_worker(rank: int, world: int, port: int, teacher_dir: str) -> None:
    """Rank 0 reads and converts the teacher; rank 1 builds both on the meta device and
    receives its shards: the models are rank 0's, and no rank but 0 built a whole one."""
    import torch.distributed as dist

    from attnbench.common.dist import DistInfo
    from attnbench.distill.fsdp import Sharded, held
    from attnbench.distill.pipeline import _teacher_and_student, generate_teacher_samples
    from attnbench.models.convert import convert

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
        teacher, student, report, _ = _teacher_and_student(
            teacher_dir, "lit", num_heads=None, seed=0, options={}, info=info,
            fsdp=True)
        assert report.new  # LiT's depth-wise conv: initialised on rank 0, not to_empty's
        # a buffer outside the state dict, in a dtype the skeleton lacks: rank 0's arrives
        probe = torch.arange(3, dtype=torch.float64) if rank == 0 else torch.empty(3)
        teacher.register_buffer("probe", probe.to("meta" if rank else "cpu"), persistent=False)
        on_meta = [p.is_meta for m in (teacher, student) for p in m.parameters()]
        assert all(on_meta) if rank else not any(on_meta)
        sharded = Sharded(student, teacher, info)
        whole_bytes = sum(p.numel() * 4 for m in (teacher, student) for p in m.parameters())
        assert sharded.materialised == [whole_bytes, 0]
        assert held(student) < sum(p.numel() for p in student.parameters())
        assert torch.equal(teacher.probe, torch.arange(3, dtype=torch.float64))
        # the sharded teacher's samples: rank 0 makes 2 batches of 1, rank 1 one and a spare
        samples = generate_teacher_samples(teacher, 3, seed=0, steps=2, batch=1, info=info)
        full = sharded.gather(student, None)
        if rank == 0:  # the whole build of every rank before, bit for bit
            ref_teacher = load_dit(teacher_dir)
            ref_student, _ = convert(ref_teacher, "lit", seed=0)
            alone = generate_teacher_samples(ref_teacher, 3, seed=0, steps=2, batch=1)
            assert torch.equal(samples.y, alone.y)
            assert torch.allclose(samples.x, alone.x, atol=1e-6, rtol=1e-5)
            for ref, got in ((ref_student, full.model), (ref_teacher, full.teacher)):
                mine = got.state_dict()
                assert set(mine) == set(ref.state_dict())
                for key, value in ref.state_dict().items():
                    assert torch.equal(value, mine[key]), key
    finally:
        dist.destroy_process_group()


def test_fsdp_models_are_built_on_rank0_only_and_sharded_from_its_tensors(teacher_dir):
    import torch.multiprocessing as mp

    mp.spawn(_build_worker, args=(2, _free_port(), str(teacher_dir)), nprocs=2, join=True)


# --------------------------------------------------------------------------- signals


def _rank_env(rank: int, port: int) -> dict[str, str]:
    from tests.runfolder.helpers import env

    return {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_saved_and_resumable(teacher_dir, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop before the same step (they agree by a
    collective), rank 0 saves the gathered checkpoint, each rank says so in one line and
    exits 143 (128 + SIGTERM, the trainer's code for a signal); --resume continues."""
    from tests.runfolder.helpers import wait_for

    out = tmp_path / "stopped"
    port = _free_port()
    args = [*tiny_args(teacher_dir, out, "lit", "--steps", "100000", "--fsdp"), *EXTRA]
    procs = [subprocess.Popen([sys.executable, "-m", "attnbench", *args],
                              env=_rank_env(rank, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2,
             timeout=240, proc=procs[0])
    procs[1].send_signal(signal.SIGTERM)
    steps = []
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 143, err[-3000:]
            said = [line for line in err.splitlines() if line.startswith("attnbench:")]
            assert len(said) == 1 and "Traceback" not in err, err[-3000:]
            assert f"rank {rank} of 2: SIGTERM at step " in said[0]
            assert "checkpoint.pt saved" in said[0] and "--resume" in said[0]
            steps.append(int(said[0].split("at step ")[1].split()[0]))
    finally:
        for proc in procs:  # a rank that did not stop must not outlive the test
            if proc.poll() is None:
                proc.kill()
    assert steps[0] == steps[1] >= 2
    saved = load_training_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == steps[0]
    _torchrun(*tiny_args(teacher_dir, out, "lit", "--steps", str(steps[0] + 1), "--fsdp",
                         "--resume"), *EXTRA)
    assert [r["step"] for r in _metrics(out)] == list(range(1, steps[0] + 2))
