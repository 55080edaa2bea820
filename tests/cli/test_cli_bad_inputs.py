"""Command lines given what a new user gets wrong: a file where a folder goes (and the other way round), an empty folder,
a value out of range. Each ends with one `error:` line naming the option or path, exit status 2 and no traceback,
before any work and with nothing written.

Before, each of these ended in a Python traceback (exit status 1), ran for minutes, or wrote into the wrong place."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from medtriage.cli import main
from medtriage.cli.data import build_pool_main, make_sites_main
from medtriage.data.simulate.sites import make_sites

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"


def check_clean_failure(code, capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "\nerror: " in "\n" + err and "Traceback" not in err
    assert all(fragment in err for fragment in fragments), err
    return err


def refused_by_argparse(run, argv, capsys, *fragments) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(fragment in err for fragment in fragments), err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a file ü.txt"
    path.write_text("not a folder\n")
    return path


@pytest.fixture
def sites(tmp_path) -> Path:
    make_sites(NPZ, tmp_path / "sites", limit=6)
    return tmp_path / "sites"


# --- seeds and counts out of range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run,argv,option",
    [
        (make_sites_main, ["--seed", "-1", "--limit", "2"], "--seed"),
        (build_pool_main, ["--seed", "-1"], "--seed"),
        (main, ["audit", "POOL", "--max-distance", "144"], "--max-distance"),
        (main, ["score", "PKG", "a.dcm", "--threads", "100000"], "--threads"),
        (main, ["serve", "PKG", "--threads", "99999999"], "--threads"),
        (main, ["serve", "PKG", "--port", "-1"], "--port"),
        (main, ["serve", "PKG", "--port", "70000"], "--port"),
        (main, ["listen", "PKG", "--state", "S", "--dicomweb", "http://pacs/dicom-web", "--study-timeout", "nan"], "--study-timeout"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_values_out_of_range_are_refused_by_the_command_line(run, argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused_by_argparse(run, argv, capsys, f"argument {option}")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_hash_distance_and_thread_count_are_taken():
    from medtriage.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["audit", "POOL", "--max-distance", "143"]).max_distance == 143
    assert parser.parse_args(["score", "PKG", "--threads", "1024"]).threads == 1024
    assert parser.parse_args(["serve", "PKG", "--port", "65535"]).port == 65535


def test_listen_refuses_a_retry_wait_that_is_not_a_number(tmp_path, capsys):
    argv = ["listen", str(tmp_path / "pkg"), "--state", str(tmp_path / "state"), "--dicomweb", "http://pacs/dicom-web"]
    check_clean_failure(main([*argv, "--retry-max", "nan"]), capsys, "--retry-max", "nan")
    assert not (tmp_path / "state").exists()


# --- make-sites and build-pool -------------------------------------------------------------------------------


def test_make_sites_into_a_file_says_so_and_leaves_it(a_file, capsys):
    code = make_sites_main(["--npz", str(NPZ), "--out", str(a_file), "--limit", "2"])
    check_clean_failure(code, capsys, "--out", str(a_file), "not a folder")
    assert a_file.read_text() == "not a folder\n"


def test_build_pool_into_a_file_says_so_before_decoding(sites, a_file, capsys):
    code = build_pool_main(["--sites", str(sites), "--pool", str(a_file), "--workers", "1"])
    err = check_clean_failure(code, capsys, "--pool", str(a_file), "not a folder")
    assert "decoded" not in err and a_file.read_text() == "not a folder\n"


def test_build_pool_with_fractions_that_leave_no_training_set_stops_before_writing(sites, tmp_path, capsys):
    argv = ["--sites", str(sites), "--pool", str(tmp_path / "pool"), "--workers", "1"]
    code = build_pool_main([*argv, "--val-fraction", "0.6", "--test-fraction", "0.5"])
    check_clean_failure(code, capsys, "--val-fraction", "--test-fraction")
    assert not (tmp_path / "pool").exists()  # before: its half-written pixel files stayed behind


# --- audit ---------------------------------------------------------------------------------------------------


def test_audit_json_into_a_folder_says_so(two_site_pool, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    code = main(["audit", str(two_site_pool.pool_dir), "--no-images", "--json", str(folder)])
    check_clean_failure(code, capsys, "--json", str(folder), "not a file")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(".*partial"))


# --- ingest --------------------------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "keys" / "site.key"
    path.parent.mkdir()
    path.write_text("0" * 64 + "\n")
    path.chmod(0o600)
    return path


def test_ingest_into_a_pool_that_is_a_file_says_so(sites, secret, a_file, capsys):
    code = main(["ingest", str(sites / "st_marys"), "--site", "st_marys", "--into", str(a_file), "--secret-file", str(secret)])
    check_clean_failure(code, capsys, str(a_file), "pool folder", "not a folder")


def test_ingest_with_a_quarantine_that_is_a_file_stops_before_pooling(sites, secret, a_file, tmp_path, capsys):
    pool = tmp_path / "pool"
    argv = ["ingest", str(sites / "st_marys"), "--site", "st_marys", "--into", str(pool), "--secret-file", str(secret)]
    check_clean_failure(main([*argv, "--quarantine", str(a_file)]), capsys, str(a_file), "quarantine", "not a folder")
    assert not pool.exists()  # before: half the files pooled, then a traceback


def test_ingest_of_an_empty_folder_says_there_is_nothing_to_ingest(secret, tmp_path, capsys):
    empty, pool = tmp_path / "export", tmp_path / "pool"
    empty.mkdir()
    code = main(["ingest", str(empty), "--site", "site_a", "--into", str(pool), "--secret-file", str(secret)])
    check_clean_failure(code, capsys, str(empty), "no files to ingest")
    assert not pool.exists()  # before: exit status 0, "in 0 = pooled 0", an empty site in the pool


def test_ingest_sites_script_exits_with_status_2(tmp_path, capsys):
    from medtriage.cli.ingest_sites import main as ingest_sites_main

    code = ingest_sites_main(["--sites", str(tmp_path / "no_sites"), "--into", str(tmp_path / "pool")])
    check_clean_failure(code, capsys, "no_sites")  # before: status 1, unlike every other command


# --- score, serve, listen: output folders that are files, before the model loads --------------------------------


@pytest.mark.parametrize("option", ["--sr", "--overlays", "--heatmaps"])
def test_score_into_an_output_folder_that_is_a_file_says_so(option, a_file, tmp_path, capsys):
    code = main(["score", str(tmp_path / "pkg"), str(a_file), option, str(a_file)])
    check_clean_failure(code, capsys, option, str(a_file), "not a folder")


def test_serve_with_a_state_folder_that_is_a_file_says_so(a_file, tmp_path, capsys):
    check_clean_failure(main(["serve", str(tmp_path / "pkg"), "--state", str(a_file)]), capsys, "--state", str(a_file), "not a folder")


def test_listen_with_a_state_folder_that_is_a_file_says_so(a_file, tmp_path, capsys):
    code = main(["listen", str(tmp_path / "pkg"), "--state", str(a_file), "--dicomweb", "http://pacs/dicom-web"])
    check_clean_failure(code, capsys, "--state", str(a_file), "not a folder")


# --- quantize ------------------------------------------------------------------------------------------------


def test_quantize_out_that_is_a_file_is_refused_before_any_work(a_file, tmp_path, capsys):
    code = main(["quantize", str(tmp_path / "pkg"), "--calibration", str(NPZ), "--out", str(a_file)])
    check_clean_failure(code, capsys, "--out", str(a_file))


def test_a_calibration_file_that_is_no_npz_is_named_as_such(a_file):
    from medtriage.errors import InputError
    from medtriage.export.quantize import calibration_images

    with pytest.raises(InputError, match=r"not an \.npz") as error:
        calibration_images(a_file, channels=1)
    assert error.value.where == str(a_file)  # before: "calibration images not found", of a file that is there


# --- make_tiles ----------------------------------------------------------------------------------------------


@pytest.fixture
def make_tiles_main():
    pytest.importorskip("torch")
    from medtriage.cli.make_tiles import main as run

    return run


def test_make_tiles_into_a_pool_that_is_a_file_says_so(make_tiles_main, a_file, capsys):
    code = make_tiles_main(["synthetic", str(a_file), "--patients-per-site", "1", "--tiles-per-slide", "1"])
    check_clean_failure(code, capsys, str(a_file), "not a folder")


def test_make_tiles_figure_onto_a_folder_says_so(make_tiles_main, tmp_path, capsys):
    check_clean_failure(make_tiles_main(["sites-figure", str(tmp_path), "--tiles", "1"]), capsys, str(tmp_path), "not a file")


def test_make_tiles_of_slides_none_readable_is_an_error_not_an_empty_pool(make_tiles_main, a_file, tmp_path, capsys):
    code = make_tiles_main(["slides", str(tmp_path / "pool"), str(a_file)])
    check_clean_failure(code, capsys, "no tile", "rejects.csv")


def test_make_tiles_refuses_a_negative_seed(make_tiles_main, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused_by_argparse(make_tiles_main, ["synthetic", "POOL", "--seed", "-1"], capsys, "argument --seed")


# --- train.py and cross_validate.py: data paths, before the pool is built ---------------------------------------


def run_hydra_main(module: str, overrides: list[str], tmp_path, monkeypatch) -> int:
    pytest.importorskip("torch")
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [module, *overrides, f"hydra.run.dir={tmp_path}/hydra", f"paths.runs_dir={tmp_path}/runs"])
    with root_logging_kept(), pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main()
    return exit_info.value.code


@contextmanager
def root_logging_kept():
    """Hydra's main sets the root logger's handlers up for its job, on this test's captured stderr: they go when it
    returns, or every later test's log line would be written to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("module", ["medtriage.cli.train", "medtriage.cli.cross_validate"])
