"""Continuing an interrupted run: the random state saved in a checkpoint, and which checkpoint to continue."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medtriage.errors import ConfigError, DataNotFoundError, MedTriageError
from medtriage.io.safe_output import copy_atomic
from medtriage.model.checkpoint import BEST, LAST, read_checkpoint
from medtriage.training.report import METRICS_FILE, run_folder

log = logging.getLogger(__name__)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
    if "cuda" in state and torch.cuda.is_available():  # a resume may run on fewer GPUs than the run saved: one each
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _run_dir(checkpoint: Path) -> Path:
    """The run folder of `checkpoint`: <run>/checkpoints/last.pt, or a checkpoint given directly in <run>/."""
    return run_folder(checkpoint.parent)


def _finished(checkpoint: Path) -> bool:
    return (_run_dir(checkpoint) / METRICS_FILE).is_file()


def _refuse_finished(checkpoint: Path) -> None:
    """A finished run has nothing left to train: continuing it would only reopen its MLflow run and log it again. (A
    last.pt copied out of its run folder is told by its MLflow run's status: `_passed_over` by automatic resume, refused
    when named by `tracking.check_destination`.)"""
    if _finished(checkpoint):
        raise ConfigError(
            "trainer.resume_from names a run that finished",
            where=checkpoint,
            hint="resume an interrupted run instead, or start a new run without trainer.resume",
        )


def _refuse_behind_last(checkpoint: Path, contents: dict) -> None:
    """A checkpoint of an earlier epoch than the last.pt beside it (best.pt) would rewind its run: the epochs after it
    trained again, their metrics dropped, as its MLflow run holds those steps already (`tracking.log_metrics`). An
    unreadable last.pt tells nothing: that checkpoint may be all that is left."""
    last = checkpoint.with_name(LAST)
    if checkpoint.name == LAST or not last.is_file():
        return
    try:
        latest = read_checkpoint(last, mapped=True).get("epoch")
    except MedTriageError:
        return
    if isinstance(latest, int) and latest > contents["epoch"]:
        raise ConfigError(
            f"the checkpoint holds epoch {contents['epoch']}, and the last.pt beside it epoch {latest}: continuing it "
            "would train those epochs again, in an MLflow run that keeps the metrics they were first logged with",
            where=checkpoint,
            hint=f"continue the run with trainer.resume_from={last}, or start a new run without trainer.resume",
        )


def catch_up_best(checkpoint: Path, contents: dict) -> None:
    """best.pt is copied from last.pt after an epoch that improved: a run stopped between the two holds its best epoch
    in last.pt alone, and would end with an older best.pt. Copied here, unless best.pt was written after last.pt. Only
    while the run folder is held (`job.claim_checkpoints`): its holder clears the folder's temporary files, and would
    delete a copy in progress of a second resume of the run started meanwhile."""
    if not contents.get("epoch") or contents.get("best_epoch") != contents["epoch"]:
        return
    best = checkpoint.with_name(BEST)
    if best.is_file() and best.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        return
    copy_atomic(checkpoint, best)


# What TrainingLoop.checkpoint writes and a resume reads (`train_model`, `ema_updates` and `world_size` are optional).
RESUME_KEYS = (
    "model",
    "config",
    "epoch",
    "global_step",
    "best_val_auc",
    "best_epoch",
    "epochs_since_best",
    "optimizer",
    "scheduler",
    "rng",
    "mlflow_run_id",
)


def _training_checkpoint(path: Path) -> dict:
    """The contents of `path`, refused unless it holds what training state a resume continues: a model's weights alone
    (an exported or hand-saved file) have no optimiser, schedule or epoch to continue from. Its tensors are mapped, not
    read: the checkpoints a resume looks at are read whole only once one is chosen."""
    contents = read_checkpoint(path, mapped=True)
    missing = [key for key in RESUME_KEYS if key not in contents] if isinstance(contents, dict) else list(RESUME_KEYS)
    if missing:
        raise ConfigError(
            f"not a training checkpoint to resume: it lacks {', '.join(missing)}",
            where=path,
            hint="set trainer.resume_from to a run folder or the last.pt that scripts/train.py wrote, "
            "or start a new run without trainer.resume",
        )
    return contents


def _found_checkpoint(path: Path, experiment_dir: Path) -> dict:
    """`_training_checkpoint` of a last.pt that automatic resume found. A damaged one stops the resume (continuing an
    other run instead would pass for continuing this one), saying what may still continue it."""
    try:
        return _training_checkpoint(path)
    except MedTriageError as err:
        best = path.with_name(BEST)
        from_best = f"continue the run from its best.pt with trainer.resume_from={best}; " if best.is_file() else ""
        raise ConfigError(
            f"the last.pt of an unfinished run cannot be resumed: {err.reason}",
            where=path,
            hint=f"{from_best}to resume another run instead, move this run's folder out of {experiment_dir}; "
            "or start a new run without trainer.resume",
        ) from err


def _candidates(resume_from: str | None, runs_dir: str | Path, experiment: str) -> tuple[list[Path], str]:
    """The checkpoints a resume looks at, in the order it tries them, and where it looked (for a message)."""
    if resume_from:
        given = Path(resume_from)
        return ([given, given / "checkpoints" / LAST, given / LAST] if given.is_dir() else [given]), str(given)
    experiment_dir = Path(runs_dir) / experiment
    unfinished = [p for p in experiment_dir.glob(f"**/checkpoints/{LAST}") if not _finished(p)]
    looked = f"{experiment_dir}/**/checkpoints/{LAST} of a run without {METRICS_FILE}"
    return sorted(unfinished, key=lambda p: p.stat().st_mtime, reverse=True), looked


def _passed_over(path: Path, contents: dict, run_finished: Callable[[str], bool] | None) -> str | None:
    """Why automatic resume passes `path` over, or None: its MLflow run finished (a last.pt copied out of the run's
    folder, whose metrics.json stayed behind), and resuming it would reopen that run."""
    run_id = contents["mlflow_run_id"]
    if run_finished is None or not run_finished(run_id):
        return None
    why = f"{path}, whose MLflow run {run_id} finished"
    log.warning("trainer.resume passes over %s: a finished run is never resumed", why)
    return why


def find_resume_checkpoint(
    resume_from: str | None,
    runs_dir: str | Path,
    experiment: str,
    fits: Callable[[dict, Path], None] | None = None,
    run_finished: Callable[[str], bool] | None = None,
) -> tuple[Path, dict]:
    """(path, mapped contents) of the checkpoint to continue: trainer.resume_from, else the last.pt of this
    experiment's newest unfinished run that `fits` accepts (a finished run has nothing left to train: continuing it
    would re-open it, not the interrupted one; an unfinished run of other settings, another seed of a SLURM array say,
    is another run's). `run_finished(mlflow_run_id)` tells a last.pt of a finished run from its MLflow run: passed over
    with a warning (trainer.resume_from naming one is refused by `tracking.check_destination`). `fits(contents, path)`
    raises ConfigError for a checkpoint this run may not continue; when none fits, the newest one's refusal is raised.
    The contents are mapped: read the chosen checkpoint whole to continue it (last.pt is replaced every epoch of the
    resumed run), and bring its best.pt up to date (`catch_up_best`) once its folder is held."""
    candidates, looked = _candidates(resume_from, runs_dir, experiment)
    refusals, passed_over = [], []
    for path in filter(Path.is_file, candidates):
        _refuse_finished(path)
        contents = _training_checkpoint(path) if resume_from else _found_checkpoint(path, Path(runs_dir) / experiment)
        _refuse_behind_last(path, contents)
        why = None if resume_from else _passed_over(path, contents, run_finished)
        if why:
            passed_over.append(why)
            continue
        try:
            if fits:
                fits(contents, path)
        except ConfigError as refused:
            if resume_from:
                raise
            refusals.append(refused)
            continue
        return path, contents
    if refusals:
        raise refusals[0]
    if resume_from:
        raise _nothing_named(Path(resume_from))
    raise DataNotFoundError(
        "trainer.resume=true but no unfinished run has a checkpoint to resume"
        + (f"; passed over {'; '.join(passed_over)}: a finished run is never resumed" if passed_over else ""),
        where=looked,
        hint="start a new run without trainer.resume, or set trainer.resume_from=<run folder or last.pt>",
    )


def _nothing_named(given: Path) -> DataNotFoundError:
    """trainer.resume_from naming no checkpoint: a path that is not there (mistyped), or a folder without last.pt. Said
    as such: "no unfinished run", automatic resume's answer, would send the user looking for the wrong thing."""
    if not given.exists():
        return DataNotFoundError(
            "trainer.resume_from names no file or folder",
            where=given,
            hint=f"give a run folder (<paths.runs_dir>/<name>/<date>_<time>) or its checkpoints/{LAST}; "
            "trainer.resume=true alone continues the newest unfinished run of the experiment",
        )
    return DataNotFoundError(
        f"trainer.resume_from names a folder without checkpoints/{LAST}: not a run folder, or a run stopped before "
        "its first epoch was checkpointed (nothing to resume)",
        where=given,
        hint="give a run folder that holds it, or start the run again without trainer.resume_from",
    )


