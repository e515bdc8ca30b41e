"""safetensors files whose bytes depend only on their tensors and metadata.

The safetensors library writes its JSON header from a hash map, so the same tensors and
metadata come out with the keys in a different order from one process to the next (seen
with safetensors 0.8: four runs, four sha256s). A build promises the same bytes for the same
inputs, so the header is rewritten with sorted keys; tensor offsets are relative to the
data section and do not move. The file is still written and read by the library.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np


def save_canonical(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.numpy.save` with the header's keys sorted (and padded to 8 bytes as the format asks)."""
    from safetensors.numpy import save

    blob = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header: dict[str, Any] = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]
