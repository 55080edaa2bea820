"""The bridge from torch to ONNX: export, calibration, operating points, the model package."""
