#!/usr/bin/env python
"""Put the demo's inputs under .cache/demo/: the photographs bundled in scikit-image.

scikit-image's wheel carries a few real photographs in skimage/data/, so the demo needs
no download. Copying them (instead of pointing the manifest into site-packages) gives
the manifest a stable relative path on every machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEMO_PHOTOS = (
    "astronaut.png", "rocket.jpg", "hubble_deep_field.jpg",
    "retina.jpg", "motorcycle_left.png", "motorcycle_right.png", "ihc.png", "grass.png",
    "gravel.png", "brick.png", "color.png", "camera.png", "moon.png",
)
# Never trained on: the demo restores and scores these (manifests/demo_heldout.json).
HELDOUT_PHOTOS = ("coffee.png", "chelsea.png")


def copy_photos(dest: Path, names: tuple[str, ...] = DEMO_PHOTOS) -> list[Path]:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} is missing: reinstall scikit-image (pip install scikit-image)")
        target = dest / name
        if not target.exists() or target.stat().st_size != (src / name).stat().st_size:
            shutil.copyfile(src / name, target)
        out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=".cache/demo/photos", help="where to copy the training photographs")
    ap.add_argument("--heldout", default=".cache/demo/heldout", help="where to copy the held-out photographs")
    args = ap.parse_args(argv)
    photos = copy_photos(Path(args.photos))
    held = copy_photos(Path(args.heldout), HELDOUT_PHOTOS)
    print(f"{len(photos)} demo photographs in {args.photos}, {len(held)} held out in {args.heldout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