def clear_earlier_run(ckpt_dir: Path) -> None:
    """Make `ckpt_dir` a new run's (a fixed paths.output_dir or hydra.run.dir used again). An earlier run's checkpoints
    that it may still continue are refused: the new run would write over them. A finished run's go, with its
    metrics.json (checkpoints first, so that a kill between leaves no checkpoint marked finished): overwritten anyway,
    and the metrics.json left beside the new run's would mark it finished, so that once interrupted it could not be
    resumed."""
    earlier, metrics = ckpt_dir / LAST, run_folder(ckpt_dir) / METRICS_FILE
    if earlier.is_file():
        try:
            run_id = read_checkpoint(earlier, mapped=True).get("mlflow_run_id") or "unknown"
        except MedTriageError:
            run_id = "unknown (its checkpoint is unreadable)"
        if not metrics.is_file():
            raise ConfigError(
                f"the checkpoint folder holds the checkpoints of an earlier run that did not finish (MLflow run {run_id}): "
                "a new run would write over them",
                where=ckpt_dir,
                hint=f"continue that run with trainer.resume_from={earlier}, or give this run a folder of its own "
                "(paths.output_dir or hydra.run.dir); delete the folder only if its checkpoints are no longer wanted",
            )
        log.warning("%s held the checkpoints of the finished run %s: this run replaces them", ckpt_dir, run_id)
    for stale in (earlier, ckpt_dir / BEST, metrics):
        stale.unlink(missing_ok=True)
