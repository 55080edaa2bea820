"""`python scripts/train.py experiment=pneumonia_sites` (or `medtriage-train ...`): train, then export, as configs/ say."""

from __future__ import annotations

from pathlib import Path

import hydra

from medtriage.cli import exit_with_message
from medtriage.config import CONFIG_DIR_NAME, TrainConfig, find_project_root
from medtriage.errors import MedTriageError
from medtriage.workflows.train_and_export import train_and_export

CONFIG_DIR = str(Path(find_project_root()) / CONFIG_DIR_NAME)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: TrainConfig) -> float:
    try:
        return train_and_export(cfg).best_val_auc  # lets Hydra sweepers optimise it
    except MedTriageError as err:
        exit_with_message(err)


if __name__ == "__main__":
    main()
