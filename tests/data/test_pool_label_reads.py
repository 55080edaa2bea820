"""A site's labels.csv is read once per build, from one open file: its size is bounded on that file, and the bytes
parsed are the bytes the pool's inputs hash records, whatever happens to the file meanwhile."""

from __future__ import annotations

import os

from medtriage.data import pool as pool_module
from medtriage.data import pool_labels
from medtriage.data.pool_labels import read_labels
from medtriage.io import site_labels
from tests.data.test_pool_build_follow_ups import build, one_site

SMALL_LIMIT = 100  # bytes; the real limit is 128 MiB


def labels_file(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def once_the_size_is_checked(monkeypatch, change) -> None:
    """`change()` runs where the size of labels.csv is checked, before its bytes are read."""
    check, done = pool_labels.labels_size_problem, []

    def changing_check(size):
        if not done:
            done.append(change())
        return check(size)

    monkeypatch.setattr(pool_labels, "labels_size_problem", changing_check)
    monkeypatch.setattr(site_labels, "MAX_LABELS_BYTES", SMALL_LIMIT)


def test_labels_csv_swapped_for_another_file_after_its_size_check_is_not_read(tmp_path, monkeypatch):
    path = labels_file(tmp_path, "accession_number,finding\nA1,normal\n")
    larger = tmp_path / "larger.csv"
    larger.write_text("accession_number,finding\nA1,pneumonia\n" + "A2,normal\n" * 20)  # over the limit, never checked
    once_the_size_is_checked(monkeypatch, lambda: os.replace(larger, path))
    table = read_labels(path, "a")
    assert table.problem is None and table.entries == {"A1": [(2, "normal")]}  # the file that was checked


def test_labels_csv_grown_past_the_limit_after_its_size_check_is_refused(tmp_path, monkeypatch):
    path = labels_file(tmp_path, "accession_number,finding\nA1,normal\n")

    def grow():
        with open(path, "a") as f:
            f.write("A2,normal\n" * 20)

    once_the_size_is_checked(monkeypatch, grow)
    table = read_labels(path, "a")
    assert table.problem is not None and "over the limit of 100" in table.problem and table.entries == {}


def test_a_pool_holds_the_labels_its_inputs_record_even_when_labels_csv_changes_during_the_build(tmp_path, monkeypatch):
    sites = one_site(tmp_path / "sites", finding="normal")
    labels = sites / "a" / "labels.csv"
    as_the_build_began = labels.read_bytes()
    decode = pool_module._decode_all

    def edited_while_decoding(*args):
        labels.write_text("accession_number,finding\nA1,pneumonia\n")
        return decode(*args)

    monkeypatch.setattr(pool_module, "_decode_all", edited_while_decoding)
    assert list(build(sites, tmp_path / "pool").rows["label"]) == [0]  # built from the labels as the build began
    monkeypatch.setattr(pool_module, "_decode_all", decode)
    assert list(build(sites, tmp_path / "pool").rows["label"]) == [1]  # the edit: the pool is built again
    labels.write_bytes(as_the_build_began)
    assert list(build(sites, tmp_path / "pool").rows["label"]) == [0]  # and again, not a pool of other labels reused


def test_labels_csv_that_is_a_folder_or_a_fifo_is_a_problem_of_its_site_not_a_hang(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "labels.csv").mkdir()
    os.mkfifo(tmp_path / "labels.csv")  # opened for reading, a FIFO waits for a writer that never comes
    for path in (tmp_path / "folder" / "labels.csv", tmp_path / "labels.csv"):
        table = read_labels(path, "a")
        assert "no labels.csv" in table.problem and str(path) in table.problem and table.entries == {}
