"""The bridge from torch to ONNX: calibration, operating points, export and the model package.

Names are imported on first use: the training config imports `ExportConfig` at every start,
and loading onnx/onnxscript there would cost seconds.
"""

from importlib import import_module

_EXPORTS = {
    "ExportConfig": "medtriage.export.config",
    "ExportResult": "medtriage.export.run",
    "SplitScores": "medtriage.export.run",
    "export_model": "medtriage.export.run",
    "export_run": "medtriage.export.run",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medtriage.export' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)
