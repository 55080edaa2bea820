"""Progress of a long loop: a bar on a terminal, plain lines at a modest rate in a log file."""

from __future__ import annotations

import io
import itertools
import os

import pytest

from medtriage.progress import ProgressLines, progress
from medtriage.training.loop import TrainState
from tests.training.test_rank_draws_and_resumed_steps import tiny_loop


def test_an_epoch_logged_to_a_file_shows_plain_progress_lines_without_redraws(capsys):
    fit = tiny_loop(max_epochs=2)
    fit.epoch(1, TrainState())
    logged = capsys.readouterr().err  # stderr captured, as a log file holds it: not a terminal
    assert "\r" not in logged
    lines = [line for line in logged.splitlines() if line.startswith("epoch 1/2: ")]
    assert lines and "4/4 batches (100%)" in lines[-1] and "loss " in lines[-1]


def test_lines_come_once_the_interval_has_passed_and_once_at_the_end():
    ticks = itertools.count(step=25.0)  # each read of the clock is 25 s on
    file = io.StringIO()
    progress = ProgressLines(range(10), 10, "epoch 3/5", file, every_s=60.0, clock=lambda: next(ticks))
    for step in progress:
        progress.set_postfix(loss=f"{1 / (step + 1):.2f}")
    progress.close()
    progress.close()
    lines = file.getvalue().splitlines()
    assert lines[0] == "epoch 3/5: 3/10 batches (30%) in 01:15, loss 0.33"
    assert len(lines) == 4 and lines[-1].startswith("epoch 3/5: 10/10 batches (100%) in 04:35, ")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_still_gets_a_bar():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = progress(range(3), 3, "epoch 1/1", file=terminal)
        assert not isinstance(bar, ProgressLines)
        list(bar)
        bar.close()
    os.close(leader)


def test_a_loop_run_to_its_end_says_so_without_being_closed():
    file = io.StringIO()
    assert list(progress(range(5), 5, "decoding site DICOM", "file", file=file)) == list(range(5))
    assert file.getvalue() == "decoding site DICOM: 5/5 files (100%) in 00:00\n"


def test_a_bar_counted_by_hand_says_where_it_is_at_its_end():
    file = io.StringIO()
    with progress(None, 3, "writing site DICOM", "file", file=file) as bar:
        for _ in range(3):
            bar.update()
    assert file.getvalue() == "writing site DICOM: 3/3 files (100%) in 00:00\n"


class GoneReader(io.StringIO):
    """A log whose reader went away (`2>&1 | head -1`): every write fails."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_whose_reader_left_does_not_stop_the_loop():
    ticks = itertools.count(step=100.0)  # a line due at every step
    done = list(ProgressLines(range(5), 5, "epoch 1/1", GoneReader(), every_s=60.0, clock=lambda: next(ticks)))
    assert done == list(range(5))  # before: BrokenPipeError at the first line, the epoch ended halfway
