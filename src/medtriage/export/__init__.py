"""The bridge from torch to ONNX: a trained network -> calibrated ONNX graph -> model package (and its MLflow record).

Kept empty on purpose: the `medtriage` command imports torch-free modules of this package
(e.g. quantisation), which must not pull in torch through the package itself. The entry points
are `medtriage.export.run.export_model` / `export_run`.
"""
