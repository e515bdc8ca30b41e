"""The trainer: loss terms and prediction types, overfitting a fixed batch, exact resume
(bit for bit: losses, gradient norms, every trainable tensor, Adam's state), checkpoint
retention, validation sampled as restoration samples, the resume and launcher guards, the
CLI, and a real 2-process DDP run on the CPU (torchrun, gloo).

A small real build (gt 128, tiny models) goes through the real degrade, caption and
embed stages; training runs on the CPU with the tiny SD1.5-shaped model in the default
"paper" attention layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, build_dataset, tiny_train
from model.training.config import TrainConfig
from model.training.losses import sspir_loss
from model.training.trainer import TrainSetupError, Trainer, run_training

TINY_PROCESSOR = {"channels": [8, 8, 16, 16]}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]):
    d = tmp_path_factory.mktemp("trainbuild")
    train = tiny_train(tiny_models["sd15"], micro_batch_size=1, max_steps=6, num_workers=2, checkpoint_every=2,
                       keep_checkpoints=2, validate_every=6, validation_pairs=1, validation_steps=3,
                       processor=TINY_PROCESSOR)
    manifest = build_dataset(d, photo_dir, tiny_models, train, shards=3, crops_per_image=3, rows_per_shard=4)
    m = d / "m.json"
    cfg = manifest.settings(TrainConfig, "train")
    assert cfg.attention_layout == "paper"  # the default
    return m, manifest.output, cfg


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every trainable tensor and Adam's state of a checkpoint, by file and name."""
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(ckpt)}:{k}"] = v
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def full_run(build, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Six uninterrupted steps (checkpoints every 2, keep 2, validation at 6)."""
    _, out, cfg = build
    run = tmp_path_factory.mktemp("full") / "run"
    return run, run_training(out, run, cfg, max_steps=6, show_progress=False)


def test_loss_terms_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    rgbs = [torch.rand(2, 3, s, s, generator=g) * 2 - 1 for s in (32, 16, 8)]
    pred, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    got = sspir_loss(pred, noise, rgbs, hq, lambda_rgb=0.1, lambda_fft=0.01)
    eps = ((pred - noise) ** 2).mean()
    rgb = fft = 0.0
    for r in rgbs:
        s = r.shape[-1]
        gt = hq.reshape(2, 3, s, 64 // s, s, 64 // s).mean(dim=(3, 5))  # box average = area resize
        rgb += (r - gt).abs().mean()
        fr, fg = torch.fft.fft2(r), torch.fft.fft2(gt)
        fft += torch.cat([(fr.real - fg.real).abs().flatten(), (fr.imag - fg.imag).abs().flatten()]).mean()
    torch.testing.assert_close(got["eps"], eps)
    torch.testing.assert_close(got["rgb"], rgb)
    torch.testing.assert_close(got["fft"], fft, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["loss"], eps + 0.1 * rgb + 0.01 * fft, rtol=1e-5, atol=1e-4)


def test_the_diffusion_target_follows_the_prediction_type(build, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """ε for epsilon schedulers; the velocity √ᾱ_t·ε − √(1−ᾱ_t)·x0 (computed here from the
    schedule) for v_prediction; a scheduler predicting the sample is refused before training."""
    from diffusers import DDPMScheduler

    from model.networks.sspir import SSPIR
    from model.training.data import ShardedPairs, collate, images_to_float, load_empty_prompt
    from model.training.trainer import TrainStep, step_generator

    _, out, cfg = build
    torch.manual_seed(0)
    model = SSPIR.from_pretrained(cfg.pretrained, cfg.image_encoder, processor_kwargs=TINY_PROCESSOR)
    data = ShardedPairs(out, seed=0, null_text_ratio=0.0, image_dtype=torch.uint8)
    batch = collate([data[i] for i in range(2)], load_empty_prompt(out))
    base = DDPMScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler")
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(base.config, prediction_type=kind)
        losses = TrainStep(model, sched, cfg)(batch, step_generator(0, 5, 0, 0))
        gen = step_generator(0, 5, 0, 0)  # the same draws, replayed here
        imgs = images_to_float({k: batch[k].clone() for k in ("hq", "lq", "lq_up")})
        with torch.no_grad():
            latents = model.encode_images(imgs["hq"], sample=True, generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (2,), generator=gen)
            ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
            pred, _ = model(noisy, t, batch["text"].float(), imgs["lq"], imgs["lq_up"])
        velocity = ac.sqrt() * noise - (1 - ac).sqrt() * latents
        target, other = (noise, velocity) if kind == "epsilon" else (velocity, noise)
        torch.testing.assert_close(losses["eps"].detach(), ((pred - target) ** 2).mean(), rtol=1e-5, atol=1e-6)
        assert abs(float(losses["eps"].detach()) - float(((pred - other) ** 2).mean())) > 1e-3  # the check can tell
    sd = tmp_path / "sd-sample"
    shutil.copytree(tiny_models["sd15"], sd)
    cfg_file = sd / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(TrainSetupError, match="prediction_type 'sample'"):
        run_training(out, tmp_path / "r", dataclasses.replace(cfg, pretrained=str(sd)), max_steps=1,
                     show_progress=False)


def test_overfits_a_fixed_batch(build) -> None:
    """The paper layout learns: 20 Adam steps on one batch (64² crops of two pairs, matching
    windows of HQ, LQ and LQ↑) halve the loss."""
    from model.networks.sspir import SSPIR
    from model.training.data import ShardedPairs, collate, load_empty_prompt

    _, out, cfg = build
    torch.manual_seed(0)
    model = SSPIR.from_pretrained(cfg.pretrained, cfg.image_encoder, processor_kwargs=TINY_PROCESSOR)
    data = ShardedPairs(out, seed=0, null_text_ratio=0.0)
    batch = collate([data[i] for i in range(2)], load_empty_prompt(out))
    batch = {**batch, "hq": batch["hq"][..., 32:96, 32:96], "lq_up": batch["lq_up"][..., 32:96, 32:96],
             "lq": batch["lq"][..., 8:24, 8:24]}
    g = torch.Generator().manual_seed(1)
    latents = model.encode_images(batch["hq"], sample=False)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([300, 700])
    noisy = model.noise_scheduler.add_noise(latents, noise, t)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        pred, rgbs = model(noisy, t, batch["text"].float(), batch["lq"], batch["lq_up"])
        loss = sspir_loss(pred, noise, rgbs, batch["hq"], 0.1, 0.01)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_continues_exactly(build, full_run, tmp_path: Path) -> None:
    """Killed after the step-2 checkpoint and resumed: steps 3-6 have the very losses and
    gradient norms of the uninterrupted run (unrounded floats), and the step-6 checkpoints hold
    the same bytes for every trainable tensor and every Adam moment. With keep_checkpoints=2
    the third checkpoint retires the oldest."""
    _, out, cfg = build
    full_dir, full = full_run
    assert _checkpoints(full_dir) == ["step-00000004", "step-00000006"]  # step 2 retired by step 6
    part = tmp_path / "part"
    run_training(out, part, cfg, max_steps=3, show_progress=False)
    assert _checkpoints(part) == ["step-00000002", "step-00000003"]  # 3: the last step
    shutil.rmtree(part / "checkpoints" / "step-00000003")  # as if killed after the step-2 checkpoint
    resumed = run_training(out, part, cfg, max_steps=6, resume=True, show_progress=False)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(full[2:], resumed):
        for k in ("loss", "eps", "rgb", "fft", "grad_norm"):
            assert type(a[k]) is float and a[k] == b[k], (a["step"], k, a[k], b[k])
        assert a["rows"] == b["rows"]
    assert [r["step"] for r in _metrics(part)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _metrics(part)][2:] == [r["loss"] for r in full[2:]]  # the log holds them unrounded
    assert _checkpoints(part) == ["step-00000004", "step-00000006"]
    assert_bitwise_equal(_tensors(part / "checkpoints" / "step-00000006"),
                         _tensors(full_dir / "checkpoints" / "step-00000006"))
    assert not torch.equal(*(_tensors(full_dir / "checkpoints" / s)["trainable/prior_blocks.safetensors:"
                                                                    + _first_block_key(full_dir)]
                             for s in ("step-00000004", "step-00000006")))  # training moved them
    files = {p.suffix for p in (part / "checkpoints").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}, files  # never pickles
    assert (part / "validation" / "step-00000006.png").is_file()


def _first_block_key(run: Path) -> str:
    names = load_file(str(run / "checkpoints" / "step-00000006" / "trainable" / "prior_blocks.safetensors"))
    return next(k for k in sorted(names) if k.endswith("proj_out.weight"))


def test_validation_samples_as_restoration_does(build, full_run) -> None:
    """The grid's restoration column is what model/restore.py's Restorer gives for the same LQ,
    caption embedding, steps and seed: the same scheduler (trailing timesteps from 999) and
    guidance (both CFG branches in one batch). Before the shared factory, validation used
    SD1.5's leading spacing ([901, 801, ...] for 10 steps) and guidance 1.0."""
    import cv2

    from model.inference.restorer import RestoreSettings, Restorer
    from model.inference.scheduler import make_scheduler
    from model.training.data import ShardedPairs
    from pipeline.core.image_io import decode_png
    from pipeline.core.shards import read_table, shard_path

    _, out, cfg = build
    run, _ = full_run
    trainer = Trainer(out, run, cfg, max_steps=6, resume=True, show_progress=False)
    seen: list[tuple[int, list[int]]] = []
    hook = trainer.model.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].shape[0], sorted({int(t) for t in args[1]}))))
    try:
        trainer._validate()
    finally:
        hook.remove()
    expected = make_scheduler(trainer.scheduler.config, "ddpm")
    expected.set_timesteps(cfg.validation_steps)
    assert [t for _, (t,) in seen] == expected.timesteps.tolist() and seen[0][1] == [999]
    assert {b for b, _ in seen} == {2}  # one pair, both guidance branches

    grid = cv2.cvtColor(cv2.imread(str(run / "validation" / "step-00000006.png")), cv2.COLOR_BGR2RGB)
    lq_png = read_table(shard_path(out, "pairs", 0)).column("lq_png")[0].as_buffer()
    lq = decode_png(bytes(lq_png))
    text = ShardedPairs(out, seed=cfg.seed, null_text_ratio=0.0)[0]["text"].float()
    restored = Restorer(run, device="cpu").restore(lq, "", RestoreSettings(steps=cfg.validation_steps,
                                                                          seed=cfg.seed, tile=0), text=text)
    side = restored.image.shape[0]
    assert grid.shape == (side, 3 * side, 3)
    np.testing.assert_array_equal(grid[:, side:2 * side], restored.image)


