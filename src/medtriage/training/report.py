"""End of a run: evaluate the final checkpoint (best or last, `trainer.weights`) on validation and test, log plots and artifacts, print a table."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from medtriage.errors import MedTriageError
from medtriage.evaluation.calibration import cross_fittable, cross_fitted_log_loss
from medtriage.evaluation.metrics import evaluate, roc_points, site_values, softmax
from medtriage.evaluation.plots import plot_roc, plot_site_auc
from medtriage.io.safe_output import write_atomic
from medtriage.model.checkpoint import BEST, LAST, final_checkpoint, read_checkpoint
from medtriage.training import distributed, tracking

log = logging.getLogger(__name__)

COLUMNS = ("auc", "acc", "sens", "spec", "n")
METRICS_FILE = "metrics.json"  # in the run folder, next to checkpoints/; written only when the run ends
UPLOADED = "logged to the MLflow run's artifacts"  # what `_writing` says of an upload that failed


class FinalOutputError(MedTriageError):
    """An output of the run's final step (a plot, metrics.json, their copy into the MLflow run) could not be written:
    a full disk, a folder made read-only. Every epoch is checkpointed by then."""


def final_metrics(fit, state, ckpt_dir: Path) -> tuple[dict[str, float], dict]:
    """The final checkpoint's val/test metrics (overall and per site) and predictions, on every rank, with the epoch
    whose weights they are of (`final_epoch`)."""
    distributed.barrier(fit.ranks)  # checkpoints are written by rank 0
    final = final_checkpoint(ckpt_dir, fit.trainer.weights)
    checkpoint = read_checkpoint(final)
    fit.eval_model.load_state_dict(checkpoint["model"])  # the EMA weights when EMA is on
    predictions = {split: fit.predict(split) for split in ("val", "test") if split in fit.splits}  # no test in a CV fold
    validated = "val" in fit.splits  # not in a refit: no epoch was chosen
    metrics: dict[str, float] = {"best_val_auc": state.best_val_auc, "best_epoch": float(state.best_epoch)} if validated else {}
    metrics["final_epoch"] = float(checkpoint.get("epoch", state.epoch if final.name == LAST else state.best_epoch))
    if validated and fit.ranks.is_main:
        _warn_best_weights_lost(fit.trainer.weights, final, state.best_epoch, int(metrics["final_epoch"]))
    for split, p in predictions.items():
        metrics.update(evaluate(p.logits, p.labels, p.sites, split))
    if "val" in predictions and cross_fittable(predictions["val"].labels):
        # What validation log-loss is left once the export's temperature is applied (fitted on other validation cases):
        # the cross-validation's selection score. Never on test: test fits nothing.
        metrics["val/calibrated_log_loss"] = cross_fitted_log_loss(predictions["val"].logits, predictions["val"].labels)
    return metrics, predictions


def _warn_best_weights_lost(weights, final: Path, best_epoch: int, final_epoch: int) -> None:
    """trainer.weights=best, but best.pt is not there to end with (a last.pt resumed without the best.pt beside it):
    the run ends with last.pt, and its best epoch, still reported, is not the epoch of the weights it keeps."""
    if getattr(weights, "value", weights) == "last" or final.name != LAST or best_epoch in (0, final_epoch):
        return
    log.warning(
        f"the weights of best epoch {best_epoch} were not kept: no {BEST} in {final.parent} (a run resumed from a {LAST} "
        f"without the {BEST} beside it); the run ends with {final}, the weights of epoch {final_epoch}, and its "
        "validation and test metrics are theirs"
    )


def selection_name(metrics: dict[str, float]) -> str:
    """What the best epoch was chosen by, as told to people: validation accuracy where AUC is undefined (one class)."""
    return "val AUC" if "val/auc" in metrics else "val accuracy"


def log_final(
    metrics: dict[str, float], predictions: dict, state, ckpt_dir: Path, name: str, log_checkpoint: bool, weights: str = "best"
) -> None:
    """Test metrics, plots (titled `name`), when `log_checkpoint` the final checkpoint, and metrics.json into the
    active MLflow run. metrics.json in the run folder marks the run finished, so it comes last, after its upload: a run
    stopped before it (Ctrl-C, a tracking server gone, a full disk: `FinalOutputError`) is resumable."""
    folder = run_folder(ckpt_dir)
    final = final_checkpoint(ckpt_dir, weights)
    final_epoch = state.epoch if final.name == LAST else state.best_epoch  # the epoch whose weights were tested
    tracking.log_metrics({k: v for k, v in metrics.items() if k.startswith("test/")}, step=final_epoch)
    if "best_epoch" in metrics:  # not in a refit, which chose no epoch
        tracking.log_metrics({"best_epoch": state.best_epoch}, step=0)  # once, though a resumed run reaches here again
    for path in _plots(predictions, metrics, folder / "plots", name, final.stem, ckpt_dir):
        with _writing(path, ckpt_dir, UPLOADED):
            mlflow.log_artifact(str(path), "plots")
    if log_checkpoint:
        with _writing(final, ckpt_dir, UPLOADED):
            mlflow.log_artifact(str(final), "checkpoints")
    text = json.dumps(metrics, indent=2, sort_keys=True)
    with _writing(folder / METRICS_FILE, ckpt_dir, UPLOADED):
        mlflow.log_text(text, METRICS_FILE)
    with _writing(folder / METRICS_FILE, ckpt_dir):
        write_atomic(folder / METRICS_FILE, text.encode())


@contextmanager
def _writing(path: Path, ckpt_dir: Path, done: str = "written") -> Iterator[None]:
    """An OSError of the block (a full disk: mostly without a file name) as one message naming `path`. No metrics.json
    is written yet, so the run stays resumable, and its resume finds every epoch done: it trains none again."""
    try:
        yield
    except OSError as err:
        elsewhere = f": {err.filename}" if err.filename and Path(err.filename) != path else ""  # in the artifact store
        raise FinalOutputError(
            f"the run's final step stopped: this output could not be {done} ({err.strerror or err}{elsewhere})",
            where=path,
            hint=f"free space or make the folder writable; every epoch's checkpoint is kept in {ckpt_dir}: "
            "continue the run with trainer.resume=true, which trains no epoch again and repeats only the final step "
            "(evaluation, plots, metrics.json)",
        ) from err


def run_folder(ckpt_dir: Path) -> Path:
    """The run folder of a checkpoint folder: `<run>` of `<run>/checkpoints`, or `<run>` itself when the resumed
    checkpoint was given there directly."""
    return ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir


def _plots(predictions, metrics: dict[str, float], folder: Path, name: str, checkpoint: str, ckpt_dir: Path) -> list[Path]:
    curves = {}
    for split, p in predictions.items():
        points = roc_points(p.labels, softmax(p.logits))
        if points is not None:
            curves[split] = (*points, metrics[f"{split}/auc"])
    paths = []
    if curves:
        with _writing(folder / "roc.png", ckpt_dir):
            paths.append(plot_roc(curves, folder / "roc.png", f"{name}: ROC ({checkpoint} checkpoint)"))
    per_site = {split: site_values(metrics, split) for split in predictions}
    if any(per_site.values()):
        with _writing(folder / "site_auc.png", ckpt_dir):
            paths.append(plot_site_auc(per_site, folder / "site_auc.png", f"{name}: AUC per site"))
    return paths


def summary_table(metrics: dict[str, float], sites: list[str]) -> str:
    """Validation and test metrics, overall and per site, as aligned text."""
    lines = [f"{'split':<6}{'site':<22}" + "".join(f"{c:>8}" for c in COLUMNS)]
    for split in ("val", "test"):
        for site, prefix in [("overall", split)] + [(s, f"{split}/site/{s}") for s in sites]:
            values = [metrics.get(f"{prefix}/{c}") for c in COLUMNS]
            if all(v is None for v in values):
                continue
            lines.append(f"{split:<6}{site:<22}" + "".join(_cell(c, v) for c, v in zip(COLUMNS, values)))
    return "\n".join(lines)


def _cell(column: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>8}"
    return f"{int(value):>8d}" if column == "n" else f"{value:>8.3f}"


def _held_epoch(metrics: dict[str, float]) -> str:
    """What the summary adds where the final checkpoint is not of the best epoch (trainer.weights=last, or best.pt
    lost): the epoch whose weights it holds."""
    held = metrics.get("final_epoch")
    return "" if held is None or int(held) == int(metrics["best_epoch"]) else f", which holds the weights of epoch {int(held)}"


def print_summary(result, uri: str, sites: list[str]) -> None:
    table = summary_table(result.metrics, sites)
    if "\n" in table:  # a refit has no split to score
        print(table)
    if "best_epoch" in result.metrics:
        score = selection_name(result.metrics)  # accuracy where the validation split holds one class
        best = f"best epoch {int(result.metrics['best_epoch'])}, best {score} {result.best_val_auc:.4f}"
        print(f"{best}; checkpoint {result.checkpoint}{_held_epoch(result.metrics)}")
    else:
        print(f"no validation split; final checkpoint {result.checkpoint}")
    if result.package:
        print(f"model package: {result.package}")
    print(f"MLflow run {result.run_id}; open with `{tracking.ui_command(uri)}`")
