"""Export a finished MLflow run: fetch its best checkpoint, reuse the config inside it, call export_run.

`python scripts/export.py run_id=<id> [export.name=... export.threshold_rule=youden ...]`
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from medtriage.errors import ConfigError, DataNotFoundError, MedTriageError

CHECKPOINT_PREFERENCE = ("best.pt", "last.pt")


def find_checkpoint(run_id: str, download_dir: Path) -> Path:
    """Download the run's best checkpoint artifact (else its last one)."""
    import mlflow

    client = mlflow.MlflowClient()
    paths = _artifact_paths(client, run_id)
    for wanted in CHECKPOINT_PREFERENCE:
        match = [p for p in paths if p.rsplit("/", 1)[-1] == wanted]
        if match:
            return Path(client.download_artifacts(run_id, match[0], str(download_dir)))
    raise DataNotFoundError(f"MLflow run {run_id} has no checkpoint artifact ({' or '.join(CHECKPOINT_PREFERENCE)})",
                            hint="export from a run that finished training, or pass a checkpoint to medtriage.export.export_run")


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def export_from_mlflow(run_id: str, overrides: list[str] = ()) -> Path:
    """Export run `run_id` with the config its checkpoint carries, plus `key=value` overrides."""
    from omegaconf import OmegaConf

    from medtriage.export.run import export_run
    from medtriage.training.checkpoint import read_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = find_checkpoint(run_id, Path(tmp))
        config = OmegaConf.create(read_checkpoint(checkpoint)["config"])
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        return export_run(run_id=run_id, checkpoint=checkpoint, cfg=config)


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """`run_id=<id>` plus dotted overrides, Hydra style."""
    bad = [a for a in argv if "=" not in a]
    run_ids = [a.split("=", 1)[1] for a in argv if a.startswith("run_id=")]
    if bad or len(run_ids) != 1 or not run_ids[0]:
        raise ConfigError(f"expected run_id=<mlflow run id> [key=value ...], got {' '.join(argv) or 'nothing'}",
                          hint="find run ids with `mlflow ui` or mlflow.search_runs()")
    return run_ids[0], [a for a in argv if not a.startswith("run_id=")]


def main(argv: list[str] | None = None) -> int:
    try:
        run_id, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        export_from_mlflow(run_id, overrides)
    except MedTriageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