def test_an_empty_pool_path_is_refused_not_read_as_the_current_folder(module, sites, tmp_path, monkeypatch, capsys):
    overrides = ["experiment=pneumonia_sites", f"data.sites_dir={sites}", "data.pool_dir=", "data.pool_seed=-1"]
    code = run_hydra_main(module, overrides, tmp_path, monkeypatch)
    check_clean_failure(code, capsys, "data.pool_dir", "empty")
    assert sorted(os.listdir(tmp_path)) == ["hydra", "sites"]  # before: the pool's files were written here


@pytest.mark.parametrize("module", ["medtriage.cli.train", "medtriage.cli.cross_validate"])
def test_a_pool_path_that_is_a_file_says_so(module, sites, tmp_path, monkeypatch, capsys):
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("not a folder\n")
    overrides = ["experiment=pneumonia_sites", f"data.sites_dir={sites}", f"data.pool_dir={pool_file}"]
    code = run_hydra_main(module, overrides, tmp_path, monkeypatch)
    check_clean_failure(code, capsys, "data.pool_dir", str(pool_file))


def test_audit_json_that_cannot_be_written_says_so_after_the_audit(two_site_pool, a_file, capsys):
    report = a_file / "audit.json"  # under a file: its folder can never be made
    code = main(["audit", str(two_site_pool.pool_dir), "--no-images", "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: ") and "Traceback" not in captured.err  # before: FileExistsError
    assert all(fragment in captured.err for fragment in ("--json", str(report), "cannot be written")), captured.err
    assert "leakage audit" in captured.out  # the audit's verdict is shown all the same


def test_make_tiles_figure_that_cannot_be_written_says_so(make_tiles_main, a_file, capsys):
    out = a_file / "sites.png"
    check_clean_failure(make_tiles_main(["sites-figure", str(out), "--tiles", "1"]), capsys, str(out), "cannot be written")
