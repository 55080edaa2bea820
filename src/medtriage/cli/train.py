"""`python scripts/train.py experiment=pneumonia_sites` (or `medtriage-train ...`): train, then export, as configs/ say."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import ListConfig

from medtriage.arguments import refuse_file_as_folder
from medtriage.cli import exit_interrupted, exit_with_message, hydra_command
from medtriage.config import CONFIG_DIR_NAME, TrainConfig, find_project_root
from medtriage.errors import ConfigError, MedTriageError
from medtriage.io.header_warnings import say_header_warnings
from medtriage.training.refused_runs import removed_when_refused
from medtriage.workflows.train_and_export import train_and_export

CONFIG_DIR = str(Path(find_project_root()) / CONFIG_DIR_NAME)
DATA_PATH_EXAMPLES = {
    "pool_dir": "data/pool/pneumonia_sites",
    "sites_dir": "data/pool/ingested",
    "npz_path": "data/samples/pneumoniamnist_28.npz",
}


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def job(cfg: TrainConfig) -> float:
    try:
        with removed_when_refused(own_run_folder()):  # a refusal before training leaves no folder behind
            check_sweep_direction("the best validation AUC", "maximize")
            say_header_warnings()  # pydicom's, once per file and naming it, while the pool is built
            check_data_paths(cfg)
            return train_and_export(cfg).best_val_auc  # lets Hydra sweepers optimise it
    except MedTriageError as err:
        exit_with_message(err)
    except KeyboardInterrupt:
        exit_interrupted()


main = hydra_command(job)  # Hydra's own failures (a misspelt key or option, an unwritable run folder) in one line too


def own_run_folder() -> Path | None:
    """The folder Hydra made for this single run, which a refusal before training may remove (training.refused_runs);
    None when it is not this process's to remove: a folder the command line named (hydra.run.dir: a cross-validation's
    fold, whose log the cross-validation reads, or a SLURM job's), a multirun's job folder, beside the sweep's other
    jobs, or the folder of torchrun's other ranks, which rank 0 shares."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.RUN or os.environ.get("RANK", "0") != "0":
        return None
    if any(override.lstrip("+~").startswith("hydra.run.dir=") for override in hydra.overrides.hydra):
        return None
    return Path(hydra.runtime.output_dir)


def check_sweep_direction(returned: str, better: str) -> None:
    """Refuse a sweeper set to optimise what the command returns the wrong way (`hparams_search=pneumoniamnist_optuna`
    minimises, for scripts/cross_validate.py's log-loss): under scripts/train.py it would search for the worst model."""
    direction = HydraConfig.get().sweeper.get("direction")  # None: the basic sweeper optimises nothing
    directions = list(direction) if isinstance(direction, ListConfig) else [] if direction is None else [direction]
    names = [getattr(d, "name", str(d)).lower() for d in directions]  # an enum in Optuna's defaults, text in a file
    if any(name != better for name in names):
        other = "scripts/cross_validate.py" if better == "maximize" else "scripts/train.py"
        raise ConfigError(
            f"the sweeper would {', '.join(names)} what this command returns, {returned} "
            f"({'higher' if better == 'maximize' else 'lower'} is better): the search would head for the worst config",
            where="hydra.sweeper.direction",
            hint=f"run this search with {other}, or set hydra.sweeper.direction={better}",
        )


def check_data_paths(cfg: TrainConfig) -> None:
    """Refuse, before the pool is built, an empty data path (it would mean the folder the command runs in: the pool
    would be written there, or that folder read as the sites) and a pool folder that is a file."""
    for key, example in DATA_PATH_EXAMPLES.items():
        value = cfg.data.get(key)
        if value is not None and not str(value).strip():
            raise ConfigError("is empty", where=f"data.{key}", hint=f"give a path, e.g. data.{key}={example}, or leave the override out")
    refuse_file_as_folder(cfg.data.pool_dir, "data.pool_dir")


if __name__ == "__main__":
    main()
