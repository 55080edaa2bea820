"""`python scripts/cross_validate.py experiment=... [key=value ...] [cv.folds=3 cv.jobs=2]` (or `medtriage-cv`).

Cross-validates one training config (medtriage.workflows.cross_validation) and returns its mean held-out
log-loss after a cross-fitted temperature, so Hydra sweepers can minimise it: `-m hparams_search=pneumoniamnist_optuna` runs an Optuna search
whose every trial is a child MLflow run of the sweep, with one grandchild run per fold.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from medtriage.cli import exit_interrupted, exit_with_message, hydra_command
from medtriage.cli.train import check_data_paths, check_sweep_direction, own_run_folder
from medtriage.config import CONFIG_DIR_NAME, TrainConfig, find_project_root
from medtriage.errors import MedTriageError
from medtriage.io.header_warnings import say_header_warnings
from medtriage.training.refused_runs import removed_when_refused
from medtriage.workflows.cross_validation import cross_validate

CONFIG_DIR = str(Path(find_project_root()) / CONFIG_DIR_NAME)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def job(cfg: TrainConfig) -> float:
    overrides = list(HydraConfig.get().overrides.task)  # this job's, the sweeper's choices included
    try:
        with removed_when_refused(own_run_folder()):  # refused before any fold started: its folder holds no fold<k>/
            check_sweep_direction("the mean held-out log-loss after temperature", "minimize")
            say_header_warnings()  # pydicom's, once per file and naming it, while the pool is built
            check_data_paths(cfg)
            return cross_validate(overrides, Path(cfg.paths.output_dir), cfg).score
    except MedTriageError as err:
        exit_with_message(err)
    except KeyboardInterrupt:
        exit_interrupted()


main = hydra_command(job)  # Hydra's own failures (a misspelt key or option, an unwritable run folder) in one line too


if __name__ == "__main__":
    main()