def test_resume_refuses_another_layout_other_models_or_another_build(build, tmp_path: Path,
                                                                     tiny_models: dict[str, Path]) -> None:
    """Exit status 2 (TrainSetupError), naming what changed. Before these checks a resume after
    changing the Processor's widths exited 0 and Adam kept stepping the orphaned parameters."""
    m, out, cfg = build
    run = tmp_path / "run"
    run_training(out, run, dataclasses.replace(cfg, checkpoint_every=1, validation_pairs=0), max_steps=1,
                 show_progress=False)

    def resume(out_dir: Path = out, **changes) -> None:
        run_training(out_dir, run, dataclasses.replace(cfg, validation_pairs=0, **changes), max_steps=2,
                     resume=True, show_progress=False)

    with pytest.raises(TrainSetupError, match=r"trainable part 'processor': configuration changed \(channels"):
        resume(processor={"channels": [8, 16, 16, 16]})
    with pytest.raises(TrainSetupError, match=r"train.attention_layout: checkpoint 'paper', this run 'adapter'"):
        resume(attention_layout="adapter", processor={})
    moved = tmp_path / "sd-copy"
    shutil.copytree(tiny_models["sd15"], moved)
    with pytest.raises(TrainSetupError, match="train.pretrained: checkpoint"):
        resume(pretrained=str(moved), image_encoder=cfg.image_encoder)
    smaller = tmp_path / "build-2-shards"
    shutil.copytree(out, smaller)
    for stage in ("pairs", "captions", "text_emb"):
        for f in (smaller / stage).glob("shard-00002.arrow*"):
            f.unlink()
    with pytest.raises(TrainSetupError, match=r"build: shards 0, 1, 2 in the checkpoint, 0, 1 now"):
        resume(smaller)

    # the CLI turns the refusal into exit status 2 with the reason on stderr
    changed = json.loads(Path(m).read_text())
    changed["train"]["processor"] = {"channels": [8, 16, 16, 16]}
    m2 = tmp_path / "m2.json"
    m2.write_text(json.dumps(changed))
    r = subprocess.run([sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(m2), "--max-steps", "2",
                        "--train-dir", str(run), "--resume", "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "configuration changed" in r.stderr and "fresh --train-dir" in r.stderr, r.stderr
    resume()  # unchanged: resumes
    assert [x["step"] for x in _metrics(run)] == [1, 2]


def test_a_launcher_whose_processes_each_train_alone_is_refused(build, tmp_path: Path, monkeypatch) -> None:
    """A process started as one of two (WORLD_SIZE=2, as torchrun sets) whose Accelerator sees one
    process is refused (exit status 2 in the CLI). The Accelerator is the real one, already
    initialised for this one-process test session, which is exactly the state such a process is
    in; the launch itself is simulated by the environment (the real two-process launch is the
    DDP test below, where the same check passes)."""
    from accelerate import PartialState

    _, out, cfg = build
    PartialState(cpu=True)  # this process's accelerate state: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainSetupError, match=r"started as one of 2 .*accelerate sees 1 process"):
        run_training(out, tmp_path / "run", cfg, max_steps=1, show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_refuses_incomplete_build_missing_model_and_existing_run(build, tmp_path: Path) -> None:
    from model.training.verify import BuildError

    _, out, cfg = build
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "text_emb" / "shard-00001.arrow").unlink()
    with pytest.raises(BuildError, match="shard.*1"):
        run_training(broken, tmp_path / "r1", cfg, max_steps=1, show_progress=False)
    with pytest.raises(TrainSetupError, match="nope"):
        run_training(out, tmp_path / "r2", dataclasses.replace(cfg, pretrained=str(tmp_path / "nope")),
                     max_steps=1, show_progress=False)
    with pytest.raises(TrainSetupError, match="train.processor"):  # keys of the other layout's Processor
        run_training(out, tmp_path / "r4", dataclasses.replace(cfg, processor={"stem_channels": 8}),
                     max_steps=1, show_progress=False)
    run_training(out, tmp_path / "r3", dataclasses.replace(cfg, validation_pairs=0), max_steps=1,
                 show_progress=False)
    with pytest.raises(TrainSetupError, match="--resume"):
        run_training(out, tmp_path / "r3", cfg, max_steps=2, show_progress=False)


def test_cli_runs_end_to_end(build, tmp_path: Path) -> None:
    m, out, _ = build
    env = dict(os.environ)
    r = subprocess.run([sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(m), "--max-steps", "2",
                        "--train-dir", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained to step 2" in r.stdout
    blocker = tmp_path / "a-file"  # a run folder under a regular file cannot be created, even by root
    blocker.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(m), "--max-steps", "1",
                        "--train-dir", str(blocker / "run")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "cannot write" in r.stderr, r.stderr


# ------------------------------------------------------------------ DDP ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(manifest: Path, run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # the trainer must choose CPU DDP by itself on a host without CUDA
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "model" / "train.py"), "--manifest", str(manifest),
           "--train-dir", str(run), "--max-steps", str(steps), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def test_two_process_ddp_on_the_cpu(build, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 model/train.py` on this CUDA-less host: one DDP group over
    gloo. Every step is logged once, the two ranks train on disjoint rows that together are
    the global batch, and 2 steps + 2 resumed steps give bit for bit the losses, gradient norms,
    weights and Adam state of 4 straight steps."""
    m, out, cfg = build
    body = json.loads(Path(m).read_text())
    body["train"].update(batch_size=2, micro_batch_size=1, num_workers=0, checkpoint_every=2, validation_pairs=0)
    manifest = tmp_path / "ddp.json"
    manifest.write_text(json.dumps(body))

    straight, part = tmp_path / "straight", tmp_path / "part"
    for run, steps, extra in ((straight, 4, ()), (part, 2, ()), (part, 4, ("--resume",))):
        r = _torchrun(manifest, run, steps, *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    state = json.loads((straight / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["accumulation"] == 1
    logs = {run.name: _metrics(run) for run in (straight, part)}
    for name, log in logs.items():
        assert [x["step"] for x in log] == [1, 2, 3, 4], name  # once each: one logging process
        for x in log:
            rank0, rank1 = x["rows"]
            assert len(rank0) == len(rank1) == 1 and not set(rank0) & set(rank1), x
    # the ranks' rows are the global batches EpochSampler defines for 2 × 1 (independent of the run)
    from model.training.data import EpochSampler

    n = sum(json.loads((out / "pairs" / f"shard-0000{s}.arrow.json").read_text())["rows"] for s in range(3))
    order = EpochSampler(n, 1, cfg.seed, world_size=2).epoch_order(0).reshape(-1, 2)
    assert [x["rows"] for x in logs["straight"]] == [[[int(a)], [int(b)]] for a, b in order[:4]]
    for a, b in zip(logs["straight"], logs["part"]):
        for k in ("loss", "eps", "rgb", "fft", "grad_norm", "rows"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    assert_bitwise_equal(_tensors(part / "checkpoints" / "step-00000004"),
                         _tensors(straight / "checkpoints" / "step-00000004"))
