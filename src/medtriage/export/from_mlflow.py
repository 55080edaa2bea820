"""Export a finished MLflow run: fetch its best checkpoint, rebuild its network and export it with the config inside
it, as export_run does after a training (`python scripts/export.py run_id=<id> ...`, medtriage.cli.export)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medtriage.errors import ConfigError
from medtriage.export.registry import find_checkpoint
from medtriage.export.run import export_net
from medtriage.model.checkpoint import load_model

# What a re-export of a trained run reads of its overrides: the export's settings and the pool that scores the model
# (export.run.export_net); the run's model, training and other data settings are its checkpoint's.
RUN_EXPORT_KEYS = ("export.*", "data.pool_dir")


def export_from_mlflow(run_id: str, overrides: Sequence[str] = ()) -> Path:
    """Export run `run_id` with the config its checkpoint carries, plus `key=value` overrides of RUN_EXPORT_KEYS."""
    changes = reexport_changes(overrides, RUN_EXPORT_KEYS)  # a mistyped override answers before anything is downloaded
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


def reexport_changes(overrides: Sequence[str], read: Sequence[str], options: Mapping[str, tuple[str, str]] | None = None) -> DictConfig:
    """`parse_overrides(overrides)`, each override refused by name when the re-export would not read its key: merged
    into a trained run's config, `model.name=densenet121` or `trainer.max_epochs=3` would change nothing exported.
    `read`: the keys the command reads (`group.*` for a whole group); `options`: key -> (option, its value) for keys
    that the command's options set instead (export.name: --name), refused when they say otherwise than the option."""
    changes = parse_overrides(overrides)
    for override in overrides:
        key, value = override.split("=", 1)
        if options and key in options:
            option, given = options[key]
            if value != given:
                raise ConfigError(
                    f"this command takes it from {option}, which is {given!r}: the override would be read by nothing",
                    where=override,
                    hint=f"give {option} {value} instead of the override",
                )
        elif not any(key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1])) for pattern in read):
            raise ConfigError(
                f"a trained run is exported with its own config: of the overrides, only {', '.join(read)} apply",
                where=override,
                hint="drop it; train a new run to change the model, training or data (a leading + or ~ is not taken either)",
            )
    return changes
