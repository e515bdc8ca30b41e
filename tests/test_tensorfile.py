"""Canonical safetensors: the same tensors and metadata give the same bytes in every process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from safetensors import safe_open

from conftest import ROOT

SCRIPT = """
import sys; sys.path.insert(0, {root!r})
import hashlib, numpy as np
from pipeline.core.tensorfile import save_canonical
meta = {{"model": "m", "config_hash": "h", "model_identity": "i", "hidden_size": "32", "prompt": ""}}
blob = save_canonical({{"hidden": np.arange(12, dtype=np.float16).reshape(3, 4), "b": np.ones(5, np.float32)}}, meta)
print(hashlib.sha256(blob).hexdigest())
"""


def test_bytes_do_not_depend_on_the_process_and_the_library_reads_them(tmp_path) -> None:
    digests = {subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], capture_output=True,
                              text=True, check=True).stdout.strip() for _ in range(4)}
    assert len(digests) == 1  # the plain library gives a different header order per process
    from pipeline.core.tensorfile import save_canonical

    path = tmp_path / "t.safetensors"
    meta = {"z": "1", "a": "2"}
    path.write_bytes(save_canonical({"x": np.arange(6, dtype=np.float16).reshape(2, 3)}, meta))
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # the header keeps the format's alignment
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == meta
        np.testing.assert_array_equal(f.get_tensor("x"), np.arange(6, dtype=np.float16).reshape(2, 3))
