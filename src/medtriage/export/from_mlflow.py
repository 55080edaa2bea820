"""Export a finished MLflow run: fetch its best checkpoint, rebuild its network and export it with the config inside
it, as export_run does after a training (`python scripts/export.py run_id=<id> ...`, medtriage.cli.export)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medtriage.errors import ConfigError
from medtriage.export.registry import find_checkpoint
from medtriage.export.run import export_net
from medtriage.model.checkpoint import load_model


def export_from_mlflow(run_id: str, overrides: Sequence[str] = ()) -> Path:
    """Export run `run_id` with the config its checkpoint carries, plus `key=value` overrides."""
    changes = parse_overrides(overrides)  # a mistyped override answers before anything is downloaded
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = find_checkpoint(run_id, Path(tmp))
        net, train_config = load_model(checkpoint)  # a checkpoint that is not a training's says so, by name
        config = OmegaConf.merge(OmegaConf.create(train_config), changes)
        return export_net(net, train_config, config, run_id)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides (Hydra's dotted form) as a config, each refused by name when it is not one."""
    changes = OmegaConf.create()
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not key or "" in key.split("."):
            raise ConfigError(f"{override!r} is not a key=value override", where=override, hint="write it as e.g. export.name=chest-r18")
        try:
            changes.merge_with_dotlist([override])  # one at a time, as OmegaConf.from_dotlist does, to name the bad one
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"cannot read the override: {str(err).splitlines()[0]}", where=override, hint="quote or fix its value"
            ) from None
    return changes
