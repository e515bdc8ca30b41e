#!/usr/bin/env python
"""Restore images with a trained SSP-IR checkpoint (×4).

  python model/restore.py --checkpoint RUN_OR_CKPT --input LQ.png|DIR --out DIR
        [--prompt TEXT | --caption-engine transformers|server|vllm --caption-model M]
        [--steps 50] [--guidance 7.5] [--seed 0] [--scheduler ddpm|dpm]
        [--tile 128] [--tile-overlap 32] [--color-fix none|adain|wavelet]
        [--sd PATH] [--image-encoder REF] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16|fp16]

Per LQ image: a caption from LLaVA through the caption engines (the stage's own code,
default engine `transformers`) unless --prompt overrides it (a checkpoint trained with
`text_prior` none gets the empty prompt and no captioner runs); the text becomes SD1.5 CLIP
chunks exactly as the embed stage makes them; sampling starts from the LQ latent noised to
t = 999 (LRE) and runs DDPM (or DPM-Solver++) with classifier-free guidance (the empty
prompt as the unconditional branch, structure and image priors on in both branches).

Inputs with a side above --tile (LQ pixels) run in overlapping tiles: the model sees one
tile at a time (LQ tile, its ×4 upsampled tile, the matching latent window) and the noise
predictions are blended in latent space with Gaussian weights at every step (as tiled
diffusion / MultiDiffusion); the VAE encodes and decodes in tiles too (diffusers'
`enable_tiling`, sized to the same tile). So activation memory is bounded by the tile; only
the image-sized buffers (LQ↑, latents, output) grow with the image.

Outputs are PNGs named after the inputs, with the prompt and the settings in PNG text
chunks (`prompt`, `sspir`). Exit status: 0 all restored; 1 some inputs failed (each named
on stderr, the others restored); 2 nothing could start (checkpoint, models, engine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402

from model.inference.captions import caption_inputs, make_caption_engine  # noqa: E402
from model.inference.colour import COLOR_FIXES  # noqa: E402
from model.inference.images import RestoreSetupError, list_inputs, output_names, read_lq, write_png  # noqa: E402
from model.inference.restorer import (RestoreSettings, Restorer, checkpoint_models,  # noqa: E402
                                      resolve_checkpoint)
from model.inference.scheduler import SCHEDULERS  # noqa: E402
from pipeline.core.image_io import IMAGE_SUFFIXES  # noqa: E402

# ------------------------------------------------------------------- CLI ---


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training run folder (newest "
                                                        "checkpoint)")
    ap.add_argument("--input", required=True, type=Path, help="an LQ image or a folder of them")
    ap.add_argument("--out", required=True, type=Path, help="output folder (PNG per input)")
    ap.add_argument("--prompt", help="use this text for every image instead of LLaVA captions")
    ap.add_argument("--caption-engine", default="transformers", choices=("transformers", "server", "vllm"))
    ap.add_argument("--caption-model", help="LLaVA folder or hub id (default: llava-hf/llava-1.5-7b-hf)")
    ap.add_argument("--caption-server", help="OpenAI-compatible base URL for --caption-engine server")
    ap.add_argument("--caption-max-tokens", type=int, help="caption length cap (default 256)")
    d = RestoreSettings()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale (1: off)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS,
                    help="ddpm (the paper's) or dpm (DPM-Solver++: fewer steps, e.g. 20)")
    ap.add_argument("--tile", type=int, default=d.tile, help="tile side in LQ pixels (0: never tile)")
    ap.add_argument("--tile-overlap", type=int, default=d.tile_overlap, help="tile overlap in LQ pixels")
    ap.add_argument("--color-fix", default=d.color_fix, choices=COLOR_FIXES)
    ap.add_argument("--sd", help="SD1.5 folder or hub id (default: the one the run trained on)")
    ap.add_argument("--image-encoder", help="CLIP image encoder (default: the one the run trained on)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="frozen parts' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> RestoreSettings:
    return RestoreSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler,
                           tile=args.tile, tile_overlap=args.tile_overlap, color_fix=args.color_fix)


def check_models_exist(args: argparse.Namespace) -> dict:
    """The checkpoint and the SD1.5 folder it needs are there (cheap: no weights read);
    returns what the checkpoint records (`checkpoint_models`)."""
    from model.networks.sspir import ModelLayoutError, resolve_sd

    recorded = checkpoint_models(resolve_checkpoint(args.checkpoint))
    sd = args.sd or recorded["pretrained"]
    if not sd:
        raise RestoreSetupError("the checkpoint records no SD1.5 model; pass --sd")
    try:
        resolve_sd(sd)
    except ModelLayoutError as e:
        raise RestoreSetupError(f"{e}; pass --sd if it moved") from None
    return recorded


def prompts_for(args: argparse.Namespace, inputs: Sequence[Path],
                failed: dict[Path, str], text_prior: str = "caption") -> dict[Path, tuple[str, str]]:
    """(prompt, source) per input: --prompt, or LLaVA's caption (engine closed afterwards,
    before SD1.5 loads, so the two never share a GPU). Unreadable inputs go to `failed`.
    A checkpoint trained with `text_prior` "none" gets the empty prompt, and no captioner runs."""
    if text_prior == "none":
        if args.prompt:
            print("note: the checkpoint was trained with text_prior none (the empty prompt for every image); "
                  "--prompt is ignored", file=sys.stderr)
        return {p: ("", "text_prior none") for p in inputs}
    if args.prompt is not None:
        return {p: (args.prompt, "user") for p in inputs}
    engine = make_caption_engine(args.caption_engine, args.caption_model, args.caption_server,
                                 args.caption_max_tokens)
    out: dict[Path, tuple[str, str]] = {}
    try:
        for path, caption, error in caption_inputs(inputs, engine, engine.cfg.batch_size):
            if caption is not None:
                out[path] = (caption, "caption")
            elif error.startswith("unreadable"):
                failed[path] = error
                print(f"error: {path}: {error}", file=sys.stderr)
            else:  # as the embed stage does with a failed caption: the empty prompt
                print(f"warning: {path}: caption failed ({error}); restoring with the empty prompt", file=sys.stderr)
                out[path] = ("", "caption-failed")
    finally:
        engine.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def restore_all(restorer: Restorer, inputs: Iterable[Path], prompts: dict[Path, tuple[str, str]],
                names: dict[Path, str], out: Path, settings: RestoreSettings, failed: dict[Path, str]) -> int:
    """Restore each input; a failure is named on stderr and the rest go on. Returns the count done."""
    from pipeline.core.image_io import SourceError

    done = 0
    for path in inputs:
        if path in failed:
            continue
        prompt, source = prompts[path]
        try:
            rgb = read_lq(path)
            result = restorer.restore(rgb, prompt, settings)
            target = write_png(out / names[path], result.image,
                               restorer.metadata(prompt, source, settings, path, rgb.shape[:2]))
        except SourceError as e:
            failed[path] = f"unreadable: {e.reason}"
        except (RuntimeError, ValueError, OSError) as e:  # e.g. out of memory on one huge input
            failed[path] = f"{type(e).__name__}: {e}"
        else:
            done += 1
            print(f"{path} -> {target} ({result.image.shape[1]}x{result.image.shape[0]}, {result.tiles} tile(s), "
                  f"{result.seconds:.1f} s)")
            continue
        print(f"error: {path}: {failed[path]}", file=sys.stderr)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    failed: dict[Path, str] = {}
    try:
        early = settings.problems(1)  # the tile multiple is checked once the model is loaded
        if early:
            raise RestoreSetupError("; ".join(early))
        inputs = list_inputs(args.input)
        if not inputs:
            raise RestoreSetupError(f"--input {args.input} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        recorded = check_models_exist(args)  # fail before minutes of captioning, not after
        prompts = prompts_for(args, inputs, failed, recorded["switches"].text_prior)
        restorer = Restorer(args.checkpoint, sd=args.sd, image_encoder=args.image_encoder, device=args.device,
                            dtype=args.dtype)
        restorer.check(settings)
    except RestoreSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = restore_all(restorer, inputs, prompts, output_names(inputs), args.out, settings, failed)
    print(f"restored {done} of {len(inputs)} image(s) into {args.out}" +
          (f"; {len(failed)} failed: {', '.join(str(p) for p in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
