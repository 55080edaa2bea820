"""Checkpoints on disk: `last.pt` every epoch and `best.pt` by validation AUC, and the model rebuilt from one.

A checkpoint is a plain dict that `torch.load(weights_only=True)` accepts:
model, config (fully resolved, plain types), epoch, best_val_auc, epochs_since_best, optimizer,
scheduler, rng (torch / numpy / python states), mlflow_run_id.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from medtriage.errors import DataNotFoundError, PackageError
from medtriage.io.safe_output import write_atomic
from medtriage.model.networks import PreprocessSpec, TriageNet, build_triage_net

LAST, BEST = "last.pt", "best.pt"
ARCHITECTURE_KEYS = "model.name, model.stem_stride, model.preprocess.in_channels and data.label_names"
CONFIG_KEYS = (
    "model.name",
    "model.stem_stride",
    *(f"model.preprocess.{k}" for k in ("size", "in_channels", "mean", "std")),
    "data.label_names",
)


def save_checkpoint(path: Path, **fields) -> Path:
    """Write atomically and durably (`write_atomic`): an interruption or a power loss mid-write never leaves a
    truncated last.pt behind, and a failed save leaves no temporary file next to it."""
    return write_atomic(path, lambda file: torch.save(fields, file))


def final_checkpoint(ckpt_dir: str | Path, weights: str = "best") -> Path:
    """The checkpoint a finished run ends with (`trainer.weights`): `last.pt` for "last", else `best.pt`
    (or `last.pt` when no epoch was ever best, e.g. a run without validation AUC)."""
    ckpt_dir = Path(ckpt_dir)
    if getattr(weights, "value", weights) == "last" or not (ckpt_dir / BEST).is_file():
        return ckpt_dir / LAST
    return ckpt_dir / BEST


def read_checkpoint(path: str | Path, mapped: bool = False) -> dict:
    """The checkpoint at `path`, on the CPU. `mapped`: its tensors are mapped from the file rather than read, so what
    only looks at its settings and epoch costs no read of its weights (a file of torch's format before 1.6, which
    cannot be mapped, is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError("checkpoint not found", where=path, hint="train first: python scripts/train.py ...")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped and zipfile.is_zipfile(path))
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise PackageError(
            f"not a readable checkpoint ({err.__class__.__name__}: {err})",
            where=path,
            hint="a checkpoint cut short (a full disk, a copy interrupted) or not written by training: copy it again, "
            "or use the run's other checkpoint (best.pt or last.pt)",
        ) from err


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
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise PackageError(
            f"not a training checkpoint: it needs 'model' and 'config', has {found}",
            where=path,
            hint="give the best.pt or last.pt that scripts/train.py wrote",
        )
    config = checkpoint["config"]
    if missing := missing_config_keys(config):
        raise PackageError(
            f"the checkpoint's config lacks {', '.join(missing)}: the network cannot be rebuilt from it",
            where=path,
            hint="export a checkpoint written by scripts/train.py (its config is the run's, fully resolved)",
        )
    model = model_from_config(config)
    if mismatch := weight_mismatch(model, checkpoint["model"]):
        raise PackageError(
            f"the weights do not fit the network its config describes ({mismatch})",
            where=path,
            hint=f"the checkpoint's {ARCHITECTURE_KEYS} must be those its weights were trained with",
        )
    model.load_state_dict(checkpoint["model"])  # strict: every weight present and used
    return model.eval(), config


def missing_config_keys(config) -> list[str]:
    """Which of the keys model_from_config builds the network from `config` lacks (dotted)."""
    absent = object()  # a key set to None is present
    return [key for key in CONFIG_KEYS if config_value(config, key, default=absent) is absent]


def config_value(config, dotted: str, default=None):
    """The value at `dotted` ('data.pool_dir') in a plain-dict config (a checkpoint's, resolved); `default` where a key
    on the way is missing or holds no group."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def weight_mismatch(model: torch.nn.Module, weights: dict) -> str:
    """How `weights` differ from `model`'s own in names and shapes (an example of each), or "" when they fit."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    resized = [name for name in expected if name in weights and tuple(weights[name].shape) != tuple(expected[name].shape)]
    parts = [f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []
    parts += [f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"] if unexpected else []
    if resized:
        name = resized[0]
        shapes = f"{list(weights[name].shape)} in the checkpoint, {list(expected[name].shape)} in the network"
        parts.append(f"{len(resized)} of another shape, e.g. {name}: {shapes}")
    return "; ".join(parts)
