"""Restoration (model/restore.py over model/inference/) with checkpoints of the tiny
SD1.5-shaped model on the CPU. The sampling, tiling, caching and CLI mechanics do not depend
on the attention layout (they call SSPIR's forward), so most tests use an "adapter"
checkpoint, the cheaper of the two at tiny size; the "paper" layout (the default) restores end
to end in its own tests (one tile == untiled == the sampler called directly, bf16 state).

The checkpoint is what the trainer writes (trainable/ + trainer_state.json in
checkpoints/step-NNNNNNNN/), with the zero-initialised layers given random values so the
structure and image priors really change the output. Nothing of ours is mocked: the text
embedding the sampler uses is observed with a forward pre-hook on the model, the LRE start
with the sampler's own per-step callback; tiled restoration is checked against a blend
computed here from the documented rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.inference.captions import make_caption_engine
from model.inference.colour import adain_color_fix, wavelet_color_fix
from model.inference.images import lq_tensors
from model.inference.restorer import RestoreSettings, Restorer
from model.inference.sampling import guided_noise
from model.inference.scheduler import make_scheduler
from model.inference.tiling import blend_weights, plan_tiles, tiled_predictor
from model.restore import main
from model.training.config import TrainConfig

TINY_PROCESSOR = {"paper": {"channels": [8, 8, 16, 16]}, "adapter": {"stem_channels": 8, "channels": [8, 16, 16]}}
FAST = RestoreSettings(steps=2)


def write_run(run: Path, sd: Path, layout: str) -> Path:
    """A training run folder holding one checkpoint, written the way model/training/trainer.py writes it."""
    from model.networks.sspir import SSPIR

    torch.manual_seed(0)
    model = SSPIR.from_pretrained(str(sd), str(sd / "image_encoder"), attention_layout=layout,
                                  processor_kwargs=TINY_PROCESSOR[layout])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what training would do to the zero-initialised layers
        for p in model.trainable.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = run / "checkpoints" / "step-00000007"
    model.save_trainable(ckpt / "trainable")
    cfg = TrainConfig(pretrained=str(sd), image_encoder=str(sd / "image_encoder"), attention_layout=layout,
                      processor=TINY_PROCESSOR[layout])
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 7, "seed": 0, "config": cfg.to_dict()}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    return write_run(tmp_path_factory.mktemp("restore") / "run", tiny_models["sd15"], "adapter")


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    return write_run(tmp_path_factory.mktemp("restore") / "paper-run", tiny_models["sd15"], "paper")


@pytest.fixture(scope="module")
def restorer(run_dir: Path) -> Restorer:
    return Restorer(run_dir, device="cpu")


def photo(photo_dir: Path, name: str, size: tuple[int, int]) -> np.ndarray:
    """A real photo area-downscaled to (w, h): an LQ image with real content."""
    rgb = np.asarray(Image.open(photo_dir / name).convert("RGB"))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def lq128(photo_dir: Path) -> np.ndarray:
    return photo(photo_dir, "astronaut.png", (128, 128))


@pytest.fixture(scope="module")
def lq64(photo_dir: Path) -> np.ndarray:
    return photo(photo_dir, "astronaut.png", (64, 64))


def test_checkpoint_and_models_come_from_the_run(restorer: Restorer, run_dir: Path,
                                                 tiny_models: dict[str, Path]) -> None:
    assert restorer.checkpoint == run_dir / "checkpoints" / "step-00000007"
    assert restorer.step == 7 and restorer.sd == str(tiny_models["sd15"])
    assert restorer.multiple == 16  # LQ pixels: latent grid halved three times by the UNet


def test_128_gives_512(restorer: Restorer, lq128: np.ndarray) -> None:
    res = restorer.restore(lq128, "an astronaut", FAST)
    assert res.image.shape == (512, 512, 3) and res.image.dtype == np.uint8 and res.tiles == 1
    assert res.image.std() > 5  # not a flat image


def test_the_same_seed_gives_the_same_output(restorer: Restorer, lq64: np.ndarray) -> None:
    first = restorer.restore(lq64, "an astronaut", FAST)
    again = restorer.restore(lq64, "an astronaut", FAST)
    np.testing.assert_array_equal(again.image, first.image)
    other = restorer.restore(lq64, "an astronaut", RestoreSettings(steps=2, seed=1))
    assert np.abs(other.image.astype(int) - first.image).mean() > 1


def test_one_tile_equals_the_untiled_sampler(paper_run: Path, lq64: np.ndarray) -> None:
    """Paper layout, end to end. A 64² LQ with --tile 64 runs the tiled machinery with one
    tile; it must give exactly what --tile 0 and a direct call of
    model.inference.sampling.restore give."""
    from model.inference.sampling import restore as sample
    from model.training.validation import to_uint8

    restorer = Restorer(paper_run, device="cpu")
    assert restorer.model.attention_layout == "paper"
    tiled = restorer.restore(lq64, "an astronaut", RestoreSettings(steps=2, tile=64, tile_overlap=16))
    untiled = restorer.restore(lq64, "an astronaut", RestoreSettings(steps=2, tile=0))
    assert tiled.tiles == 1
    np.testing.assert_array_equal(untiled.image, tiled.image)
    lq, lq_up = lq_tensors(lq64, "cpu")
    sched = make_scheduler(restorer.model.noise_scheduler.config, "ddpm")
    direct = sample(restorer.model, sched, lq, lq_up, restorer.embed("an astronaut")[None], restorer.empty,
                    steps=2, guidance=7.5, seed=0)
    np.testing.assert_array_equal(to_uint8(direct[0]), tiled.image)


def _independent_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins by the documented rule, written here: every tile - overlap, the last flush with the end."""
    if length <= tile:
        return [0]
    starts, y = [], 0
    while y < length - tile:
        starts.append(y)
        y += tile - overlap
    return starts + [length - tile]


