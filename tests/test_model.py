"""SSP-IR's networks on tiny SD1.5-shaped models, both attention layouts ("paper": the
release's transformer blocks; "adapter": projections inside SD's attn2): zero-init
equivalence with SD1.5, which tensors train when, save/load and the cross-layout refusal,
the CLIP image encoder's preprocessing, parameter counts (full size on the meta device:
997,804,953 and 416,498,761), gradient checkpointing and bf16, and that structure attention
reads the ControlNet output of its own resolution.

The tiny folder (demo_fixtures.tiny_sd) has SD1.5's block layout at toy widths and is loaded
through the same `from_pretrained` calls real weights take; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from demo_fixtures.tiny_sd import build_tiny_sd
from model.networks.attention import PriorAttnProcessor
from model.networks.blocks import PriorTransformer2DModel, StructureUpBlock2D
from model.networks.image_encoder import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageEncoder, load_image_encoder, resolve_image_encoder,
)
from model.networks.layouts import LayoutMismatchError
from model.networks.sspir import SSPIR, ModelLayoutError
from model.networks.unet_layout import controlnet_residual_layout

TINY_PROCESSOR = {"paper": {"channels": [8, 8, 16, 16]},
                  "adapter": {"stem_channels": 8, "channels": [8, 16, 16], "feature_channels": 16}}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
B, H = 2, 64  # batch, HQ size: LQ 16², latents 8² (the tiny UNet halves them three times)
LAYOUTS = ("paper", "adapter")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "sd15")


def load(tiny_sd: Path, layout: str = "paper", **kwargs) -> SSPIR:
    if "trainable" not in kwargs:
        kwargs.setdefault("processor_kwargs", TINY_PROCESSOR[layout])
        kwargs["attention_layout"] = layout
    return SSPIR.from_pretrained(str(tiny_sd), str(tiny_sd / "image_encoder"), **kwargs)


def inputs(seed: int = 0, size: int = H) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "noisy_latents": torch.randn(B, 4, size // 8, size // 8, generator=g),
        "timesteps": torch.randint(0, 1000, (B,), generator=g),
        "text_hidden": torch.randn(B, 77 * 2, 32, generator=g),
        "lq": torch.rand(B, 3, size // 4, size // 4, generator=g),
        "lq_up": torch.rand(B, 3, size, size, generator=g) * 2 - 1,
    }


def randomize_zero_inits(model: SSPIR, seed: int = 1) -> None:
    """Give every zero-initialised tensor random values (what training would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.trainable.named_parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- (a) ---


@pytest.mark.parametrize("layout", LAYOUTS)
def test_at_init_the_model_is_sd15(tiny_sd: Path, layout: str) -> None:
    from diffusers import UNet2DConditionModel

    model = load(tiny_sd, layout)
    plain = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    x = inputs()
    priors = model.priors(**x)
    assert all(r.abs().sum() == 0 for r in priors["down"]) and priors["mid"].abs().sum() == 0
    assert priors["image_tokens"].abs().sum() > 0 and priors["rgbs"][0].abs().sum() > 0  # real inputs, not zeros
    if layout == "adapter":
        processors = [p for p in model.unet.attn_processors.values() if isinstance(p, PriorAttnProcessor)]
        assert len(processors) == len(model.prior.specs) == 10  # every attn2: 3 down, 1 mid, 6 up
    else:  # every text transformer of both models, and the attention-free first up block
        def retyped(m, cls):
            return sum(type(x) is cls for x in m.modules())
        assert retyped(model.unet, PriorTransformer2DModel) == 10 and retyped(model.unet, StructureUpBlock2D) == 1
        assert retyped(model.controlnet, PriorTransformer2DModel) == 4  # 3 down + 1 mid
        groups = {}
        for site in model.prior.sites:
            groups[site.group] = groups.get(site.group, 0) + 1
        assert groups == {"image_attention_unet": 10, "image_attention_controlnet": 4, "structure_attention": 8}
    # the frozen UNet's own state dict is SD1.5's, tensor for tensor (the new blocks live elsewhere)
    ours_sd, plain_sd = model.unet.state_dict(), plain.state_dict()
    assert ours_sd.keys() == plain_sd.keys() and all(torch.equal(ours_sd[k], plain_sd[k]) for k in plain_sd)

    with torch.no_grad():
        ours, rgbs = model(**x)
        ref = plain(x["noisy_latents"], x["timesteps"], encoder_hidden_states=x["text_hidden"]).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=0 if layout == "paper" else 1e-6)
    assert [tuple(r.shape) for r in rgbs] == [(B, 3, H // 2, H // 2), (B, 3, H // 4, H // 4), (B, 3, H // 8, H // 8)]

    # the comparison can fail: one non-zero output projection of a new layer changes the prediction
    with torch.no_grad():
        if layout == "adapter":
            next(iter(model.prior.layers.values())).image.to_out.weight.normal_(std=0.1)
        else:
            first = next(s for s in model.prior.sites if s.model == "unet")
            model.prior.blocks[first.key].proj_out.weight.normal_(std=0.1)
        changed, _ = model(**x)
    assert (changed - ref).abs().max() > 1e-4


def test_paper_processor_is_the_controlnet_embedding_plus_rgb_heads(tiny_sd: Path, tmp_path: Path) -> None:
    """The RGB heads walk the ControlNet's own conditioning embedding: the features they hand
    the ControlNet are exactly what diffusers' ControlNetConditioningEmbedding computes, and the
    saved ControlNet is a plain diffusers one with the release's RGB embedding."""
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    model = load(tiny_sd)
    randomize_zero_inits(model)
    emb = model.controlnet.controlnet_cond_embedding
    lq_up = inputs()["lq_up"]
    with torch.no_grad():
        features, rgbs = model.processor(emb, lq_up)
        plain = ControlNetConditioningEmbedding.forward(emb, lq_up)  # diffusers' own forward on the same weights
    assert torch.equal(features, plain) and features.abs().sum() > 0
    assert [r.shape[-1] for r in rgbs] == [H // 2, H // 4, H // 8]
    model.save_trainable(tmp_path / "t")
    cn = ControlNetModel.from_pretrained(str(tmp_path / "t" / "controlnet"))
    assert type(cn.controlnet_cond_embedding) is ControlNetConditioningEmbedding
    assert tuple(cn.config.conditioning_embedding_out_channels) == (8, 8, 16, 16)
    assert cn.config.conditioning_channels == 3
    with pytest.raises(ValueError, match="conditioning embedding computed by the Processor"):
        model.controlnet(inputs()["noisy_latents"], inputs()["timesteps"], inputs()["text_hidden"], lq_up)


# ---------------------------------------------------------------- (b) ---


def test_which_tensors_train_when(tiny_sd: Path) -> None:
    """Adapter layout. Frozen tensors never change. Trainable tensors get a gradient at step
    0 only where no zero-initialised layer stands between them and the loss; the rest follow
    once those layers have moved: step 1 behind one zero layer, step 2 behind two. Three Adam
    steps change every trainable tensor."""
    torch.manual_seed(0)
    model = load(tiny_sd, "adapter")
    first_grad, _ = _first_gradients(model)
    named = first_grad

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


def _first_gradients(model: SSPIR, steps: int = 3, size: int = 128) -> tuple[dict[str, int], dict[str, int]]:
    """Adam at lr 1e-3 on a fixed target: per trainable tensor, the first step with a non-zero
    gradient and the first step after which it differs from its start; frozen tensors checked.
    At 128² the tiny UNet's first up block is 2² (at 64² it would be 1², where attention over a
    single position has no gradient with respect to its queries and keys)."""
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.iter_frozen_parameters()}
    frozen_buffers = {n: b.clone() for n, b in model.unet.named_buffers()}
    named = dict(model.trainable.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    first_grad: dict[str, int] = {}
    changed_after: dict[str, int] = {}
    g = torch.Generator().manual_seed(5)
    target = torch.randn(B, 4, size // 8, size // 8, generator=g)
    rgb_targets = [torch.rand(B, 3, size // s, size // s, generator=g) * 2 - 1 for s in (2, 4, 8)]
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        noise_pred, rgbs = model(**inputs(step, size))
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
    return first_grad, changed_after


def test_paper_layout_every_new_transformer_is_reached_within_three_steps(tiny_sd: Path) -> None:
    """Frozen tensors never change; after 1, 2 and 3 Adam steps the gradient has reached the
    new transformers in the order their zero layers allow: the UNet's blocks' proj_out at
    step 0 and their insides at step 1; the ControlNet's image blocks sit behind its zero
    convs, so one step later each; every trainable tensor has moved after three steps."""
    torch.manual_seed(0)
    model = load(tiny_sd)
    first_grad, _ = _first_gradients(model)
    sites = {s.key: s for s in model.prior.sites}

    def when(pred) -> set[int]:
        return {first_grad[n] for n in first_grad if pred(n)}

    def block(n: str) -> tuple[str, str] | None:
        if not n.startswith("prior_blocks.blocks."):
            return None
        key, rest = n.split(".")[2], ".".join(n.split(".")[3:])
        return sites[key].model, rest

    assert all(when(lambda n, k=k: n.startswith(f"prior_blocks.blocks.{k}.")) for k in sites)  # each block reached
    assert when(lambda n: (b := block(n)) is not None and b[0] == "unet" and b[1].startswith("proj_out.")) == {0}
    assert when(lambda n: (b := block(n)) is not None and b[0] == "unet" and not b[1].startswith("proj_out.")) == {1}
    assert when(lambda n: (b := block(n)) is not None and b[0] == "controlnet"
                and b[1].startswith("proj_out.")) == {1}
    assert when(lambda n: (b := block(n)) is not None and b[0] == "controlnet"
                and not b[1].startswith("proj_out.")) == {2}
    # the Processor (RGB heads) and the embedding they read learn from the RGB losses at once
    assert when(lambda n: n.startswith("processor.")) == {0}
    assert when(lambda n: n.startswith("controlnet.controlnet_cond_embedding.")
                and "conv_out" not in n) == {0}
    assert when(lambda n: "controlnet_cond_embedding.conv_out" in n) == {1}  # behind the zero convs
    assert when(lambda n: n.startswith(("controlnet.controlnet_down_blocks", "controlnet.controlnet_mid_block"))) == {0}
    assert when(lambda n: n.startswith("refine.")) == {1}  # feeds image keys/values behind zero proj_out


# ---------------------------------------------------------------- (c) ---


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_trainable_round_trip(tiny_sd: Path, tmp_path: Path, layout: str) -> None:
    model = load(tiny_sd, layout)
    randomize_zero_inits(model)
    with torch.no_grad():
        for p in model.refine.parameters():
            p.add_(0.01)
    out = model.save_trainable(tmp_path / "ckpt")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    prior = model.layout.prior_part
    assert {f"{prior}.safetensors", f"{prior}.json", "layout.json", "processor/config.json",
            "controlnet/config.json", "refine/config.json"} <= set(files)
    assert json.loads((out / "layout.json").read_text())["attention_layout"] == layout

    again = load(tiny_sd, trainable=out)  # the folder's layout is adopted (restoration)
    assert again.attention_layout == layout
    a, b = model.trainable.state_dict(), again.trainable.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and b[k].dtype == torch.float32, k
    x = inputs()
    with torch.no_grad():
        reference = model(**x)[0]
        torch.testing.assert_close(again(**x)[0], reference, rtol=0, atol=0)
        assert (reference - load(tiny_sd, layout)(**x)[0]).abs().max() > 1e-3  # the loaded weights matter

    fresh = load(tiny_sd, layout)  # resume: load into a built model whose optimizer already holds its parameters
    params = fresh.trainable_parameters()
    fresh.load_trainable(out)
    assert all(a is b for a, b in zip(params, fresh.trainable_parameters()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x)[0], reference, rtol=0, atol=0)
    changed = dict(TINY_PROCESSOR[layout], channels=[4, 8, 16, 16] if layout == "paper" else [4, 16, 16])
    other = load(tiny_sd, layout, processor_kwargs=changed)  # another config: replaced by the saved one
    other.load_trainable(out)
    assert list(other.processor.config.channels) == TINY_PROCESSOR[layout]["channels"]
    with torch.no_grad():
        torch.testing.assert_close(other(**x)[0], reference, rtol=0, atol=0)

    (out / f"{prior}.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{prior}.json"):
        load(tiny_sd, trainable=out)


def test_a_checkpoint_of_one_layout_is_refused_by_the_other(tiny_sd: Path, tmp_path: Path) -> None:
    paper = load(tiny_sd, "paper").save_trainable(tmp_path / "paper")
    adapter = load(tiny_sd, "adapter").save_trainable(tmp_path / "adapter")
    with pytest.raises(LayoutMismatchError, match=r"attention_layout 'paper'.*uses 'adapter'"):
        load(tiny_sd, "adapter").load_trainable(paper)
    with pytest.raises(LayoutMismatchError, match=r"attention_layout 'adapter'.*uses 'paper'"):
        load(tiny_sd, "paper").load_trainable(adapter)
    with pytest.raises(LayoutMismatchError, match="train.attention_layout"):
        SSPIR.from_pretrained(str(tiny_sd), str(tiny_sd / "image_encoder"), trainable=paper,
                              attention_layout="adapter")


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


def _summary(manifest: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any download would fail
    return subprocess.run([sys.executable, "-m", "model.summary", "--manifest", str(manifest), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_summary_counts_the_tiny_model_exactly(tiny_sd: Path, tmp_path: Path, layout: str) -> None:
    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({"name": "tiny", "seed": 1, "output": "out", "sources": [],
                                    "train": {"pretrained": str(tiny_sd), "image_encoder": str(tiny_sd / "image_encoder"),
                                              "attention_layout": layout, "processor": TINY_PROCESSOR[layout]}}))
    proc = _summary(manifest, "--json", "--no-release")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["attention_layout"] == layout
    model = load(tiny_sd, layout)  # real weights: the meta build must count the same tensors
    real = {k: sum(p.numel() for p in m.parameters()) for k, m in model.trainable_modules().items()}
    t = counts["trainable"]
    assert t["controlnet"] == real["controlnet"] and t["processor"] == real["processor"]
    assert t["refine"] == real["refine"]
    prior_groups = sum(v for k, v in t.items() if k not in ("controlnet", "processor", "refine"))
    assert prior_groups == real[model.layout.prior_part] > 0
    assert counts["trainable_total"] == sum(real.values())
    assert counts["frozen"]["unet"] == sum(p.numel() for p in model.unet.parameters())
    assert counts["frozen"]["image_encoder"] == sum(p.numel() for p in model.image_encoder.parameters())
    from model.networks.counting import format_counts

    text = format_counts(counts)
    assert "total trainable" in text and "paper: 997.80 M" in text


FROZEN_SD15 = {"vae": 83_653_863, "unet": 859_520_964, "text_encoder": 123_060_480, "image_encoder": 303_179_776}


def test_summary_full_size_paper_layout_is_the_release_part_by_part() -> None:
    """`python -m model.summary --manifest manifests/full.json` on the meta device, with any
    download made to fail: the paper layout counts 997,804,953 trainable parameters, and each
    part equals the release table rebuilt independently from SD1.5's UNet config
    (model/networks/counting.py `release_layout_counts`)."""
    from model.networks.counting import PAPER_TO_RELEASE

    proc = _summary(ROOT / "manifests" / "full.json", "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)
    assert c["attention_layout"] == "paper" and c["frozen"] == FROZEN_SD15
    assert c["trainable_total"] == 997_804_953 == c["release_layout_total"]
    assert {k: c["release_layout"][PAPER_TO_RELEASE[k]] for k in c["trainable"]} == c["trainable"]
    assert c["prior_layers"] == {"image_attention_unet": 16, "image_attention_controlnet": 7, "structure_attention": 12}
    assert "997,804,953" in _summary(ROOT / "manifests" / "full.json", "--no-release").stdout  # the printed table


def test_summary_full_size_adapter_layout() -> None:
    proc = _summary(ROOT / "manifests" / "full.json", "--json", "--no-release", "--attention-layout", "adapter")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)
    assert c["attention_layout"] == "adapter" and c["frozen"] == FROZEN_SD15
    assert c["trainable_total"] == 416_498_761
    assert c["trainable"] == {"controlnet": 362_036_480, "processor": 2_687_305, "refine": 2_890_496,
                              "prior_attention_image": 31_572_160, "prior_attention_structure": 17_312_320}
    assert c["prior_layers"] == {"image": 16, "structure": 9}


# ---------------------------------------------------------------- (f) ---


def _structure_layers(model: SSPIR) -> list[tuple[torch.nn.Module, int, int, tuple[int, int]]]:
    """(module whose output carries the structure term, residual index, its channels, (up block,
    resnet) it follows) for each structure attention of the model's layout."""
    out = []
    if model.attention_layout == "adapter":
        for spec in model.prior.specs:
            if spec.structure_index is not None:
                i, j = map(int, spec.name.split(".")[1:4:2])
                out.append((model.unet.get_submodule(spec.name), spec.structure_index, spec.structure_channels, (i, j)))
    else:
        for site in model.prior.sites:
            if site.kind == "structure":
                i, j = map(int, site.path.split(".")[1:4:2])
                out.append((model.prior.blocks[site.key], site.residual_index, site.config["cross_attention_dim"],
                            (i, j)))
    return out


def _random_residuals(model: SSPIR, x: dict[str, torch.Tensor], seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    with torch.no_grad():
        p = model.priors(**x)
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(d.shape, generator=g) for d in p["down"]), p["mid"]  # non-zero, as after training


@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_attention_reads_the_controlnet_output_of_its_resolution(tiny_sd: Path, layout: str) -> None:
    """Perturb one ControlNet residual (passed only to structure attention, not added): the
    first structure layer whose output changes is the one mapped to it, at its resolution.
    The paper layout reads every residual (its first up block has structure transformers);
    the adapter's residuals of the attention-free first up block change nothing."""
    model = load(tiny_sd, layout)
    randomize_zero_inits(model)
    x = inputs()
    down, _ = _random_residuals(model, x, 0)
    with torch.no_grad():
        tokens = model.static_priors(x["lq"], x["lq_up"])["image_tokens"]
    assert [d.shape[1] for d in down] == controlnet_residual_layout(model.unet)
    layers = _structure_layers(model)
    outputs: list[tuple[int, torch.Tensor]] = []

    def record(pos):
        return lambda mod, args, out: outputs.append((pos, (out[0] if isinstance(out, tuple) else out).detach().clone()))

    hooks = [layer.register_forward_hook(record(pos)) for pos, (layer, *_rest) in enumerate(layers)]

    def run(residuals):
        outputs.clear()
        with torch.no_grad():
            pred = model.unet_forward(x["noisy_latents"], x["timesteps"], x["text_hidden"], None, None, tokens,
                                      structure=residuals)
        return pred, list(outputs)

    mapped = {index: pos for pos, (_, index, _, _) in enumerate(layers)}
    assert sorted(mapped) == (list(range(8)) if layout == "paper" else [0, 1, 2, 3, 4, 5])
    try:
        base_pred, base = run(down)
        for k in range(len(down)):
            perturbed = list(down)
            perturbed[k] = down[k] + torch.randn_like(down[k])
            pred, outs = run(tuple(perturbed))
            changed = [pos for (pos, o), (_, o0) in zip(outs, base) if not torch.equal(o, o0)]
            if k not in mapped:
                assert not changed and torch.equal(pred, base_pred), k
                continue
            assert changed and changed[0] == mapped[k], (k, changed[:2])
            out = dict(outs)[mapped[k]]
            h, w = down[k].shape[-2:]
            assert out.shape[-2:] == (h, w) if out.ndim == 4 else out.shape[1] == h * w  # its resolution
            assert layers[mapped[k]][2] == down[k].shape[1]
            assert not torch.equal(pred, base_pred)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_attention_pairs_with_the_skip_of_its_resnet(tiny_sd: Path, layout: str) -> None:
    """Independent of our mapping: ask diffusers which up-block resnet consumes ControlNet
    residual k (perturb it on the additive path only; the first resnet whose output changes
    concatenates that skip). The structure attention after that resnet must read k."""
    model = load(tiny_sd, layout)
    randomize_zero_inits(model)
    unet = model.unet
    x = inputs(1)
    layout_channels = controlnet_residual_layout(unet)
    down, mid = _random_residuals(model, x, 3)
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

    by_resnet = {f"up_blocks.{i}.resnets.{j}": (index, ch) for _, index, ch, (i, j) in _structure_layers(model)}
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
            if resnet not in by_resnet:  # the adapter: the first up block has no attention to hook into
                assert layout == "adapter" and resnet.startswith("up_blocks.0."), resnet
                continue
            assert by_resnet[resnet] == (k, layout_channels[k]), (resnet, by_resnet[resnet])
        assert len(by_resnet) == (len(down) if layout == "paper" else len(down) - 2)
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------- training mode ---


class _CountingProcessor:
    """diffusers' SDPA attention processor that counts its calls per block. Module hooks do not
    run while torch recomputes a checkpoint; a processor runs inside the block's forward, so
    it sees the recomputation."""

    def __init__(self, calls: dict[str, int], key: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.calls, self.key = AttnProcessor2_0(), calls, key

    def __call__(self, *args, **kwargs):
        self.calls[self.key] = self.calls.get(self.key, 0) + 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_checkpointing_and_bf16_frozen_parts(tiny_sd: Path, layout: str) -> None:
    """Checkpointing gives the same gradients, and (paper) covers the new blocks: each new
    transformer's self-attention runs twice per forward + backward with it (recomputed in the
    backward pass), once without. bf16 frozen parts keep fp32 trainables and gradients."""
    x = inputs(3)
    calls: dict[str, int] = {}

    def grads(model: SSPIR) -> dict[str, torch.Tensor]:
        model.train()
        calls.clear()
        if layout == "paper":
            for key, block in model.prior.blocks.items():
                block.transformer_blocks[0].attn1.set_processor(_CountingProcessor(calls, key))
        pred, rgbs = model(**x)
        (pred.float().pow(2).mean() + sum(r.abs().mean() for r in rgbs)).backward()
        return {n: p.grad.clone() for n, p in model.trainable.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    plain = load(tiny_sd, layout)
    randomize_zero_inits(plain)
    ref = grads(plain)
    if layout == "paper":
        assert calls == dict.fromkeys(plain.prior.blocks, 1)
    ckpt = load(tiny_sd, layout)
    ckpt.trainable.load_state_dict(plain.trainable.state_dict())
    ckpt.enable_gradient_checkpointing()
    assert ckpt.unet.is_gradient_checkpointing and ckpt.controlnet.is_gradient_checkpointing
    got = grads(ckpt)
    if layout == "paper":
        assert all(b.gradient_checkpointing for b in ckpt.prior.blocks.values())
        assert calls == dict.fromkeys(ckpt.prior.blocks, 2)  # recomputed in the backward pass
    assert got.keys() == ref.keys() == {n for n, _ in ckpt.trainable.named_parameters()}
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)

    half = load(tiny_sd, layout, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, _ = half(**x)
    assert pred.dtype == torch.bfloat16
    pred.float().pow(2).mean().backward()
    grads_seen = [p.grad for p in half.trainable_parameters() if p.grad is not None]
    assert grads_seen and all(g.dtype == torch.float32 for g in grads_seen)
    assert not half.unet.training and half.trainable.training and not half.image_encoder.training
