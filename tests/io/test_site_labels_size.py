"""A site's labels.csv is bounded by its size before it is read: parsed, a table takes about ten times its file's size
in memory. The files over the limit are sparse: their size is real, their blocks are never written."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtriage.data.pool_labels import read_labels
from medtriage.errors import InputError
from medtriage.io.site_labels import MAX_LABELS_BYTES, read_site_labels
from tests.memory import outcome_and_peak_bytes

HEADER = b"sop_instance_uid,finding\n1.2.3,pneumonia\n"


def labels_of_size(folder: Path, size: int) -> Path:
    path = folder / "labels.csv"
    with open(path, "wb") as f:
        f.write(HEADER)
        f.truncate(size)
    return path


def test_a_labels_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    """Before, the whole file was read and parsed (a few GB of rows for a file of a few hundred MB)."""
    path = labels_of_size(tmp_path, MAX_LABELS_BYTES + 1)
    refused, peak = outcome_and_peak_bytes(lambda: read_site_labels(path))
    assert isinstance(refused, InputError), refused
    assert refused.reason == f"labels.csv holds {MAX_LABELS_BYTES + 1} bytes, over the limit of {MAX_LABELS_BYTES}"
    assert refused.where == str(path) and "identifier and label columns" in refused.hint
    assert peak < 1 << 20


def test_a_labels_file_within_the_limit_still_reads(tmp_path):
    labels = read_site_labels(labels_of_size(tmp_path, len(HEADER)))
    assert labels.rows == [{"sop_instance_uid": "1.2.3", "finding": "pneumonia"}]


def test_a_labels_file_that_is_not_utf8_names_the_byte_at_its_offset_in_the_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "sop_instance_uid,finding\n1.2.3,épanchement\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"labels\.csv is not UTF-8 text \(byte 34: invalid continuation byte\)"):
        read_site_labels(path)


def test_a_pool_build_leaves_out_a_site_whose_labels_file_is_over_the_limit(tmp_path):
    table = read_labels(labels_of_size(tmp_path, MAX_LABELS_BYTES + 1), "site_a")
    assert table.problem == (
        f"labels.csv holds {MAX_LABELS_BYTES + 1} bytes, over the limit of {MAX_LABELS_BYTES} "
        "(keep only its identifier and finding columns)"
    )
    assert table.entries == {}
