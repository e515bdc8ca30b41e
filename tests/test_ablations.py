"""The ablation switches of Tables III–V (model/networks/switches.py, the manifest's `train`
section) and the manifests of manifests/paper/.

* Full size, on the meta device: each paper manifest changes exactly the trainable parts its
  switch names (counts per part against the full model's 997,804,953).
* Tiny SD1.5-shaped models (demo_fixtures.tiny_sd, loaded as real weights are): every variant
  equals SD1.5 at step 0, has or lacks exactly the modules its switches say, and round-trips
  through save/load with its switches; the null image embedding carries nothing about the image.
* The real trainer on a small real build (degrade → tiny LLaVA captions → embed): an
  `image_attention: false` model trains; `text_prior: none` trains and restores on the empty
  prompt; a resume that changes a switch is refused (exit 2 from model/train.py, naming it);
  `train.run_dir` places the run.

Nothing of ours is mocked; what reaches the networks is observed with forward hooks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, build_dataset, tiny_train
from model.networks.blocks import IMAGE, STRUCTURE, PriorTransformer2DModel
from model.networks.layouts import LayoutMismatchError
from model.networks.sspir import SSPIR
from model.networks.switches import PriorSwitches
from model.training.config import TrainConfig
from model.training.trainer import TrainSetupError, Trainer, run_training
from pipeline.core.manifest import ManifestError, load_manifest, read_resolved

PAPER = ROOT / "manifests" / "paper"
TINY_PROCESSOR = {"paper": {"channels": [8, 8, 16, 16]},
                  "adapter": {"stem_channels": 8, "channels": [8, 16, 16], "feature_channels": 16}}
B, H = 2, 64

# What each row of Tables III–V switches (the paper's row labels, model/evaluation/paper_numbers.json).
ROWS = {
    "full": {},
    "text_null": {"text_prior": "none"},
    "image_null": {"image_prior": "none"},
    "both_null": {"text_prior": "none", "image_prior": "none"},
    "blip": {},  # other captions, same network
    "refine_linear": {"refine": "linear"},
    "no_rgb": {"lambda_rgb": 0.0},
    "no_fft": {"lambda_fft": 0.0},
    "no_rgb_fft": {"lambda_rgb": 0.0, "lambda_fft": 0.0},
    "no_image_attention": {"image_attention": False},
    "no_structure_attention": {"structure_attention": False},
    "no_attention": {"image_attention": False, "structure_attention": False},
}
# The trainable parts (model.summary's groups) each row removes or replaces.
CHANGED = {
    "refine_linear": {"refine"},
    "no_image_attention": {"image_attention_unet", "image_attention_controlnet", "refine"},
    "no_structure_attention": {"structure_attention"},
    "no_attention": {"image_attention_unet", "image_attention_controlnet", "refine", "structure_attention"},
}


# ------------------------------------------------------------ manifests ---


def test_one_manifest_per_row_of_tables_iii_to_v(monkeypatch: pytest.MonkeyPatch) -> None:
    """manifests/paper/ holds exactly the rows paper_numbers.json lays out, each full.json plus
    its switch and its own run folder (the BLIP row also its own caption variant)."""
    layout = json.loads((ROOT / "model" / "evaluation" / "paper_numbers.json").read_text())["tables"]
    rows = {r["id"] for t in ("III", "IV", "V") for r in layout[t]["rows"]}
    assert {p.stem for p in PAPER.glob("*.json")} == rows == set(ROWS)
    full, _ = read_resolved(ROOT / "manifests" / "full.json")
    run_dirs = set()
    for row, switch in ROWS.items():
        resolved, chain = read_resolved(PAPER / f"{row}.json")
        assert chain[1] == (ROOT / "manifests" / "full.json").resolve()
        assert resolved["name"] == row
        run_dirs.add(resolved["train"]["run_dir"])
        assert resolved["train"] == {**full["train"], **switch, "run_dir": resolved["train"]["run_dir"]}, row
        same = {k for k in full if k not in ("name", "description", "train", "caption")}
        assert {k: resolved[k] for k in same} == {k: full[k] for k in same}, row  # same pairs, embeddings, latents
        if row == "blip":
            assert resolved["caption"] == {**full["caption"], "variant": "blip", "engine": "transformers",
                                           "model": "Salesforce/blip-image-captioning-large"}
        else:
            assert resolved["caption"] == full["caption"], row
    assert len(run_dirs) == len(ROWS)  # each row trains into its own folder of the shared build
    monkeypatch.setenv("DATA_ROOT", "/data")
    cfg = load_manifest(PAPER / "no_attention.json", check_sources=False).settings(TrainConfig, "train")
    assert cfg.switches() == PriorSwitches(image_attention=False, structure_attention=False)
    assert cfg.run_dir == "train-no_attention"


# ---------------------------------------------------------- full size ---


def _counts(row: str) -> dict:
    from model.networks.counting import parameter_counts, read_train_section

    return parameter_counts(read_train_section(PAPER / f"{row}.json"), release=False)


def test_full_size_each_row_changes_exactly_the_parts_it_names() -> None:
    """On the meta device at SD1.5 size: the full model's 997,804,953 part by part; a row
    without a structural switch has every part of it; the others differ in exactly their
    parts: removed (0) or, for the linear Refine Layer, one Linear(1024 → 512)."""
    full = _counts("full")
    assert full["trainable_total"] == 997_804_953 and full["variant"] == "full"
    for row in ROWS:
        c = full if row == "full" else _counts(row)
        changed = {k for k in full["trainable"] if c["trainable"][k] != full["trainable"][k]}
        assert changed == CHANGED.get(row, set()), row
        assert c["switches"] == {**PriorSwitches().to_dict(),
                                 **{k: v for k, v in ROWS[row].items() if not k.startswith("lambda")}}, row
        for part in changed:
            expected = 1024 * 512 + 512 if (row, part) == ("refine_linear", "refine") else 0
            assert c["trainable"][part] == expected, (row, part)
        assert c["trainable_total"] == sum(c["trainable"].values())
        assert c["frozen"] == full["frozen"]


def test_summary_cli_prints_a_variant(tmp_path: Path) -> None:
    """`python -m model.summary --manifest manifests/paper/<row>.json` follows `extends` and
    prints the variant's counts; any download is made to fail."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9"}
    run = [sys.executable, "-m", "model.summary", "--manifest", str(PAPER / "no_image_attention.json")]
    proc = subprocess.run(run + ["--no-release"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ablation switches: image_attention false" in proc.stdout and "609,524,057" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"extends": str(PAPER / "full.json"), "train": {"image_prior": "zeros"}}))
    proc = subprocess.run([sys.executable, "-m", "model.summary", "--manifest", str(bad)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "image_prior must be one of refined, none" in proc.stderr


def test_bad_switches_are_refused_naming_the_key(tmp_path: Path) -> None:
    for section, message in [({"text_prior": "empty"}, "text_prior must be one of caption, none"),
                             ({"refine": {"hidden_dim": 8}}, "train.refine should be str"),
                             ({"image_attention": "off"}, "train.image_attention should be bool"),
                             ({"attention_layout": "adapter", "structure_attention": False},
                              "structure_attention: false removes the paper layout's"),
                             ({"image_attention": False, "image_prior": "none"}, "image_prior none needs image_attention"),
                             ({"lambda_fft": -0.01}, "lambda_rgb and lambda_fft must be >= 0"),
                             ({"run_dir": "../elsewhere"}, "run_dir must be a folder name relative")]:
        m = tmp_path / "m.json"
        m.write_text(json.dumps({"name": "x", "seed": 1, "output": str(tmp_path), "sources": [], "train": section}))
        with pytest.raises(ManifestError, match="train") as e:
            load_manifest(m, check_sources=False).settings(TrainConfig, "train")
        assert message in str(e.value), (section, str(e.value))


# --------------------------------------------------------------- tiny ---


@pytest.fixture(scope="module")
def tiny_sd(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["sd15"]


def load(tiny_sd: Path, layout: str = "paper", **kwargs) -> SSPIR:
    if "trainable" not in kwargs:
        kwargs.setdefault("processor_kwargs", TINY_PROCESSOR[layout])
        kwargs["attention_layout"] = layout
    return SSPIR.from_pretrained(str(tiny_sd), str(tiny_sd / "image_encoder"), **kwargs)


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"noisy_latents": torch.randn(B, 4, H // 8, H // 8, generator=g),
            "timesteps": torch.randint(0, 1000, (B,), generator=g),
            "text_hidden": torch.randn(B, 77, 32, generator=g),
            "lq": torch.rand(B, 3, H // 4, H // 4, generator=g),
            "lq_up": torch.rand(B, 3, H, H, generator=g) * 2 - 1}


class Calls:
    """Counts forward calls of a real module (here: the frozen CLIP tower's patch embedding)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


VARIANTS = [("paper", {}), ("paper", {"image_prior": "none"}), ("paper", {"refine": "linear"}),
            ("paper", {"image_attention": False}), ("paper", {"structure_attention": False}),
            ("paper", {"image_attention": False, "structure_attention": False}), ("paper", {"text_prior": "none"}),
            ("adapter", {"image_prior": "none", "refine": "linear"})]


@pytest.mark.parametrize("layout, switch", VARIANTS, ids=lambda v: v if isinstance(v, str) else PriorSwitches(**v).label())
def test_each_variant_is_sd15_at_step_0_and_has_exactly_its_parts(tiny_sd: Path, layout: str, switch: dict) -> None:
    from diffusers import UNet2DConditionModel

    sw = PriorSwitches(**switch)
    model = load(tiny_sd, layout, switches=sw)
    assert model.switches == sw
    plain = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    x = inputs()
    clip = Calls(model.image_encoder.vit.patch_embed)
    with torch.no_grad():
        ours, rgbs = model(**x)
        ref = plain(x["noisy_latents"], x["timesteps"], encoder_hidden_states=x["text_hidden"]).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=0 if layout == "paper" else 1e-6)
    assert len(rgbs) == 3
    assert clip.n == (1 if sw.runs_image_encoder else 0)  # the CLIP tower runs only when its tokens are read

    parts = set(model.trainable_modules())
    assert ("refine" in parts) == sw.image_attention
    if "refine" in parts:
        linear = [m for m in model.refine.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linear) == (1 if sw.refine == "linear" else 3) and model.refine.config.kind == sw.refine
    if layout == "paper":
        kinds = {s.kind for s in model.prior.sites}
        assert (IMAGE in kinds) == sw.image_attention and (STRUCTURE in kinds) == sw.structure_attention
        sites = [m._sspir_site for mod in (model.unet, model.controlnet) for m in mod.modules()
                 if type(m) is PriorTransformer2DModel]
        assert any(s.image is not None for s in sites) == sw.image_attention
        n_params = sum(p.numel() for p in model.prior.parameters())
        assert (n_params > 0) == (sw.image_attention or sw.structure_attention)
    # the comparison can fail: one moved zero layer changes the prediction
    with torch.no_grad():
        if layout == "paper" and model.prior.sites:
            site = next(s for s in model.prior.sites if s.model == "unet")
            model.prior.blocks[site.key].proj_out.weight.normal_(std=0.1)
        elif layout == "adapter":
            next(iter(model.prior.layers.values())).image.to_out.weight.normal_(std=0.1)
        else:
            model.controlnet.controlnet_down_blocks[0].weight.normal_(std=0.1)
        changed, _ = model(**x)
    assert (changed - ref).abs().max() > 1e-4


def test_the_null_image_embedding_carries_nothing_about_the_image(tiny_sd: Path) -> None:
    """image_prior none: the image attention reads Refine(0) (zeros in the CLIP tokens' shape),
    the same for every LQ; with the refined prior the tokens follow the image."""
    torch.manual_seed(0)
    null = load(tiny_sd, switches=PriorSwitches(image_prior="none"))
    torch.manual_seed(0)
    refined = load(tiny_sd)
    a, b = inputs(1)["lq"], inputs(2)["lq"]
    with torch.no_grad():
        ta, tb = null.image_tokens(a), null.image_tokens(b)
        zeros = torch.zeros(B, null.image_encoder.num_patches, null.image_encoder.width)
        assert torch.equal(ta, tb) and torch.equal(ta, null.refine(zeros))
        assert not torch.equal(refined.image_tokens(a), refined.image_tokens(b))
        assert ta.shape == refined.image_tokens(a).shape


def test_save_load_keeps_the_variant_and_refuses_another(tiny_sd: Path, tmp_path: Path) -> None:
    sw = PriorSwitches(image_attention=False)
    model = load(tiny_sd, switches=sw)
    with torch.no_grad():
        for p in model.trainable.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = model.save_trainable(tmp_path / "t")
    meta = json.loads((out / "layout.json").read_text())
    assert meta["switches"] == sw.to_dict() and "refine" not in meta["parts"] and not (out / "refine").exists()
    again = load(tiny_sd, trainable=out)  # restoration adopts the folder's switches
    assert again.switches == sw and again.refine is None
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(**x)[0], model(**x)[0], rtol=0, atol=0)
    with pytest.raises(LayoutMismatchError, match="train.image_attention: folder false, model true"):
        load(tiny_sd).load_trainable(out)
    with pytest.raises(LayoutMismatchError, match="train.image_attention"):
        load(tiny_sd, trainable=out, switches=PriorSwitches())


# ------------------------------------------------------------- trainer ---


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]):
    """8 pairs at 128² in 2 shards, captioned by the tiny LLaVA and embedded: the real stages."""
    d = tmp_path_factory.mktemp("ablations")
    train = tiny_train(tiny_models["sd15"], max_steps=1, checkpoint_every=1, validation_pairs=0,
                       processor=TINY_PROCESSOR["paper"])
    manifest = build_dataset(d, photo_dir, tiny_models, train, shards=2, crops_per_image=2, rows_per_shard=4)
    m = d / "m.json"
    return m, manifest.output, manifest.settings(TrainConfig, "train")


def _variant(cfg: TrainConfig, **switch) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **switch)


def test_a_model_without_image_attention_trains_and_restores(build, tmp_path: Path, photo_dir: Path) -> None:
    """One real optimizer step and its validation grid; the checkpoint holds no Refine Layer
    and no image-attention transformer, the image encoder never runs, and the remaining new
    blocks moved. The checkpoint restores, whole and in tiles (whose prior cache holds no
    image tokens)."""
    from model.inference.restorer import RestoreSettings, Restorer

    _, out, cfg = build
    cfg = _variant(cfg, image_attention=False, validation_pairs=1, validate_every=1, validation_steps=1)
    trainer = Trainer(out, tmp_path / "run", cfg, show_progress=False)
    assert trainer.model.refine is None and not any(s.kind == IMAGE for s in trainer.model.prior.sites)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainer.model.trainable_parameters()}
    before = {k: v.clone() for k, v in trainer.model.prior.state_dict().items()}
    clip = Calls(trainer.model.image_encoder.vit.patch_embed)
    history = trainer.run()
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and history[0]["grad_norm"] > 0
    assert clip.n == 0
    after = trainer.model.prior.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj_out.weight"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    meta = json.loads((ckpt / "trainable" / "layout.json").read_text())
    assert meta["switches"]["image_attention"] is False and "refine" not in meta["parts"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["image_attention"] is False
    assert state["identity"]["trainable"]["switches"]["image_attention"] is False
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()
    restorer = Restorer(tmp_path / "run", device="cpu")
    assert restorer.model.refine is None
    clip = Calls(restorer.model.image_encoder.vit.patch_embed)
    lq = _photo(photo_dir, 32)
    whole = restorer.restore(lq, "", RestoreSettings(steps=2, tile=0))
    tiled = restorer.restore(lq, "", RestoreSettings(steps=2, tile=16, tile_overlap=0))
    assert whole.image.shape == tiled.image.shape == (128, 128, 3) and tiled.tiles == 4
    assert clip.n == 0


def _photo(photo_dir: Path, side: int) -> np.ndarray:
    import cv2
    from PIL import Image

    rgb = np.asarray(Image.open(photo_dir / "astronaut.png").convert("RGB"))
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def caption_run(build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step of the full model."""
    _, out, cfg = build
    run = tmp_path_factory.mktemp("caption-run") / "run"
    run_training(out, run, cfg, show_progress=False)
    return run


@pytest.fixture(scope="module")
def text_null_run(build, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """One step with text_prior none; the text each UNet call received, observed on the UNet."""
    _, out, cfg = build
    run = tmp_path_factory.mktemp("text-null") / "run"
    trainer = Trainer(out, run, _variant(cfg, text_prior="none", validation_pairs=1, validate_every=1,
                                         validation_steps=1), show_progress=False)
    seen: list[torch.Tensor] = []
    hook = trainer.model.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        trainer.run()
    finally:
        hook.remove()
    return run, seen


def test_text_prior_none_trains_on_the_empty_prompt(build, text_null_run) -> None:
    """Every sample of every step, and the validation grid, get the empty prompt, although the
    build's rows have captions (the loader's null-text ratio is 0.5 for the full model)."""
    from model.training.data import load_empty_prompt

    _, out, _ = build
    run, seen = text_null_run
    empty = load_empty_prompt(out).float()
    assert len(seen) >= 2  # the training step, then the validation sampler's guided calls
    for text in seen:
        assert text.shape[1] % 77 == 0
        for row in text.view(text.shape[0], -1, 77, text.shape[-1]):
            assert all(torch.equal(chunk, empty) for chunk in row)
    assert (run / "validation" / "step-00000001.png").is_file()


def test_restoration_honours_text_prior_none(text_null_run, caption_run: Path, photo_dir: Path) -> None:
    """A text_prior-none checkpoint restores every image with the empty prompt whatever prompt
    it is offered, and model/restore.py runs no captioner for it; a caption checkpoint's
    restoration does follow the prompt."""
    import argparse

    from model.inference.restorer import RestoreSettings, Restorer
    from model.restore import prompts_for

    lq = _photo(photo_dir, 32)
    fast = RestoreSettings(steps=2, tile=0)
    null = Restorer(text_null_run[0], device="cpu")
    assert null.switches.text_prior == "none"
    a, b = null.restore(lq, "a photograph of an astronaut", fast), null.restore(lq, "", fast)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.prompt == "" and torch.equal(a.text, null.empty)
    full = Restorer(caption_run, device="cpu")
    assert full.switches.text_prior == "caption"
    c, d = full.restore(lq, "a photograph of an astronaut", fast), full.restore(lq, "", fast)
    assert np.abs(c.image.astype(int) - d.image.astype(int)).max() > 0
    args = argparse.Namespace(prompt="ignored", caption_engine="server", caption_model=None,
                              caption_server="http://127.0.0.1:9/v1", caption_max_tokens=None)
    inputs = [Path("x.png"), Path("y.png")]
    assert prompts_for(args, inputs, {}, "none") == {p: ("", "text_prior none") for p in inputs}


def test_resume_with_a_changed_switch_is_refused(build, caption_run: Path, tmp_path: Path) -> None:
    """Through the trainer (every switch, named with both values) and through model/train.py
    (exit 2), whose run folder comes from train.run_dir."""
    _, out, cfg = build
    for switch, line in [({"structure_attention": False}, "train.structure_attention: checkpoint true, this run false"),
                         ({"text_prior": "none"}, "train.text_prior: checkpoint caption, this run none"),
                         ({"image_prior": "none"}, "train.image_prior: checkpoint refined, this run none"),
                         ({"refine": "linear"}, "train.refine: checkpoint mlp, this run linear")]:
        with pytest.raises(TrainSetupError) as e:
            Trainer(out, caption_run, _variant(cfg, **switch), max_steps=2, resume=True, show_progress=False)
        assert line in str(e.value) and "trainable part" not in str(e.value), str(e.value)
    m, _, _ = build
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": str(m), "name": "no-structure",
                                 "train": {"structure_attention": False, "run_dir": "train-no-structure"}}))
    cli = [sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(child), "--no-progress"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "train-no-structure" / "checkpoints" / "step-00000001").is_dir()
    child.write_text(json.dumps({"extends": str(m), "name": "no-structure", "train": {"run_dir": "train-no-structure"}}))
    r = subprocess.run(cli + ["--resume", "--max-steps", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 2 and "train.structure_attention: checkpoint false, this run true" in r.stderr, r.stderr
