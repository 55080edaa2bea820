"""The composed training config: schema registered with Hydra, `${project_root:}` resolver, compose without an app.

`configs/train.yaml` starts from the `train_schema` node, so every group file (data/, model/,
trainer/, ...) is merged onto the typed dataclasses of medtriage.config.schema. `compose_train_config`
gives the config `scripts/train.py` would get without `@hydra.main` (tests, notebooks, benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from medtriage.config.schema import TrainConfig
from medtriage.project import CONFIG_DIR_NAME, find_project_root


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", find_project_root)


def to_plain_dict(cfg: Any) -> dict:
    """Fully resolved config as plain Python types (enums as strings): what checkpoints store."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)


def compose_train_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `scripts/train.py` would get, composed without running a Hydra app.

    `paths.output_dir` points at Hydra's job folder; outside a Hydra app pass it as an override.
    """
    config_dir = Path(find_project_root()) / CONFIG_DIR_NAME
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=list(overrides or []))


register_configs()