def _independent_bump(n: int, var: float = 0.01) -> np.ndarray:
    x = np.arange(n, dtype=np.float64)
    return np.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)


def test_tiled_prediction_is_the_normalised_gaussian_blend_of_the_tiles(restorer: Restorer, photo_dir: Path) -> None:
    """Against a computation written here: each tile's guided ε̂ on its own windows (LQ, LQ↑,
    latent), blended in float64 with Gaussian weights normalised to sum to one at every latent
    position. The same comparison with one tile placed one pixel off, or with flat weights,
    fails: the check can tell."""
    model = restorer.model
    lq, lq_up = lq_tensors(photo(photo_dir, "chelsea.png", (96, 80)), "cpu")  # latent 40 high × 48 wide
    text = restorer.embed("a cat")[None]
    from model.inference.sampling import uncond_like

    uncond = uncond_like(restorer.empty, text)
    tile, overlap, f, q = 16, 4, 8, 2  # latent units; image and LQ pixels per latent pixel
    latents = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(7))
    t = torch.tensor(500)
    with torch.no_grad():
        got = tiled_predictor(tile, overlap)(model, text, uncond, lq, lq_up, 7.5)(latents, t).double()
        ys, xs = _independent_origins(40, tile, overlap), _independent_origins(48, tile, overlap)
        assert ys == [0, 12, 24] and xs == [0, 12, 24, 32]
        windows = [(y, x) for y in ys for x in xs]

        def eps(y: int, x: int) -> torch.Tensor:
            return guided_noise(model, latents[..., y:y + tile, x:x + tile], t, text, uncond,
                                lq[..., q * y:q * (y + tile), q * x:q * (x + tile)],
                                lq_up[..., f * y:f * (y + tile), f * x:f * (x + tile)], 7.5).double()

        preds = {w: eps(*w) for w in windows}
        shifted = eps(13, 12)  # tile (12, 12) one latent pixel down

    bump = torch.from_numpy(np.outer(_independent_bump(tile), _independent_bump(tile)))

    def blend(placed: dict, weight: torch.Tensor) -> torch.Tensor:
        num, den = torch.zeros(1, 4, 40, 48, dtype=torch.float64), torch.zeros(1, 1, 40, 48, dtype=torch.float64)
        for (y, x), e in placed.items():
            num[..., y:y + tile, x:x + tile] += e * weight
            den[..., y:y + tile, x:x + tile] += weight
        assert bool((den > 0).all())  # the tiles cover every position
        return num / den

    expected = blend(preds, bump)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    off = dict(preds)
    del off[(12, 12)]
    off[(13, 12)] = shifted
    assert (blend(off, bump) - got).abs().max() > 1e-3
    assert (blend(preds, torch.ones_like(bump)) - got).abs().max() > 1e-3


