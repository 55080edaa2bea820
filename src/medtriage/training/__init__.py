"""Hydra-configured training engine, metrics and MLflow tracking.

`run(cfg) -> RunResult` trains one model as the config says; `checkpoint.load_model(path)` and
`predict.predict(model, manifest, split)` rebuild and apply a trained model (used by export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medtriage.training.engine import RunResult


def run(cfg) -> "RunResult":
    """Train one model as `cfg` (the composed `configs/train.yaml`) says; see medtriage.training.engine."""
    from medtriage.training.engine import run as run_engine

    return run_engine(cfg)


def __getattr__(name: str):
    if name == "RunResult":
        from medtriage.training.engine import RunResult

        return RunResult
    raise AttributeError(name)
