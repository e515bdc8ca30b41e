"""The software a shard was made with, recorded in every sidecar.

Bit-exact reruns are promised for the same stack, so a sidecar says which stack that was.
The versions are a record, not part of what makes a shard current: upgrading NumPy must not
silently rebuild 330K pairs. A stage whose algorithm changes bumps its own `version`
instead (pipeline.core.stage.Stage.version), and that does redo its shards.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Sequence

import pipeline


def software_versions(packages: Sequence[str] = ()) -> dict[str, str]:
    """This project's and Python's versions, plus each named distribution's (or "absent")."""
    out = {"ssp_ir": pipeline.__version__, "python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
