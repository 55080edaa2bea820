"""Checkpoints: `last.pt` every epoch and `best.pt` by validation AUC, and the model rebuilt from one.

A checkpoint is a plain dict that `torch.load(weights_only=True)` accepts:
model, config (fully resolved, plain types), epoch, best_val_auc, epochs_since_best, optimizer,
scheduler, rng (torch / numpy / python states), mlflow_run_id.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from medtriage.errors import DataNotFoundError, PackageError
from medtriage.networks import PreprocessSpec, TriageNet, build_triage_net

LAST, BEST = "last.pt", "best.pt"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(path: Path, **fields) -> Path:
    """Write atomically: an interruption mid-write never leaves a truncated last.pt behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    torch.save(fields, partial)
    partial.replace(path)
    return path


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
    spec = PreprocessSpec(**{k: model["preprocess"][k] for k in ("size", "in_channels", "mean", "std")},
                          intensity=model["preprocess"].get("intensity", "fixed"))  # checkpoints from before the option
    return build_triage_net(model["name"], len(config["data"]["label_names"]), spec, model["stem_stride"])


def load_model(path: str | Path) -> tuple[TriageNet, dict]:
    """(model in eval mode with the checkpoint's weights, the run's resolved config)."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["config"]
    model = model_from_config(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config


def find_resume_checkpoint(cfg) -> tuple[Path, dict]:
    """(path, contents) of the checkpoint to continue: trainer.resume_from, else this experiment's newest last.pt."""
    if cfg.trainer.resume_from:
        given = Path(cfg.trainer.resume_from)
        candidates = [given, given / "checkpoints" / LAST, given / LAST] if given.is_dir() else [given]
        looked = str(given)
    else:
        experiment_dir = Path(cfg.paths.runs_dir) / cfg.name
        candidates = sorted(experiment_dir.glob(f"**/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime, reverse=True)
        looked = f"{experiment_dir}/**/checkpoints/{LAST}"
    for path in candidates:
        if path.is_file():
            return path, read_checkpoint(path)
    raise DataNotFoundError(
        "trainer.resume=true but there is no checkpoint to resume", where=looked,
        hint="start a new run without trainer.resume, or set trainer.resume_from=<run folder or last.pt>",
    )
