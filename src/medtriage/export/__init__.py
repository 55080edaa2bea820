"""The bridge from torch to ONNX: calibration, operating points, export and the model package."""

from medtriage.export.config import ExportConfig
from medtriage.export.run import ExportResult, SplitScores, export_model, export_run

__all__ = ["ExportConfig", "ExportResult", "SplitScores", "export_model", "export_run"]
