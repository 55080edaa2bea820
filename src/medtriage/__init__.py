"""MedTriage: multi-site imaging triage, trained with MONAI and served from ONNX without PyTorch."""

__version__ = "0.1.0"
