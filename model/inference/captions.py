"""Prompts for restoration from the caption stage's own engines (LLaVA), as the build captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from model.inference.images import RestoreSetupError, read_lq


def caption_inputs(paths: Sequence[Path], engine: Any, batch_size: int,
                   read: Callable[[Path], np.ndarray] = read_lq) -> Iterator[tuple[Path, str | None, str | None]]:
    """(path, caption or None, error or None) for each readable input, in batches, with the
    images of one batch in memory at a time. Unreadable inputs yield (path, None, reason)."""
    from PIL import Image

    from pipeline.core.image_io import SourceError

    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for p in paths[start:start + batch_size]:
            try:
                batch.append((p, Image.fromarray(read(p))))
            except SourceError as e:
                yield p, None, f"unreadable: {e.reason}"
        results = engine.caption([im for _, im in batch]) if batch else []
        for (p, _), res in zip(batch, results):
            yield p, res.caption, res.error


def make_caption_engine(name: str, model: str | None, server: str | None, max_tokens: int | None) -> Any:
    """The caption stage's engine with the manifest-free defaults (CaptionConfig())."""
    from pipeline.caption.config import CaptionConfig
    from pipeline.caption.engines import EngineError, make_engine

    fields: dict[str, Any] = {"engine": name}
    for key, value in (("model", model), ("server", server), ("max_tokens", max_tokens)):
        if value is not None:
            fields[key] = value
    try:
        return make_engine(CaptionConfig(**fields))
    except (EngineError, ValueError) as e:
        raise RestoreSetupError(f"caption engine {name!r}: {e}; or pass --prompt") from None
