"""Signal handling shared by long commands (training runs, ingests): handlers set for a block and put back after it,
SIGTERM and SIGHUP treated as Ctrl-C, and signals held back while a status is being written."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # no SIGHUP on Windows
STOPPING = (signal.SIGINT, *TERMINATING)
INTERRUPTED_STATUS = 128 + signal.SIGINT  # what a shell reports for a process Ctrl-C ended (130), however it ended


@contextmanager
def handling(signums: tuple[int, ...], handler, *, keep_ignored: bool = False) -> Iterator[None]:
    """`handler` for `signums` in the block, the previous handlers back after it. With `keep_ignored`, a signal the
    process ignores (nohup, a background job) stays ignored. Only the main thread may set signal handlers: elsewhere
    the block runs with the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if keep_ignored:
        signums = tuple(signum for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN)
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def terminate_as_interrupt():
    """SIGTERM (a SLURM time limit or preemption, a stopped cross-validation fold) and SIGHUP (the terminal or SSH
    session the command was started from went away) raised as KeyboardInterrupt in the block, as Ctrl-C is: a training
    run ends KILLED and resumable, where the default action would leave it RUNNING for good."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return handling(TERMINATING, interrupt)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP held back for the block (a run's status being written: a second signal of a
    scheduler, or a second Ctrl-C, would stop it halfway and leave the run RUNNING for good), then raised as
    KeyboardInterrupt once the block is done."""
    came: list[int] = []
    with handling(STOPPING, lambda signum, frame: came.append(signum)):
        yield
    if came:
        raise KeyboardInterrupt(f"signal {came[0]}, while the run's status was written")
