#!/usr/bin/env python
"""Build the tiny random models the demo and the tests use, into .cache/tiny/.

They are real transformers/diffusers classes at toy sizes, saved with save_pretrained
and loaded through from_pretrained exactly as the full-size weights are, so every stage
runs its real code path on a CPU without downloading anything. They restore nothing
useful: random weights caption and encode noise.

  .cache/tiny/llava/   LlavaForConditionalGeneration + processor (tokenizer trained here)
  .cache/tiny/blip/    BlipForConditionalGeneration + processor (Table III's BLIP-caption row)
  .cache/tiny/sd15/    SD1.5-shaped folder: tokenizer/ (the real CLIP BPE), text_encoder/, unet/,
                       vae/, scheduler/ and image_encoder/ (a timm CLIP ViT shaped like ViT-L/14)

Builds are deterministic (same bytes every time), so rebuilding is always safe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_fixtures.tiny_blip import build_tiny_blip  # noqa: E402
from demo_fixtures.tiny_llava import build_tiny_llava  # noqa: E402
from demo_fixtures.tiny_sd import build_tiny_sd  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/tiny", help="folder to build into")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name, build in (("llava", build_tiny_llava), ("blip", build_tiny_blip), ("sd15", build_tiny_sd)):
        target = out / name
        build(target)
        print(f"built {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
