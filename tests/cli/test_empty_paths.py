"""An empty file or folder argument (an unset shell variable: `--into "$POOL"`) is refused by every command line.

Before, an empty path meant the folder the command ran in, or, where the code asked `if args.option`, no option at
all: `medtriage ingest SRC --into ""` pooled the site into the current folder (and its quarantine beside it),
`ingest ""` ingested the current folder, `serve --state ""` and `listen --state ""` wrote their state there,
`serve --token-file ""` served with no token and `--tls-cert "" --tls-key ""` plain HTTP, `quantize --out ""` wrote
to the default folder and `score --sr ""` wrote no SR, each without a word."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtriage.cli import main
from medtriage.cli.ingest_sites import main as ingest_sites_main
from medtriage.data.simulate.sites import make_sites
from tests.cli.test_argument_bounds import refused_command_line

NPZ = Path(__file__).resolve().parents[2] / "data" / "samples" / "pneumoniamnist_28.npz"
INGEST = ["ingest", "SRC", "--site", "a", "--into", "POOL"]

# (command line, the argument argparse names in its refusal)
EMPTY = [
    (["ingest", "", "--site", "a", "--into", "POOL"], "SRC"),
    (["ingest", "SRC", "--site", "a", "--into", ""], "--into"),
    (["ingest", "SRC", "--site", "a", "--into", " "], "--into"),
    ([*INGEST, "--secret-file", ""], "--secret-file"),
    ([*INGEST, "--quarantine", ""], "--quarantine"),
    (["score", "", "a.dcm"], "package"),
    (["score", "PKG", "a.dcm", ""], "paths"),
    (["score", "PKG", "--npz", ""], "--npz"),
    (["score", "PKG", "a.dcm", "--sr", ""], "--sr"),
    (["score", "PKG", "a.svs", "--heatmaps", ""], "--heatmaps"),
    (["score", "PKG", "a.dcm", "--overlays", ""], "--overlays"),
    (["serve", ""], "package"),
    (["serve", "PKG", "--token-file", ""], "--token-file"),
    (["serve", "PKG", "--tls-cert", "", "--tls-key", "key.pem"], "--tls-cert"),
    (["serve", "PKG", "--tls-cert", "cert.pem", "--tls-key", ""], "--tls-key"),
    (["serve", "PKG", "--state", ""], "--state"),
    (["listen", "", "--state", "STATE"], "package"),
    (["listen", "PKG", "--state", ""], "--state"),
    (["listen", "PKG", "--state", "STATE", "--tls-cert", ""], "--tls-cert"),
    (["listen", "PKG", "--state", "STATE", "--tls-key", ""], "--tls-key"),
    (["bundle", "", "--out", "BUNDLE"], "PACKAGE"),
    (["bundle", "PKG", "--out", ""], "--out"),
    (["bundle", "PKG", "--out", "BUNDLE", "--wheel", ""], "--wheel"),
    (["quantize", "", "--calibration", "x.npz"], "package"),
    (["quantize", "PKG", "--calibration", ""], "--calibration"),
    (["quantize", "PKG", "--calibration", "x.npz", "--out", ""], "--out"),
]

EMPTY_INGEST_SITES = [(["--sites", ""], "--sites"), (["--into", ""], "--into"), (["--keys", ""], "--keys")]


@pytest.mark.parametrize("argv,argument", EMPTY, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_medtriage_command_refuses_an_empty_path(argv, argument, tmp_path, monkeypatch, capsys):
    err = refused_command_line(main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argument}: expected a path, got an empty one (it would mean the current folder)" in err


@pytest.mark.parametrize("argv,argument", EMPTY_INGEST_SITES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_ingest_sites_refuses_an_empty_path(argv, argument, tmp_path, monkeypatch, capsys):
    err = refused_command_line(ingest_sites_main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argument}: expected a path, got an empty one" in err


@pytest.fixture
def site_and_key(tmp_path) -> tuple[Path, Path]:
    make_sites(NPZ, tmp_path / "sites", limit=6)
    key = tmp_path / "keys" / "site.key"
    key.parent.mkdir()
    key.write_text("0" * 64 + "\n")
    key.chmod(0o600)
    return tmp_path / "sites" / "northgate", key


def test_an_ingest_into_an_empty_pool_path_writes_nothing_where_it_runs(site_and_key, tmp_path, monkeypatch, capsys):
    """The case the refusal is for: before, exit 0, the site's pseudonymised images in ./a and its originals that
    could not be pooled in ../<this folder>-quarantine."""
    site, key = site_and_key
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", str(site), "--site", "a", "--into", "", "--secret-file", str(key)])
    assert exit_info.value.code == 2
    assert list(here.iterdir()) == [] and not (tmp_path / "here-quarantine").exists()
    assert "argument --into: expected a path" in capsys.readouterr().err
