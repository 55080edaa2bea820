"""Typed errors with messages a person can act on: what went wrong, where, and what to do.

Torch-free: used by io, data, training and serve alike.
"""

from __future__ import annotations

from pathlib import Path


class MedTriageError(Exception):
    """Base class. `str(err)` is the full actionable message."""

    def __init__(self, reason: str, *, where: str | Path | None = None, hint: str | None = None):
        self.reason = reason
        self.where = str(where) if where is not None else None
        self.hint = hint
        parts = [f"{self.where}: {reason}" if self.where else reason]
        if hint:
            parts.append(f"({hint})")
        super().__init__(" ".join(parts))


def printable(text: str) -> str:
    """`text` as a terminal shows it written, on one line: messages carry file names and header values, whose control
    characters (a newline that makes one error read as two, an escape sequence that rewrites the screen) and other
    unprintable ones are shown as escapes (\\n, \\x1b); letters of every script stay as they are."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InputError(MedTriageError):
    """An input file or request cannot be used (corrupt, unsupported, not an image)."""


class DicomError(InputError):
    """A DICOM file that cannot be decoded into pixels."""


class ImageTooLargeError(DicomError):
    """An image whose header claims more pixels, frames or decoded bytes than the configured decode limits."""


class NotAnImageError(DicomError):
    """A valid DICOM object without pixel data (SR, RT plan, presentation state...)."""


class DataNotFoundError(MedTriageError):
    """A data folder or file that a step needs does not exist yet."""


class ConfigError(MedTriageError):
    """A configuration value that is unknown, of the wrong type or inconsistent."""


class PackageError(MedTriageError):
    """A model package that is incomplete, invalid or tampered with."""
