"""Output names from header values stay inside the output folder; atomic writes leave no half file."""

import errno
import os

import pytest

from medtriage.errors import InputError
from medtriage.io.safe_output import (
    AtomicFile,
    inside,
    output_path,
    remove_partials,
    safe_component,
    sync_folder,
    try_lock,
    write_atomic,
    write_new,
)


@pytest.mark.parametrize(
    "value",
    ["../../escaped", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\win", "\0x", "", None, "C:\\x", "~root", ".hidden", "x" * 500],
)
def test_hostile_header_values_become_one_harmless_component(tmp_path, value):
    out = tmp_path / "out"
    path = output_path(out, value, ".SR.dcm", source="a")
    assert path.parent == out.resolve() and not path.name.startswith(".")
    assert set(path.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_a_uid_keeps_its_look_and_sources_keep_their_names_apart(tmp_path):
    uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    first, second = output_path(tmp_path, uid, ".SR.dcm", source="/a/1.dcm"), output_path(tmp_path, uid, ".SR.dcm", source="/a/2.dcm")
    assert first.name.startswith(uid + ".") and first != second
    assert output_path(tmp_path, uid, ".SR.dcm", source="/a/1.dcm") == first  # a rerun lands on the same name
    assert output_path(tmp_path, "a/b", ".png", source=1) != output_path(tmp_path, "a_b", ".png", source=2)
    assert safe_component("../../escaped") == "escaped"


def test_a_link_or_a_bad_suffix_cannot_lead_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path, out / "link")
    with pytest.raises(InputError, match="leave the output folder"):
        inside(out, "link/x")
    with pytest.raises(ValueError):
        output_path(out, "x", "/../../y")


def test_write_atomic_replaces_whole_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "f.bin"
    write_atomic(target, b"old")

    def half_then_crash(f):
        f.write(b"new but incomplete")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, half_then_crash)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    (tmp_path / ".f.bin.123.partial").write_bytes(b"left by a killed writer")
    assert remove_partials(tmp_path) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_staging_folder_named_like_a_partial_stays_and_the_files_beside_it_go(tmp_path):
    (tmp_path / ".bundle.partial").mkdir()  # a bundle being built into the same folder
    (tmp_path / ".bundle.partial" / "model.onnx").write_bytes(b"building")
    (tmp_path / ".f.bin.7.partial").write_bytes(b"left by a killed writer")
    assert remove_partials(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [".bundle.partial"]


def test_a_private_atomic_write_is_owner_only_from_its_first_byte(tmp_path):
    key = tmp_path / "site.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    seen = []
    write_atomic(key, lambda f: seen.extend(p.stat().st_mode & 0o777 for p in tmp_path.glob(".*.partial")), private=True)
    assert seen == [0o600] and key.stat().st_mode & 0o777 == 0o600


def test_write_new_makes_an_owner_only_secret_once_and_never_replaces_one(tmp_path):
    key = tmp_path / "keys" / "site.key"
    assert write_new(key, b"first") is True
    assert key.read_bytes() == b"first" and key.stat().st_mode & 0o777 == 0o600
    assert write_new(key, b"second") is False  # another ingest got there first: its secret stands
    assert key.read_bytes() == b"first" and [p.name for p in key.parent.iterdir()] == ["site.key"]


def test_spreadsheet_text_keeps_formulas_as_text_and_leaves_the_rest():
    from medtriage.io.safe_output import spreadsheet_text

    for formula in ("=1+1", "+cmd", "-2+3", "@SUM(A1)", "\t=x", "\r=x"):
        assert spreadsheet_text(formula) == "'" + formula
    assert [spreadsheet_text(v) for v in ("1.2.840.1", "CT", "", 0.5, None, -1)] == ["1.2.840.1", "CT", "", 0.5, None, -1]


def test_an_atomic_file_synced_early_is_not_synced_again_by_its_commit(tmp_path, monkeypatch):
    synced_files: list[int] = []
    fsync = os.fsync

    def counting(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):  # the folder syncs are not the file's
            synced_files.append(fd)
        fsync(fd)

    target = AtomicFile(tmp_path / "out.bin")
    target.file.write(b"data")
    monkeypatch.setattr(os, "fsync", counting)
    target.sync_and_close()  # early, as the node's spool does outside its lock
    assert target.commit() == tmp_path / "out.bin" and (tmp_path / "out.bin").read_bytes() == b"data"
    assert len(synced_files) == 1


def test_try_lock_tells_a_held_lock_from_a_free_one(tmp_path):
    """flock's locks belong to open files: another descriptor of the same file is refused while one holds it."""
    path = tmp_path / "lock"
    path.touch()
    first, second, third = (os.open(path, os.O_RDONLY) for _ in range(3))
    try:
        assert try_lock(first) is True and try_lock(second) is False and try_lock(second, shared=True) is False
        os.close(first)
        first = os.open(path, os.O_RDONLY)
        assert try_lock(first, shared=True) is True and try_lock(second, shared=True) is True and try_lock(third) is False
    finally:
        for descriptor in (first, second, third):
            os.close(descriptor)


def _failing_folder_sync(monkeypatch, code: int) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_disk_error_storing_a_written_name_is_an_error_not_a_success(tmp_path, monkeypatch):
    """The folder's fsync error was swallowed, so a write whose name a power cut could lose was answered as written."""
    _failing_folder_sync(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(tmp_path / "out.bin", b"data")
    with pytest.raises(OSError, match="Input/output error"):
        sync_folder(tmp_path)


def test_a_filesystem_that_cannot_sync_folders_is_passed_over(tmp_path, monkeypatch):
    _failing_folder_sync(monkeypatch, errno.EINVAL)
    assert write_atomic(tmp_path / "out.bin", b"data").read_bytes() == b"data"
