"""Fixtures of the io tests."""

from __future__ import annotations

import pytest

import medtriage.io.dicom


@pytest.fixture
def decoder_calls(monkeypatch) -> list:
    """Stands in for the pixel decoder: a refused frame must never reach it."""
    calls = []

    def decode(ds, where, frame):
        calls.append(where)
        raise RuntimeError("the decoder was reached")

    monkeypatch.setattr(medtriage.io.dicom, "_decode_stored", decode)
    return calls
