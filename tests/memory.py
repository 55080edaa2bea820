"""Memory a test's action holds at its peak: what proves a size was bounded before it was allocated."""

from __future__ import annotations

import tracemalloc


def outcome_and_peak_bytes(action) -> tuple[object, int]:
    """What `action` returned or raised, and the most memory it held (numpy's and the codecs' arrays included)."""
    tracemalloc.start()
    try:
        try:
            outcome = action()
        except Exception as err:  # handed to the test
            outcome = err
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_bytes(action) -> int:
    """The most memory `action` held; what it raises is raised."""
    outcome, peak = outcome_and_peak_bytes(action)
    if isinstance(outcome, Exception):
        raise outcome
    return peak
