"""Counts, sizes, fractions and scales out of range are refused by the command line, before any work.

Before, `make-sites --limit -1` wrote every image but one, `make-tiles synthetic --tile-size 0` ended in a
traceback, `--tiles-per-slide 0` wrote an empty pool, and `serve --max-bytes -1` started a server refusing
every request."""

from __future__ import annotations

import pytest

from medtriage.cli import main
from medtriage.cli.make_tiles import main as make_tiles_main

BAD = [
    ["make-sites", "--limit", "-1"],
    ["make-sites", "--limit", "0"],
    ["build-pool", "--workers", "-1"],
    ["build-pool", "--val-fraction", "1.5"],
    ["build-pool", "--test-fraction", "-0.1"],
    ["build-pool", "--test-fraction", "nan"],
    ["audit", "POOL", "--max-distance", "-3"],
    ["score", "PKG", "--threads", "0"],
    ["score", "PKG", "--mpp", "0"],
    ["score", "PKG", "--mpp", "inf"],
    ["serve", "PKG", "--max-bytes", "-1"],
    ["serve", "PKG", "--queue", "-2"],
    ["quantize", "PKG", "--calibration", "x.npz", "--images", "0"],
    ["ingest", "SRC", "--site", "a", "--into", "POOL", "--workers", "0"],
]

BAD_TILES = [
    ["synthetic", "POOL", "--tile-size", "0"],
    ["synthetic", "POOL", "--tile-size", "-5"],
    ["synthetic", "POOL", "--tiles-per-slide", "0"],
    ["synthetic", "POOL", "--patients-per-site", "-1"],
    ["slides", "POOL", "a.svs", "--tile-mpp", "0"],
    ["slides", "POOL", "a.svs", "--split", "bogus"],
    ["slides", "POOL", "a.svs", "--label", "7"],
    ["sites-figure", "OUT.png", "--tiles", "0"],
]


def _refused(run, argv, tmp_path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused command line"
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_the_medtriage_command_refuses_values_out_of_range(argv, tmp_path, monkeypatch, capsys):
    err = _refused(main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argv[-2]}" in err and "expected" in err


@pytest.mark.parametrize("argv", BAD_TILES, ids=" ".join)
def test_make_tiles_refuses_values_out_of_range(argv, tmp_path, monkeypatch, capsys):
    err = _refused(make_tiles_main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argv[-2]}" in err


@pytest.mark.parametrize("text,expected", [("0", 0.0), ("0.15", 0.15), ("0.999", 0.999)])
def test_a_fraction_takes_zero_up_to_one(text, expected):
    from medtriage.arguments import fraction

    assert fraction(text) == expected
