"""Export a finished MLflow run: fetch its best checkpoint, reuse the config inside it, call export_run
(`python scripts/export.py run_id=<id> ...`, medtriage.cli.export)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from medtriage.export.registry import find_checkpoint
from medtriage.export.run import export_run
from medtriage.model.checkpoint import read_checkpoint


def export_from_mlflow(run_id: str, overrides: list[str] = ()) -> Path:
    """Export run `run_id` with the config its checkpoint carries, plus `key=value` overrides."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = find_checkpoint(run_id, Path(tmp))
        config = OmegaConf.create(read_checkpoint(checkpoint)["config"])
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        return export_run(run_id=run_id, checkpoint=checkpoint, cfg=config)
