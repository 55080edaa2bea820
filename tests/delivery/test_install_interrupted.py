"""install.sh after an install that was stopped where no trap runs (SIGKILL, a power loss): the next run puts back what
the stopped one had renamed aside before it does anything else; and an install that cannot finish whole (a folder
PREFIX/venv that cannot be switched) leaves everything as it was, while one that fails after the switch passes with a
warning. Runs against a small bundle of fake packages and the stand-in interpreter of test_install_all_or_nothing.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.delivery.test_bundle_offline import NO_PYTHON, small_bundle
from tests.delivery.test_install_all_or_nothing import earlier_install, failing_command, fake_python, install, snapshot

SWITCH = r"*/.venv.new\ */venv"  # the last rename of the switch, not the one that puts the old venv back


def folder_venv_install(prefix: Path) -> Path:
    """PREFIX as an install made before venvs/ existed left it: PREFIX/venv a folder of its own."""
    earlier_install(prefix)
    (prefix / "venv").unlink()
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "medtriage").write_text("the release installed before venvs/")
    return prefix


def test_a_folder_venv_is_put_back_when_the_switch_to_the_new_release_fails(tmp_path):
    """It was removed before the last rename: that rename failing left PREFIX without a venv at all."""
    prefix = folder_venv_install(tmp_path / "opt")
    before = snapshot(prefix)
    failing = failing_command(tmp_path / "bin", "mv", SWITCH)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing)
    assert done.returncode != 0 and "could not switch" in done.stderr, done.stderr
    assert snapshot(prefix) == before


def test_a_folder_venv_goes_only_once_the_new_release_is_switched_in(tmp_path):
    prefix = folder_venv_install(tmp_path / "opt")
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (prefix / "venv").is_symlink() and not [p for p in snapshot(prefix) if p.startswith(".")]


def stopped_between_the_renames_of_a_model(prefix: Path) -> None:
    """The model folder renamed aside, this bundle's copy not yet in its place, the venv not switched."""
    (prefix / "models" / "model").rename(prefix / "models" / ".model.old")
    (prefix / "models" / ".model.new").mkdir()
    (prefix / "models" / ".model.new" / "model.json").write_text("{}")
    (prefix / ".venv.new").symlink_to(prefix / "venvs" / "stopped")  # the release it made (it goes with the next install)


def stopped_between_the_renames_of_a_folder_venv(prefix: Path) -> None:
    (prefix / "venv").rename(prefix / ".venv.old")
    (prefix / ".venv.new").symlink_to(prefix / "venvs" / "stopped")


def stopped_before_the_replaced_copies_went(prefix: Path) -> None:
    """The switch done (no .venv.new), the copies it replaced still aside."""
    (prefix / "models" / ".model.old").mkdir()
    (prefix / "models" / ".model.old" / "model.json").write_text("the replaced copy")
    (prefix / "systemd" / ".medtriage-serve@.service.old").write_text("the replaced unit")


@pytest.mark.parametrize(
    ("layout", "stop"),
    [
        (earlier_install, stopped_between_the_renames_of_a_model),
        (folder_venv_install, stopped_between_the_renames_of_a_folder_venv),
        (earlier_install, stopped_before_the_replaced_copies_went),
    ],
    ids=["model", "folder venv", "after the switch"],
)
def test_the_next_run_puts_back_what_a_stopped_install_left_aside_before_anything_else(tmp_path, layout, stop):
    """A model folder renamed aside stayed missing: the next run removed it while staging (.NAME.old), so a failure of
    that run lost it for good. The run here stops at its interpreter check, after the bundle's checks."""
    prefix = layout(tmp_path / "opt")
    before = snapshot(prefix)
    stop(prefix)
    done = install(small_bundle(tmp_path), prefix, Path(NO_PYTHON))
    assert done.returncode != 0 and f"{NO_PYTHON} not found" in done.stderr, done.stderr
    assert snapshot(prefix) == before
    assert f"an install into {prefix} was stopped" in done.stderr, done.stderr


def test_a_stopped_install_is_put_back_even_when_the_next_one_fails_at_its_switch(tmp_path):
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    stopped_between_the_renames_of_a_model(prefix)
    failing = failing_command(tmp_path / "bin", "mv", SWITCH)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing)
    assert done.returncode != 0 and "could not switch" in done.stderr, done.stderr
    assert snapshot(prefix) == before


@pytest.mark.parametrize(
    ("command", "arguments", "switched"),
    [
        ("mv", r"-T\ */.model.new\ */model", False),  # between the two renames of the model folder
        ("mv", SWITCH, False),
        ("rm", r"-rf\ */models/.model.old", True),  # the switch done, the replaced copies not yet removed
    ],
    ids=["model", "venv", "after the switch"],
)
def test_an_install_killed_during_its_switch_is_put_right_by_the_next_run(tmp_path, command, arguments, switched):
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    bundle, python = small_bundle(tmp_path), fake_python(tmp_path)
    killing = failing_command(tmp_path / "bin", command, arguments, then="kill -9 $PPID; exit 1")  # no trap runs
    assert install(bundle, prefix, python, killing).returncode == -9
    done = install(bundle, prefix, Path(NO_PYTHON))
    assert done.returncode != 0 and f"an install into {prefix} was stopped" in done.stderr, done.stderr
    after = snapshot(prefix)
    if switched:
        assert not [p for p in after if any(part.startswith(".") for part in p.split("/"))]
        assert after["models/model/model.json"] == "{}" and os.readlink(prefix / "venv") != before["venv"]
    else:
        releases = [p for p in after if p.startswith("venvs/") and p not in before]  # go with the next install that passes
        assert {p: v for p, v in after.items() if p not in releases} == before


def test_a_step_after_the_switch_that_fails_is_a_warning_and_the_install_passes(tmp_path):
    """Removing a release older than the one replaced failed after the switch: install.sh exited 1 with rm's message
    alone, and never said that the new release was installed and running."""
    prefix = earlier_install(tmp_path / "opt")
    (prefix / "venvs" / "0.0.1-py3.0").mkdir()
    failing = failing_command(tmp_path / "bin", "rm", r"-rf\ */venvs/0.0.1-py3.0")
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing)
    assert done.returncode == 0, done.stderr
    assert f"warning: could not remove {prefix}/venvs/0.0.1-py3.0" in done.stderr and "installed:" in done.stdout
    assert os.readlink(prefix / "venv") != str(prefix / "venvs" / "0.0.2-py3.0")


def test_the_way_back_it_prints_is_not_taken_for_a_stopped_install_when_it_is_cut_short(tmp_path):
    """Going back by the printed commands, stopped after their first: the link they leave must not tell the next install
    that its own switch was stopped (which would put back a stopped switch that never was)."""
    prefix, bundle = earlier_install(tmp_path / "opt"), small_bundle(tmp_path)
    done = install(bundle, prefix, fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    way_back = done.stdout.split("to go back to it:")[1].split("&&")[0].split()
    assert way_back[:2] == ["ln", "-sfn"], done.stdout
    os.symlink(way_back[2], way_back[3])  # its first command ran, its second never came
    again = install(bundle, prefix, Path(NO_PYTHON))
    assert "was stopped" not in again.stderr, again.stderr