def test_tiles_cover_the_grid_with_convex_weights() -> None:
    tiles = plan_tiles(152, 104, 64, 16)  # 300×200 LQ padded to 304×208 → latent 152×104
    assert [(y, x) for y, x, _, _ in tiles] == [(y, x) for y in (0, 48, 88) for x in (0, 40)]
    total = torch.zeros(1, 1, 152, 104)
    for (y, x, h, w), wt in zip(tiles, blend_weights(tiles, 152, 104)):
        total[..., y:y + h, x:x + w] += wt
    torch.testing.assert_close(total, torch.ones_like(total))
    (one,) = blend_weights(plan_tiles(64, 64, 64, 16), 64, 64)
    assert bool((one == 1).all())  # exactly: a single tile is the untiled prediction bit for bit


def test_300x200_restores_to_1200x800_in_tiles(restorer: Restorer, photo_dir: Path) -> None:
    """The model only ever sees tiles (latent 64², LQ 128², LQ↑ 512²), six per step (one step here)."""
    lq = photo(photo_dir, "chelsea.png", (300, 200))
    shapes: list[tuple] = []
    hook = restorer.model.register_forward_pre_hook(
        lambda mod, args: shapes.append(tuple(tuple(a.shape[-2:]) for a in (args[0], args[3], args[4]))))
    try:
        res = restorer.restore(lq, "a cat", RestoreSettings(steps=1, tile=128, tile_overlap=32))
    finally:
        hook.remove()
    assert res.image.shape == (800, 1200, 3) and res.tiles == 6
    assert len(shapes) == 6 and set(shapes) == {((64, 64), (128, 128), (512, 512))}
    assert res.image.std() > 5 and len(np.unique(res.image.reshape(-1, 3), axis=0)) > 1000


def _count_calls(module: torch.nn.Module, calls: list[int], arg: int = 0):
    """Record the batch of each call (of its positional input `arg`)."""
    return module.register_forward_hook(lambda mod, args, out: calls.append(args[arg].shape[0]))


@pytest.mark.parametrize("tile, tiles", [(0, 1), (64, 4)])
def test_static_priors_are_computed_once_per_tile_not_per_step(restorer: Restorer, photo_dir: Path,
                                                               tile: int, tiles: int) -> None:
    """The Processor and the CLIP tower depend on the LQ only: one call per tile (batch 1),
    whatever the number of steps; the ControlNet runs every step for both CFG branches."""
    lq = photo(photo_dir, "chelsea.png", (96, 80))
    processor, clip, controlnet = [], [], []
    hooks = [_count_calls(restorer.model.processor, processor, -1), _count_calls(restorer.model.image_encoder.vit.patch_embed, clip),
             _count_calls(restorer.model.controlnet, controlnet)]
    try:
        res = restorer.restore(lq, "a cat", RestoreSettings(steps=3, tile=tile, tile_overlap=16))
    finally:
        for h in hooks:
            h.remove()
    assert res.tiles == tiles
    assert processor == [1] * tiles and clip == [1] * tiles
    assert controlnet == [2] * (3 * tiles)


