"""The data commands' default folders are the project's, as training's `paths` group names them, from any cwd."""

from __future__ import annotations

from pathlib import Path

from medtriage.cli import build_parser
from medtriage.cli.ingest_sites import build_parser as ingest_sites_parser


def _project_with_subfolder(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path.resolve()
    (root / "configs").mkdir()
    (root / "configs" / "train.yaml").write_text("defaults: []\n")
    subfolder = root / "notebooks" / "pool"
    subfolder.mkdir(parents=True)
    monkeypatch.delenv("MEDTRIAGE_ROOT", raising=False)
    monkeypatch.chdir(subfolder)
    return root


def test_make_sites_and_build_pool_default_to_the_project_data_folder(tmp_path, monkeypatch):
    root = _project_with_subfolder(tmp_path, monkeypatch)
    made = build_parser().parse_args(["make-sites"])
    assert (made.npz, made.out) == (root / "data/samples/pneumoniamnist_28.npz", root / "data/sites")
    pooled = build_parser().parse_args(["build-pool"])
    assert (pooled.sites, pooled.pool) == (root / "data/pool/ingested", root / "data/pool/pneumonia_sites")


def test_ingest_sites_defaults_to_the_project_data_folder(tmp_path, monkeypatch):
    root = _project_with_subfolder(tmp_path, monkeypatch)
    args = ingest_sites_parser().parse_args([])
    assert (Path(args.sites), Path(args.into)) == (root / "data/sites", root / "data/pool/ingested")
