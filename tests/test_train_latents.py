"""The trainer on cached VAE latents (the latents stage) against the trainer that encodes.

A small real build goes through the real degrade, caption, embed and latents stages with
the tiny SD1.5-shaped model; training runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import build_dataset, tiny_train
from model.training.config import TrainConfig
from model.training.trainer import TrainSetupError, Trainer, run_training
from pipeline.core.shards import read_sidecar, read_table, shard_path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]):
    d = tmp_path_factory.mktemp("latentsbuild")
    train = tiny_train(tiny_models["sd15"], max_steps=4, checkpoint_every=2, validation_pairs=1,
                       validation_steps=2, processor={"channels": [8, 8, 16, 16]})
    manifest = build_dataset(d, photo_dir, tiny_models, train, shards=2, latents=True, caption_tokens=6,
                             crops_per_image=2, rows_per_shard=4)
    return manifest, manifest.settings(TrainConfig, "train")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_cached_latents_give_the_encode_paths_loss_and_the_encoder_is_not_loaded(build, tmp_path: Path) -> None:
    manifest, cfg = build
    import io

    log = io.StringIO()
    cached = Trainer(manifest.output, tmp_path / "cached", dataclasses.replace(cfg, latents="cached"),
                     max_steps=1, show_progress=False, log=log)
    assert "latents: cached" in log.getvalue()
    assert cached.model.vae.encoder is None and cached.model.vae.decoder is not None
    cached.run()  # with a validation grid at the end: it borrows the encoder and gives it back
    assert cached.model.vae.encoder is None and any((tmp_path / "cached" / "validation").glob("*.png"))
    encode = tmp_path / "encode"
    run_training(manifest.output, encode, dataclasses.replace(cfg, latents="encode"), max_steps=1,
                 show_progress=False)
    a, b = _metrics(tmp_path / "cached")[0], _metrics(encode)[0]
    # the same ε from the same generator, on moments rounded to float16: equal to a few 1e-4
    for term in ("loss", "eps", "rgb", "fft"):
        assert a[term] == pytest.approx(b[term], rel=2e-3, abs=2e-4), term


def test_auto_uses_the_cache_and_records_it_and_resume_on_cached_latents_is_exact(build, tmp_path: Path) -> None:
    manifest, cfg = build
    straight = tmp_path / "straight"
    run_training(manifest.output, straight, cfg, max_steps=4, show_progress=False)
    state = json.loads(next((straight / "checkpoints").glob("step-00000004/trainer_state.json")).read_text())
    assert state["identity"]["build"]["latents"] == "cached"
    cut = tmp_path / "cut"
    run_training(manifest.output, cut, cfg, max_steps=2, show_progress=False)
    run_training(manifest.output, cut, cfg, max_steps=4, resume=True, show_progress=False)
    assert [m["loss"] for m in _metrics(cut)] == [m["loss"] for m in _metrics(straight)]
    # the same run resumed on encoded latents is another run: refused, naming the change
    with pytest.raises(TrainSetupError, match="build"):
        Trainer(manifest.output, cut, dataclasses.replace(cfg, latents="encode"), max_steps=6, resume=True,
                show_progress=False)


def test_latents_of_another_vae_or_with_other_keys_are_refused_before_training(build, tmp_path: Path,
                                                                               tiny_models: dict[str, Path]) -> None:
    manifest, cfg = build
    other = tmp_path / "other"
    shutil.copytree(manifest.output, other)
    side_path = shard_path(other, "latents", 1).with_name("shard-00001.arrow.json")
    side = json.loads(side_path.read_text())
    side["vae"]["weights_sha256"] = "0" * 64  # as if another VAE had made it
    side_path.write_text(json.dumps(side))
    with pytest.raises(TrainSetupError, match=r"latents shard 1 was made by another VAE.*train.pretrained"):
        Trainer(other, tmp_path / "r1", dataclasses.replace(cfg, latents="cached"), show_progress=False)
    import io

    log = io.StringIO()
    t = Trainer(other, tmp_path / "r2", cfg, max_steps=1, show_progress=False, log=log)  # auto: encodes, says why
    assert t.latents_source == "encode" and "another VAE" in log.getvalue()
    # keys disagreeing with pairs (same rows, another order): refused
    swapped = tmp_path / "swapped"
    shutil.copytree(manifest.output, swapped)
    import pyarrow as pa

    from pipeline.core.shards import ShardWriter, atomic_write_json, sidecar_path

    arrow = shard_path(swapped, "latents", 0)
    table = read_table(arrow)
    order = list(range(len(table)))[::-1]
    w = ShardWriter(arrow, table.schema)
    w.write_batch(pa.RecordBatch.from_pydict({n: table.column(n).take(order).combine_chunks()
                                              for n in table.column_names}, schema=table.schema))
    size, digest = w.commit()
    side = read_sidecar(arrow)
    atomic_write_json(sidecar_path(arrow), {**side, "bytes": size, "sha256": digest})
    with pytest.raises(TrainSetupError, match=r"latents shard 0.*keys differ from pairs"):
        Trainer(swapped, tmp_path / "r3", dataclasses.replace(cfg, latents="cached"), show_progress=False)


def test_cached_without_a_latents_stage_is_refused_naming_the_command(build, tmp_path: Path) -> None:
    manifest, cfg = build
    bare = tmp_path / "bare"
    shutil.copytree(manifest.output, bare, ignore=shutil.ignore_patterns("latents"))
    with pytest.raises(TrainSetupError, match=r"jobs/latents.py"):
        Trainer(bare, tmp_path / "r", dataclasses.replace(cfg, latents="cached"), show_progress=False)
