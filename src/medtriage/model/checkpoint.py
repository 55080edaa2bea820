"""Checkpoints on disk: `last.pt` every epoch and `best.pt` by validation AUC, and the model rebuilt from one.

A checkpoint is a plain dict that `torch.load(weights_only=True)` accepts:
model, config (fully resolved, plain types), epoch, best_val_auc, epochs_since_best, optimizer,
scheduler, rng (torch / numpy / python states), mlflow_run_id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medtriage.errors import DataNotFoundError, PackageError
from medtriage.model.networks import PreprocessSpec, TriageNet, build_triage_net

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path: Path, **fields) -> Path:
    """Write atomically: an interruption mid-write never leaves a truncated last.pt behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    torch.save(fields, partial)
    partial.replace(path)
    return path


def final_checkpoint(ckpt_dir: str | Path, weights: str = "best") -> Path:
    """The checkpoint a finished run ends with (`trainer.weights`): `last.pt` for "last", else `best.pt`
    (or `last.pt` when no epoch was ever best, e.g. a run without validation AUC)."""
    ckpt_dir = Path(ckpt_dir)
    if getattr(weights, "value", weights) == "last" or not (ckpt_dir / BEST).is_file():
        return ckpt_dir / LAST
    return ckpt_dir / BEST


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError("checkpoint not found", where=path, hint="train first: python scripts/train.py ...")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise PackageError(f"not a readable checkpoint ({err.__class__.__name__}: {err})", where=path) from err


def model_from_config(config: dict) -> TriageNet:
    """Build the (untrained) network a resolved training config describes."""
    model = config["model"]
    spec = PreprocessSpec(
        **{k: model["preprocess"][k] for k in ("size", "in_channels", "mean", "std")},
        intensity=model["preprocess"].get("intensity", "fixed"),
    )  # checkpoints from before the option
    return build_triage_net(model["name"], len(config["data"]["label_names"]), spec, model["stem_stride"])


def load_model(path: str | Path) -> tuple[TriageNet, dict]:
    """(model in eval mode with the checkpoint's weights, the run's resolved config)."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["config"]
    model = model_from_config(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config
