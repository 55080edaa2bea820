"""The model-package contract shared by export (writer) and serve (reader): file names, digest, schema."""

from medtriage.format.files import CARD_FILE, MAX_META_BYTES, META_FILE, ONNX_FILE, meta_bytes, sha256_file
from medtriage.format.schema import INPUT_AXES, SCHEMA_VERSION, schema_errors, temperature_applied, validate_model_json

__all__ = [
    "CARD_FILE",
    "INPUT_AXES",
    "MAX_META_BYTES",
    "META_FILE",
    "ONNX_FILE",
    "SCHEMA_VERSION",
    "meta_bytes",
    "schema_errors",
    "sha256_file",
    "temperature_applied",
    "validate_model_json",
]
