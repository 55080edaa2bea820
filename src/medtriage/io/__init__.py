"""Numpy-only input/output: DICOM decoding, de-identification, whole-slide reading.

Never imports torch, monai, mlflow or hydra: the inference side installs without them.
"""
