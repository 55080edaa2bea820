"""The model-package contract shared by export (writer) and serve (reader): file names, digest, schema."""

from medtriage.format.files import CARD_FILE, META_FILE, ONNX_FILE, sha256_file
from medtriage.format.schema import INPUT_AXES, SCHEMA_VERSION, schema_errors, temperature_applied, validate_model_json

__all__ = [
    "CARD_FILE",
    "INPUT_AXES",
    "META_FILE",
    "ONNX_FILE",
    "SCHEMA_VERSION",
    "schema_errors",
    "sha256_file",
    "temperature_applied",
    "validate_model_json",
]
