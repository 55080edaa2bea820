"""Train a model as configured in configs/ (Hydra): `python scripts/train.py experiment=pneumonia_sites`."""

import hydra

import medtriage.training
from medtriage.config import TrainConfig


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: TrainConfig) -> float:
    result = medtriage.training.run(cfg)  # all logic lives in src/
    return result.best_val_auc  # lets Hydra sweepers optimise it


if __name__ == "__main__":
    main()
