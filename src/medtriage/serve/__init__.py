"""Torch-free inference: package loading, scoring CLI, HTTP service, DICOM SR, worklist."""
