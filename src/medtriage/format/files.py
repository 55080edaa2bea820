"""What a model package folder holds, and the digest that ties model.json to model.onnx."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medtriage.errors import PackageError

ONNX_FILE, META_FILE, CARD_FILE = "model.onnx", "model.json", "MODEL_CARD.md"
# An exported model.json takes kilobytes (its largest part, drift references, a few per training site); this bound
# leaves room for thousands of sites and still keeps a wrong file from being read into memory whole.
MAX_META_BYTES = 16 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def meta_bytes(path: Path, hint: str = "copy the package folder again from where it came from, or export it again") -> bytes:
    """model.json's bytes, read only when they fit MAX_META_BYTES: a folder copied from a share or a stick may hold
    any file under that name, and it would be read whole into memory. `hint`: what to do about one that does not."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = b"" if size > MAX_META_BYTES else file.read(MAX_META_BYTES + 1)  # +1: one grown since fstat shows it
    size = max(size, len(data))
    if size > MAX_META_BYTES:
        raise PackageError(
            f"model.json is {size} bytes, more than the {MAX_META_BYTES} a package's metadata may take (an exported one "
            "takes kilobytes): it is not this package's model.json; refusing to read it",
            where=path,
            hint=hint,
        )
    return data
