"""Hydra-configured training engine, metrics and MLflow tracking."""