def test_cached_priors_predict_what_the_plain_forward_predicts(restorer: Restorer, lq64: np.ndarray) -> None:
    """guided_noise with precomputed static priors == the model's training forward on the
    CFG batch (which computes the Processor and CLIP priors itself)."""
    from model.inference.sampling import uncond_like

    model = restorer.model
    lq, lq_up = lq_tensors(lq64, "cpu")
    text = restorer.embed("an astronaut")[None]
    uncond = uncond_like(restorer.empty, text)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        cached = guided_noise(model, latents, t, text, uncond, lq, lq_up, 7.5, model.static_priors(lq, lq_up))
        pred = model(torch.cat([latents] * 2), torch.cat([t, t]), torch.cat([uncond, text]),
                     torch.cat([lq] * 2), torch.cat([lq_up] * 2))[0]
    p_uncond, p_text = pred.chunk(2)
    # batch 1 (cached) against batch 2 (the forward's own priors): conv kernels round differently
    torch.testing.assert_close(cached, p_uncond + 7.5 * (p_text - p_uncond), rtol=1e-5, atol=5e-5)
    assert cached.abs().mean() > 0.1


def test_a_prior_cache_over_budget_recomputes_and_gives_the_same_result(restorer: Restorer, photo_dir: Path) -> None:
    from model.inference.sampling import restore as sample

    lq, lq_up = lq_tensors(photo(photo_dir, "chelsea.png", (96, 80)), "cpu")
    sched = make_scheduler(restorer.model.noise_scheduler.config, "ddpm")
    text = restorer.embed("a cat")[None]
    calls: list[int] = []
    hook = _count_calls(restorer.model.processor, calls, -1)
    try:
        outs = [sample(restorer.model, sched, lq, lq_up, text, restorer.empty, steps=2,
                       predictor=tiled_predictor(32, 8, prior_cache_bytes=budget)) for budget in (1 << 30, 0)]
    finally:
        hook.remove()
    assert len(calls) == 4 + 2 * 4  # 4 tiles: once with the cache, every step without
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def _captured_text(restorer: Restorer, lq: np.ndarray, prompt: str) -> torch.Tensor:
    """The text_hidden the model is actually called with (the conditional CFG half)."""
    seen: list[torch.Tensor] = []
    hook = restorer.model.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    try:
        restorer.restore(lq, prompt, RestoreSettings(steps=1))
    finally:
        hook.remove()
    return seen[0].chunk(2)[1][0]


def test_prompt_reaches_the_text_encoder(restorer: Restorer, photo_dir: Path, tiny_models: dict[str, Path]) -> None:
    from pipeline.embed.encoder import encode_captions, load_text_encoder

    lq = photo(photo_dir, "rocket.jpg", (64, 64))
    engine = make_caption_engine("transformers", str(tiny_models["llava"]), None, 8)
    try:
        (caption,) = [r.caption for r in engine.caption([Image.fromarray(lq)])]
    finally:
        engine.close()
    assert caption
    prompt = "a red sports car on a wet road at night"
    used_prompt = _captured_text(restorer, lq, prompt)
    used_caption = _captured_text(restorer, lq, caption)
    tok, enc = load_text_encoder(str(tiny_models["sd15"]), "cpu")  # the embed stage's code, loaded afresh
    expected = torch.from_numpy(encode_captions(tok, enc, [prompt], 4, 1)[0].hidden).float()
    torch.testing.assert_close(used_prompt, expected, rtol=0, atol=0)
    assert used_prompt.shape == used_caption.shape == (77, 32)
    assert (used_prompt - used_caption).abs().max() > 0.1


def test_lre_start_is_the_lq_latent_noised_to_999(restorer: Restorer, photo_dir: Path,
                                                  tiny_models: dict[str, Path]) -> None:
    from diffusers import DDPMScheduler

    lq = photo(photo_dir, "camera.png", (64, 64))
    for kind, tol in (("ddpm", 0.0), ("dpm", 1e-5)):
        seen: list[tuple[int, torch.Tensor]] = []
        restorer.restore(lq, "x", RestoreSettings(steps=1, seed=5, scheduler=kind),
                         on_step=lambda i, t, z: seen.append((int(t), z.clone())))
        lq_up = torch.from_numpy(cv2.resize(lq, (256, 256), interpolation=cv2.INTER_CUBIC)).permute(2, 0, 1)[None]
        latent = restorer.model.encode_images(lq_up.float() / 127.5 - 1, sample=False)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
        sd_sched = DDPMScheduler.from_pretrained(str(tiny_models["sd15"]), subfolder="scheduler")
        expected = sd_sched.add_noise(latent, noise, torch.tensor([999]))
        assert seen[0][0] == 999
        torch.testing.assert_close(seen[0][1], expected, rtol=0, atol=tol + 1e-6)


