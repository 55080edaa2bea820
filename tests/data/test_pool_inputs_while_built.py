"""The inputs hash a pool records describes the files it was built from: a site file replaced while the pool is built
is read again, and the hash records the file that was decoded, so that a later build reuses the pool only for those
files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import medtriage.data.pool
from medtriage.data.pool import build_sites_pool
from medtriage.errors import InputError
from tests.data.test_pool_and_manifest_edges import write_dicom


def site_of_one_image(sites: Path, tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """Site a holding a.dcm (patient p1), and the bytes of a replacement (patient p2, the same accession number)."""
    write_dicom(sites / "a" / "a.dcm", "p1", "A1")
    write_dicom(tmp_path / "replacement.dcm", "p2", "A1")
    (sites / "a" / "labels.csv").write_text("accession_number,finding\nA1,normal\n")
    return sites / "a" / "a.dcm", (sites / "a" / "a.dcm").read_bytes(), (tmp_path / "replacement.dcm").read_bytes()


def replaced_when_read(monkeypatch, path: Path, data: bytes, times: int | None = 1) -> None:
    """`path` is replaced by `data` (a newer file) as the pool builder starts to read it, the first `times` times
    (None: every time)."""
    read_dicom, done = medtriage.data.pool.read_dicom, []

    def read_after_replacing(source, **options):
        if Path(source) == path and (times is None or len(done) < times):
            done.append(source)
            later = path.stat().st_mtime_ns + 10**9 * (len(done) + 1)
            path.write_bytes(data)
            os.utime(path, ns=(later, later))
        return read_dicom(source, **options)

    monkeypatch.setattr(medtriage.data.pool, "read_dicom", read_after_replacing)


def build(sites: Path, pool: Path):
    return build_sites_pool(sites, pool, val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)


def test_a_file_replaced_during_a_build_is_not_taken_for_the_file_it_replaced(tmp_path, monkeypatch):
    """Before, the hash recorded the file as it was before decoding (p1) and the pool the file decoded (p2): with p1
    back in place (its bytes and time), the next build reused the pool of p2."""
    sites = tmp_path / "sites"
    path, original, replacement = site_of_one_image(sites, tmp_path)
    before = path.stat()
    replaced_when_read(monkeypatch, path, replacement)
    assert list(build(sites, tmp_path / "pool").rows["patient_id"]) == ["p2"]
    path.write_bytes(original)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert list(build(sites, tmp_path / "pool").rows["patient_id"]) == ["p1"]


def test_an_unchanged_file_is_still_reused(tmp_path, monkeypatch):
    sites = tmp_path / "sites"
    path, _, replacement = site_of_one_image(sites, tmp_path)
    replaced_when_read(monkeypatch, path, replacement)
    build(sites, tmp_path / "pool")
    decoded = []
    monkeypatch.setattr(medtriage.data.pool, "decode_file", lambda job: decoded.append(job))
    assert list(build(sites, tmp_path / "pool").rows["patient_id"]) == ["p2"] and decoded == []


def test_a_file_that_keeps_changing_while_read_stops_the_build(tmp_path, monkeypatch):
    sites = tmp_path / "sites"
    path, _, replacement = site_of_one_image(sites, tmp_path)
    replaced_when_read(monkeypatch, path, replacement, times=None)
    with pytest.raises(InputError, match="changed each time it was read") as refused:
        build(sites, tmp_path / "pool")
    assert refused.value.where == str(path.resolve()) and "nothing writes to the site folders" in refused.value.hint
    assert not (tmp_path / "pool" / medtriage.data.pool.INPUTS_FILE).exists()
