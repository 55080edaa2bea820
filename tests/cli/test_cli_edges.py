"""Command lines given a missing input: the message names it, the exit status is non-zero, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medtriage.cli.data import build_pool_main, make_sites_main, pick_files_main


def check_clean_failure(code, capsys, *fragments):
    captured = capsys.readouterr()
    assert code == 2
    assert "\nerror: " in "\n" + captured.err and "Traceback" not in captured.err  # after any progress bar
    assert all(fragment in captured.err for fragment in fragments)


def test_pick_files_of_a_missing_pool_says_so(tmp_path, capsys):
    check_clean_failure(pick_files_main([str(tmp_path / "no_pool")]), capsys, "no_pool", "build_pool.py")


def test_build_pool_script_without_site_folders_says_so(tmp_path, capsys):
    code = build_pool_main(["--sites", str(tmp_path / "no_sites"), "--pool", str(tmp_path / "pool")])
    check_clean_failure(code, capsys, "no_sites", "make_sites.py")


def test_make_sites_script_without_the_npz_says_so(tmp_path, capsys):
    code = make_sites_main(["--npz", str(tmp_path / "gone.npz"), "--out", str(tmp_path / "sites")])
    check_clean_failure(code, capsys, "gone.npz")


def test_make_tiles_of_a_missing_slide_says_so(tmp_path, capsys):
    pytest.importorskip("torch")
    from medtriage.cli.make_tiles import main

    check_clean_failure(main(["slides", str(tmp_path / "pool"), str(tmp_path / "gone.svs")]), capsys, "gone.svs")


def test_train_without_site_folders_prints_the_message_not_a_traceback(tmp_path):
    pytest.importorskip("torch")
    overrides = [
        "experiment=pneumonia_sites",
        f"data.sites_dir={tmp_path}/no_sites",
        f"data.pool_dir={tmp_path}/pool",
        f"paths.runs_dir={tmp_path}/runs",
        f"hydra.run.dir={tmp_path}/out",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-m", "medtriage.cli.train", *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: " in out.stderr and "no_sites" in out.stderr and "make_sites.py" in out.stderr
    assert "Traceback" not in out.stderr


def test_build_pool_reads_by_default_what_ingest_writes_not_the_raw_site_exports():
    import argparse

    from medtriage.cli.data import add_build_pool_arguments
    from medtriage.io.ingest import add_sites_arguments

    pool, ingest = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_build_pool_arguments(pool)
    add_sites_arguments(ingest)
    sites, into = pool.parse_args([]).sites, ingest.parse_args([]).into
    assert str(sites) == str(into) != str(ingest.parse_args([]).sites)  # de-identified before pooling


@pytest.mark.parametrize(
    ("module", "work", "overrides", "fragments"),
    [
        # the search of the docs, given to the command that returns validation AUC: it would look for the worst model
        ("medtriage.cli.train", "train_and_export", ["hparams_search=pneumoniamnist_optuna"], ["minimize", "cross_validate.py"]),
        ("medtriage.cli.cross_validate", "cross_validate", ["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"], ["maximize"]),
    ],
)
def test_a_sweeper_set_to_optimise_the_commands_value_the_wrong_way_is_refused_before_any_work(
    module, work, overrides, fragments, tmp_path, monkeypatch, capsys
):
    import importlib

    from tests.cli.test_cli_bad_inputs import run_hydra_main

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(importlib.import_module(module), work, no_work)
    code = run_hydra_main(module, ["experiment=pneumoniamnist", *overrides], tmp_path, monkeypatch)
    check_clean_failure(code, capsys, "hydra.sweeper.direction", *fragments)