def test_color_fixes() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ref = torch.rand(1, 3, 64, 64, generator=g) * 0.5
    fixed = adain_color_fix(img, ref)
    torch.testing.assert_close(fixed.mean((2, 3)), ref.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), ref.std((2, 3)), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(wavelet_color_fix(img, img), img, atol=1e-5, rtol=0)  # identity on itself
    smooth = torch.full_like(img, 0.3)  # a flat reference: its low band is 0.3, the detail stays the image's
    wav = wavelet_color_fix(img, smooth)
    torch.testing.assert_close(wav.mean(), torch.tensor(0.3), atol=0.02, rtol=0)
    assert (wav - img).std() < (img - img.mean()).std()


def test_cli_folder_reports_bad_files_and_restores_the_rest(run_dir: Path, photo_dir: Path, tmp_path: Path,
                                                            tiny_models: dict[str, Path], capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(photo_dir, "astronaut.png", (64, 64))).save(src / "a.png")
    Image.fromarray(photo(photo_dir, "chelsea.png", (80, 48))).save(src / "b.jpg", quality=90)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (src / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(run_dir), "--input", str(src), "--out", str(out), "--steps", "2",
               "--caption-model", str(tiny_models["llava"]), "--caption-max-tokens", "8", "--color-fix", "adain"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "empty.jpg" in err and "empty file" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    with Image.open(out / "b.png") as im:
        assert im.size == (320, 192)
        meta = json.loads(im.text["sspir"])
        assert im.text["prompt"] and meta["prompt_source"] == "caption"
        assert meta["steps"] == 2 and meta["color_fix"] == "adain" and meta["step"] == 7

    rc = main(["--checkpoint", str(run_dir / "checkpoints" / "step-00000007"), "--input", str(src / "a.png"),
               "--out", str(out), "--steps", "1", "--prompt", "a portrait, sharp and clean"])
    assert rc == 0
    with Image.open(out / "a.png") as im:
        assert im.size == (256, 256) and im.text["prompt"] == "a portrait, sharp and clean"
        assert json.loads(im.text["sspir"])["prompt_source"] == "user"


def test_cli_refuses_bad_setup(run_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--prompt", "p"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--prompt", "p", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["--checkpoint", str(run_dir), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--sd", str(tmp_path / "moved-sd")]) == 2  # before any captioning
    assert "moved-sd" in capsys.readouterr().err


def test_bf16_networks_keep_the_diffusion_state_in_fp32(paper_run: Path, lq64: np.ndarray) -> None:
    """Paper layout. With the frozen parts in bf16 (autocast, as on a GPU), the latents every
    step starts from and the guided noise the scheduler steps with are float32, and the
    result stays close to the fp32 restoration."""
    half = Restorer(paper_run, device="cpu", dtype="bf16")
    assert half.model.unet.dtype == torch.bfloat16
    dtypes: list[torch.dtype] = []
    preds: list[torch.dtype] = []
    hook = half.model.register_forward_hook(lambda mod, args, out: preds.append(out[0].dtype))
    try:
        res = half.restore(lq64, "an astronaut", RestoreSettings(steps=3, tile=0),
                           on_step=lambda i, t, z: dtypes.append(z.dtype))
    finally:
        hook.remove()
    assert dtypes == [torch.float32] * 3
    assert preds and set(preds) == {torch.bfloat16}  # the networks did run in bf16
    from model.inference.sampling import uncond_like, whole_image

    lq, lq_up = lq_tensors(lq64, "cpu")
    text = half.embed("an astronaut")[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eps = whole_image(half.model, text, uncond_like(half.empty, text), lq, lq_up, 7.5)(
            torch.randn(1, 4, 32, 32), torch.tensor(999))
    assert eps.dtype == torch.float32
    full = Restorer(paper_run, device="cpu").restore(lq64, "an astronaut", RestoreSettings(steps=3, tile=0))
    assert np.abs(res.image.astype(int) - full.image).mean() < 8
