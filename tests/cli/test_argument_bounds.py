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
    # an empty path (an unset shell variable) would mean the current folder: before, the pool was written here
    ["build-pool", "--sites", "SITES", "--pool", ""],
    ["build-pool", "--sites", ""],
    ["make-sites", "--limit", "1", "--out", " "],
    ["audit", "POOL", "--json", ""],
]

BAD_TILES = [
    ["synthetic", "POOL", "--tile-size", "0"],
    ["synthetic", "POOL", "--tile-size", "-5"],
    ["synthetic", "POOL", "--tile-size", "100000"],  # before: a traceback, after asking for 149 GiB for one tile
    ["slides", "POOL", "a.svs", "--tile-size", "4097"],
    ["synthetic", "POOL", "--tiles-per-slide", "0"],
    ["synthetic", "POOL", "--patients-per-site", "-1"],
    ["slides", "POOL", "a.svs", "--tile-mpp", "0"],
    ["slides", "POOL", "a.svs", "--split", "bogus"],
    ["slides", "POOL", "a.svs", "--label", "7"],
    ["sites-figure", "OUT.png", "--tiles", "0"],
    ["slides", "POOL", "a.svs", "--overview", ""],
]


def refused_command_line(run, argv, tmp_path, monkeypatch, capsys) -> str:
    """What `run(argv)` printed on refusing its command line (exit 2), having written nothing in the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused command line"
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_the_medtriage_command_refuses_values_out_of_range(argv, tmp_path, monkeypatch, capsys):
    err = refused_command_line(main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argv[-2]}" in err and "expected" in err


@pytest.mark.parametrize("argv", [["audit", ""], ["make-sites", "--limit", "1", "--npz", ""]], ids=" ".join)
def test_an_empty_input_path_is_refused_by_name(argv, tmp_path, monkeypatch, capsys):
    err = refused_command_line(main, argv, tmp_path, monkeypatch, capsys)
    assert "expected a path, got an empty one" in err


@pytest.mark.parametrize("argv", [["synthetic", ""], ["slides", "", "a.svs"], ["sites-figure", ""]], ids=" ".join)
def test_make_tiles_refuses_an_empty_path(argv, tmp_path, monkeypatch, capsys):
    err = refused_command_line(make_tiles_main, argv, tmp_path, monkeypatch, capsys)
    assert "expected a path, got an empty one" in err


@pytest.mark.parametrize("argv", BAD_TILES, ids=" ".join)
def test_make_tiles_refuses_values_out_of_range(argv, tmp_path, monkeypatch, capsys):
    err = refused_command_line(make_tiles_main, argv, tmp_path, monkeypatch, capsys)
    assert f"argument {argv[-2]}" in err


@pytest.mark.parametrize("text,expected", [("0", 0.0), ("0.15", 0.15), ("0.999", 0.999)])
def test_a_fraction_takes_zero_up_to_one(text, expected):
    from medtriage.arguments import fraction

    assert fraction(text) == expected


@pytest.mark.parametrize("text", ["²", "5²", "1e3", "+3", " 3", "", "0x10"])
@pytest.mark.parametrize("name", ["positive_int", "non_negative_int", "a range"])
def test_a_whole_number_that_is_not_plain_digits_is_refused_with_what_was_expected(name, text):
    import argparse

    from medtriage import arguments

    parse = arguments.whole_number(0, 143) if name == "a range" else getattr(arguments, name)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number"):
        parse(text)  # before, "²" raised ValueError: argparse said "invalid positive_int value", no range


def test_the_command_line_says_what_it_expected_of_a_superscript(tmp_path, monkeypatch, capsys):
    err = refused_command_line(main, ["make-sites", "--limit", "²"], tmp_path, monkeypatch, capsys)
    assert "expected a whole number of at least 1" in err
