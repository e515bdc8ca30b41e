"""SSP-IR's networks on tiny SD1.5-shaped models: zero-init equivalence with SD1.5, which
tensors train when, save/load, the CLIP image encoder's preprocessing, parameter counts,
and that structure attention reads the ControlNet output of its own resolution.

The tiny folder (demo_fixtures.tiny_sd) has SD1.5's block layout at toy widths and is loaded
through the same `from_pretrained` calls real weights take; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from model.networks.attention import PriorAttnProcessor, controlnet_residual_layout
from model.networks.image_encoder import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageEncoder, load_image_encoder, resolve_image_encoder,
)
from model.networks.sspir import SSPIR, ModelLayoutError
from demo_fixtures.tiny_sd import build_tiny_sd

TINY_PROCESSOR = {"stem_channels": 8, "channels": [8, 16, 16], "feature_channels": 16}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
B, H = 2, 128  # batch, HQ size: LQ 32², latents 16²


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "sd15")


def load(tiny_sd: Path, **kwargs) -> SSPIR:
    if "trainable" not in kwargs:
        kwargs.setdefault("processor_kwargs", TINY_PROCESSOR)
    return SSPIR.from_pretrained(str(tiny_sd), str(tiny_sd / "image_encoder"), **kwargs)


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "noisy_latents": torch.randn(B, 4, H // 8, H // 8, generator=g),
        "timesteps": torch.randint(0, 1000, (B,), generator=g),
        "text_hidden": torch.randn(B, 77 * 2, 32, generator=g),
        "lq": torch.rand(B, 3, H // 4, H // 4, generator=g),
        "lq_up": torch.rand(B, 3, H, H, generator=g) * 2 - 1,
    }


def randomize_zero_inits(model: SSPIR, seed: int = 1) -> None:
    """Give every zero-initialised tensor random values (what training would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.trainable.named_parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- (a) ---


def test_at_init_the_model_is_sd15(tiny_sd: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = load(tiny_sd)
    plain = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    x = inputs()
    priors = model.priors(**x)
    assert all(r.abs().sum() == 0 for r in priors["down"]) and priors["mid"].abs().sum() == 0
    assert priors["image_tokens"].abs().sum() > 0 and priors["features"].abs().sum() > 0  # real inputs, not zeros
    processors = [p for p in model.unet.attn_processors.values() if isinstance(p, PriorAttnProcessor)]
    assert len(processors) == len(model.prior_attention.specs) == 10  # every attn2: 3 down, 1 mid, 6 up

    with torch.no_grad():
        ours, rgbs = model(**x)
        ref = plain(x["noisy_latents"], x["timesteps"], encoder_hidden_states=x["text_hidden"]).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert [tuple(r.shape) for r in rgbs] == [(B, 3, H // 2, H // 2), (B, 3, H // 4, H // 4), (B, 3, H // 8, H // 8)]

    # the comparison can fail: one non-zero output projection changes the prediction
    with torch.no_grad():
        layer = next(iter(model.prior_attention.layers.values()))
        layer.image.to_out.weight.normal_(std=0.1)
        changed, _ = model(**x)
    assert (changed - ref).abs().max() > 1e-4


# ---------------------------------------------------------------- (b) ---


def test_which_tensors_train_when(tiny_sd: Path) -> None:
    """Frozen tensors never change. Trainable tensors get a gradient at step 0 only where no
    zero-initialised layer stands between them and the loss; the rest follow once those
    layers have moved: step 1 behind one zero layer, step 2 behind two. Three Adam steps
    change every trainable tensor."""
    torch.manual_seed(0)
    model = load(tiny_sd)
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.iter_frozen_parameters()}
    frozen_buffers = {n: b.clone() for n, b in model.unet.named_buffers()}
    named = dict(model.trainable.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    first_grad: dict[str, int] = {}
    changed_after: dict[str, int] = {}
    g = torch.Generator().manual_seed(5)
    target = torch.randn(B, 4, H // 8, H // 8, generator=g)
    rgb_targets = [torch.rand(B, 3, H // s, H // s, generator=g) * 2 - 1 for s in (2, 4, 8)]
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        noise_pred, rgbs = model(**inputs(step))
        loss = F.mse_loss(noise_pred, target) + sum(F.l1_loss(r, t) for r, t in zip(rgbs, rgb_targets))
        loss.backward()
        for n, p in named.items():
            if p.grad is not None and p.grad.abs().sum() > 0:
                first_grad.setdefault(n, step)
        opt.step()
        for n, p in named.items():
            if n not in changed_after and not torch.equal(p, start[n]):
                changed_after[n] = step

    for n, p in model.iter_frozen_parameters():
        assert p.grad is None and not p.requires_grad, n
        assert torch.equal(p, frozen_before[n]), f"frozen tensor {n} changed"
    for n, b in model.unet.named_buffers():
        assert torch.equal(b, frozen_buffers[n]), n

    assert set(first_grad) == set(named), f"never got a gradient: {sorted(set(named) - set(first_grad))[:5]}"
    assert set(changed_after) == set(named)
    for n in named:  # a tensor moves in the step where it first has a gradient
        assert changed_after[n] == first_grad[n], n

    def when(pred) -> set[int]:
        return {first_grad[n] for n in named if pred(n)}

    # step 0: the zero layers themselves and what lies in front of no zero layer
    assert when(lambda n: n.startswith(("controlnet.controlnet_down_blocks", "controlnet.controlnet_mid_block"))) == {0}
    assert when(lambda n: ".image.to_out." in n) == {0}
    assert when(lambda n: n.startswith("processor.") and "to_features" not in n) == {0}  # RGB losses
    assert when(lambda n: n.endswith("structure.to_out.bias")) == {0}
    # step 1: behind one zero layer
    assert when(lambda n: n.startswith("controlnet.") and "controlnet_down_blocks" not in n
                and "controlnet_mid_block" not in n and "controlnet_cond_embedding.conv_in" not in n) == {1}
    assert when(lambda n: ".image.to_k." in n or ".image.to_v." in n) == {1}
    assert when(lambda n: n.startswith("refine.")) == {1}
    assert when(lambda n: n.endswith("structure.to_out.weight")) == {1}  # its input, the residual, was zero
    # step 2: behind two (zero conv → embedding conv_out; residual → structure to_out)
    assert when(lambda n: "controlnet_cond_embedding.conv_in" in n) == {2}
    assert when(lambda n: n.startswith("processor.to_features")) == {2}
    assert when(lambda n: ".structure.to_k." in n or ".structure.to_v." in n) == {2}


# ---------------------------------------------------------------- (c) ---


def test_save_load_trainable_round_trip(tiny_sd: Path, tmp_path: Path) -> None:
    model = load(tiny_sd)
    randomize_zero_inits(model)
    with torch.no_grad():
        for p in model.refine.parameters():
            p.add_(0.01)
    out = model.save_trainable(tmp_path / "ckpt")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    assert {"prior_attention.safetensors", "prior_attention.json", "processor/config.json",
            "controlnet/config.json", "refine/config.json"} <= set(files)

    again = load(tiny_sd, trainable=out)
    a, b = model.trainable.state_dict(), again.trainable.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and b[k].dtype == torch.float32, k
    assert again.processor.config.feature_channels == TINY_PROCESSOR["feature_channels"]
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(**x)[0], model(**x)[0], rtol=0, atol=0)

    fresh = load(tiny_sd)  # resume: load into a built model whose optimizer already holds its parameters
    params = fresh.trainable_parameters()
    fresh.load_trainable(out)
    assert all(a is b for a, b in zip(params, fresh.trainable_parameters()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x)[0], model(**x)[0], rtol=0, atol=0)
    other = load(tiny_sd, processor_kwargs={**TINY_PROCESSOR, "stem_channels": 4})  # another config: replaced
    other.load_trainable(out)
    assert other.processor.config.stem_channels == TINY_PROCESSOR["stem_channels"]
    with torch.no_grad():
        torch.testing.assert_close(other(**x)[0], model(**x)[0], rtol=0, atol=0)

    (out / "prior_attention.json").unlink()
    with pytest.raises(FileNotFoundError, match="prior_attention.json"):
        load(tiny_sd, trainable=out)


def test_missing_or_incomplete_sd_folder_is_a_clear_error(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLayoutError, match="not a folder"):
        SSPIR.from_pretrained(str(tmp_path / "nowhere"), str(tiny_sd / "image_encoder"))
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    (half / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"vae/.*scheduler/.*expected an SD1.5-layout folder"):
        SSPIR.from_pretrained(str(half), str(tiny_sd / "image_encoder"))
    with pytest.raises(FileNotFoundError, match="timm model folder"):
        SSPIR.from_pretrained(str(tiny_sd), str(tmp_path / "no_encoder"))


# ---------------------------------------------------------------- (d) ---


def test_image_encoder_uses_clip_statistics(tiny_sd: Path) -> None:
    enc = load_image_encoder(str(tiny_sd / "image_encoder"))
    assert type(enc.vit.blocks[0].mlp.act).__name__ == "QuickGELU"  # OpenAI CLIP's activation
    assert not any(p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(OPENAI_CLIP_MEAN))
    torch.testing.assert_close(enc.std.flatten(), torch.tensor(OPENAI_CLIP_STD))
    lq = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    tokens = enc.encode(lq)
    assert tokens.shape == (3, 256, enc.width) and enc.width == 32

    def manual(mean, std):
        x = F.interpolate(lq, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            return enc.vit.forward_features(x)

    full = manual(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert full.shape[1] == 257  # CLS + 16×16 patches
    torch.testing.assert_close(tokens, full[:, 1:])
    assert (manual(IMAGENET_MEAN, IMAGENET_STD)[:, 1:] - tokens).abs().max() > 1e-3  # the check can fail

    # an encoder declaring other statistics is refused rather than silently mis-normalised
    vit = load_image_encoder(str(tiny_sd / "image_encoder")).vit
    vit.pretrained_cfg = {**vit.pretrained_cfg, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    with pytest.raises(ValueError, match="OpenAI CLIP"):
        ImageEncoder(vit)
    # the real name resolves to QuickGELU, patch tokens only (registry lookup only, no download)
    name, kwargs = resolve_image_encoder("vit_large_patch14_clip_224.openai")
    assert name == "vit_large_patch14_clip_224.openai" and kwargs == {"num_classes": 0, "act_layer": "quick_gelu"}


def test_tiny_folder_is_deterministic_and_loads_like_real_weights(tiny_sd: Path, tmp_path: Path) -> None:
    again = build_tiny_sd(tmp_path / "again", parts=("unet", "vae", "scheduler", "image_encoder"))
    for rel in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "image_encoder/config.json", "image_encoder/model.safetensors"):
        assert (again / rel).read_bytes() == (tiny_sd / rel).read_bytes(), rel
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    model = load(tiny_sd)
    sched = model.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.prediction_type, sched.steps_offset) == (
        1000, "scaled_linear", "epsilon", 1)
    latents = model.encode_images(torch.rand(1, 3, H, H) * 2 - 1)
    assert latents.shape == (1, 4, H // 8, H // 8)


# ---------------------------------------------------------------- (e) ---


def _summary(manifest: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any download would fail
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "model.summary", "--manifest", str(manifest), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_summary_counts_the_tiny_model_exactly(tiny_sd: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({"name": "tiny", "seed": 1, "output": "out", "sources": [],
                                    "train": {"pretrained": str(tiny_sd), "image_encoder": str(tiny_sd / "image_encoder"),
                                              "processor": TINY_PROCESSOR}}))
    proc, _ = _summary(manifest, "--json")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    model = load(tiny_sd)  # real weights: the meta build must count the same tensors
    real = {k: sum(p.numel() for p in m.parameters()) for k, m in model.trainable_modules().items()}
    t = counts["trainable"]
    assert t["controlnet"] == real["controlnet"] and t["processor"] == real["processor"]
    assert t["refine"] == real["refine"]
    assert t["prior_attention_image"] + t["prior_attention_structure"] == real["prior_attention"]
    assert counts["trainable_total"] == sum(real.values())
    assert counts["frozen"]["unet"] == sum(p.numel() for p in model.unet.parameters())
    assert counts["frozen"]["image_encoder"] == sum(p.numel() for p in model.image_encoder.parameters())
    from model.summary import format_counts

    text = format_counts(counts)
    assert "total trainable" in text and "paper: 997.80 M" in text


def test_summary_full_size_on_meta_without_network() -> None:
    proc, seconds = _summary(ROOT / "manifests" / "full.json", "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)
    assert c["frozen"] == {"vae": 83_653_863, "unet": 859_520_964, "text_encoder": 123_060_480,
                           "image_encoder": 303_179_776}
    assert 360e6 < c["trainable"]["controlnet"] < 365e6  # SD1.5's encoder copy
    assert c["prior_layers"] == {"image": 16, "structure": 9}
    assert abs(c["release_layout_total"] / 1e6 - 997.80) < 0.01  # the paper's count, rebuilt
    assert seconds < 30, seconds


# ---------------------------------------------------------------- (f) ---


def test_structure_attention_reads_the_controlnet_output_of_its_resolution(tiny_sd: Path) -> None:
    """Perturb one ControlNet residual (passed only to structure attention, not added): the
    first attention layer whose output changes is the one mapped to it, at its resolution;
    residuals of the up block without attention change nothing."""
    model = load(tiny_sd)
    randomize_zero_inits(model)
    unet = model.unet
    x = inputs()
    with torch.no_grad():
        down, _ = model.controlnet(x["noisy_latents"], x["timesteps"], encoder_hidden_states=x["text_hidden"],
                                   controlnet_cond=model.processor(x["lq_up"])[0], return_dict=False)
        tokens = model.refine(model.image_encoder.encode(x["lq"]))
    down = tuple(torch.randn_like(d) for d in down)  # non-zero, as after training
    assert [d.shape[1] for d in down] == controlnet_residual_layout(unet)

    specs = {s.name: s for s in model.prior_attention.specs}
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [unet.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: outputs.append((name, out.detach().clone()))) for name in specs]

    def run(residuals):
        outputs.clear()
        with torch.no_grad():
            pred = model.unet_forward(x["noisy_latents"], x["timesteps"], x["text_hidden"], None, None, tokens,
                                      structure=residuals)
        return pred, list(outputs)

    base_pred, base = run(down)
    mapped = {s.structure_index: s for s in specs.values() if s.structure_index is not None}
    assert sorted(mapped) == [0, 1, 2, 3, 4, 5]  # 6, 7 feed the first up block, which has no attention
    try:
        for k in range(len(down)):
            perturbed = list(down)
            perturbed[k] = down[k] + torch.randn_like(down[k])
            pred, outs = run(tuple(perturbed))
            changed = [name for (name, o), (_, o0) in zip(outs, base) if not torch.equal(o, o0)]
            if k not in mapped:
                assert not changed and torch.equal(pred, base_pred), k
                continue
            spec = mapped[k]
            assert changed and changed[0] == spec.name, (k, changed[:2])
            h, w = down[k].shape[-2:]
            assert dict(outs)[spec.name].shape[1] == h * w  # the layer runs at the residual's resolution
            assert spec.structure_channels == down[k].shape[1]
            assert not torch.equal(pred, base_pred)
    finally:
        for hook in hooks:
            hook.remove()


def test_structure_attention_pairs_with_the_skip_of_its_resnet(tiny_sd: Path) -> None:
    """Independent of our mapping: ask diffusers which up-block resnet consumes ControlNet
    residual k (perturb it on the additive path only; the first resnet whose output changes
    concatenates that skip). The attention after that resnet must be the one reading k."""
    model = load(tiny_sd)
    randomize_zero_inits(model)
    unet = model.unet
    x = inputs(1)
    g = torch.Generator().manual_seed(3)
    layout = controlnet_residual_layout(unet)
    with torch.no_grad():
        down, mid = model.controlnet(x["noisy_latents"], x["timesteps"], encoder_hidden_states=x["text_hidden"],
                                     controlnet_cond=model.processor(x["lq_up"])[0], return_dict=False)
    down = tuple(torch.randn(d.shape, generator=g) for d in down)
    resnets = [f"up_blocks.{i}.resnets.{j}" for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: outputs.__setitem__(name, out.detach().clone())) for name in resnets]

    def run(additive):
        outputs.clear()
        with torch.no_grad():
            model.unet_forward(x["noisy_latents"], x["timesteps"], x["text_hidden"], additive, torch.zeros_like(mid),
                               None, structure=down)
        return dict(outputs)

    by_layer = {s.name.split(".transformer_blocks")[0]: s for s in model.prior_attention.specs
                if s.structure_index is not None}
    try:
        base = run(down)
        consumers = {}
        for k in range(len(down)):
            perturbed = list(down)
            perturbed[k] = down[k] + 1.0
            outs = run(tuple(perturbed))
            changed = [n for n in resnets if not torch.equal(outs[n], base[n])]  # resnets run in this order
            consumers[k] = changed[0]
        assert len(set(consumers.values())) == len(down)  # each skip feeds exactly one resnet
        for k, resnet in consumers.items():
            spec = by_layer.get(resnet.replace(".resnets.", ".attentions."))
            if spec is None:  # the first up block has no attention
                assert resnet.startswith("up_blocks.0."), resnet
                continue
            assert spec.structure_index == k and spec.structure_channels == layout[k], (resnet, spec)
        assert len(by_layer) == sum(1 for r in consumers.values() if not r.startswith("up_blocks.0."))
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------- training mode ---


def test_gradient_checkpointing_and_bf16_frozen_parts(tiny_sd: Path) -> None:
    x = inputs(3)

    def grads(model: SSPIR) -> dict[str, torch.Tensor]:
        model.train()
        pred, rgbs = model(**x)
        (pred.float().pow(2).mean() + sum(r.abs().mean() for r in rgbs)).backward()
        return {n: p.grad.clone() for n, p in model.trainable.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    plain = load(tiny_sd)
    randomize_zero_inits(plain)
    ref = grads(plain)
    ckpt = load(tiny_sd)
    ckpt.trainable.load_state_dict(plain.trainable.state_dict())
    ckpt.enable_gradient_checkpointing()
    assert ckpt.unet.is_gradient_checkpointing and ckpt.controlnet.is_gradient_checkpointing
    got = grads(ckpt)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)

    half = load(tiny_sd, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())
    pred, _ = half(**x)
    assert pred.dtype == torch.bfloat16
    pred.float().pow(2).mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in half.trainable_parameters())
    assert not half.unet.training and half.trainable.training and not half.image_encoder.training
