"""What a model package folder holds, and the digest that ties model.json to model.onnx."""

from __future__ import annotations

import hashlib
from pathlib import Path

ONNX_FILE, META_FILE, CARD_FILE = "model.onnx", "model.json", "MODEL_CARD.md"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
