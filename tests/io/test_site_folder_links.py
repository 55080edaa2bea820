"""Links and entries that are no plain file in a site folder: a linked folder is read as the folder it links to, a
broken link or a folder that cannot be listed is listed as unreadable, never lost unsaid, a pipe never holds the run
up, and a link into the pool or the quarantine is refused."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from medtriage.errors import ConfigError
from medtriage.io import ingest_file
from medtriage.io.deid import DeidOptions
from medtriage.io.ingest import ingest_site
from medtriage.io.site_folder import read_site_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

SECRET = b"test-site-secret-0123456789abcdef"
KEY = SiteKey(SECRET)


def _quarantine_list(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {Path(row["source"]).name: row for row in csv.DictReader(f)}


def _ingest(tmp_path: Path):
    return ingest_site("site_a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=tmp_path / "q", progress=False)


def test_a_linked_folder_is_ingested_and_a_broken_link_is_listed_unreadable(tmp_path):
    site = build_phi_site(tmp_path / "site")
    study = site["pooled"][0].parent  # the export assembled from two disks: one study folder is a link to the other
    shutil.move(study, tmp_path / "other_disk")
    study.symlink_to(tmp_path / "other_disk", target_is_directory=True)
    (study / "back_up").symlink_to("..", target_is_directory=True)  # a loop: its files are read once
    (tmp_path / "site" / "IM9999").symlink_to(tmp_path / "unmounted" / "IM9999")

    summary = _ingest(tmp_path)

    assert summary.pooled == 5 and summary.quarantined["cannot_read"] == 1
    assert summary.counts_in == 11 == summary.pooled + sum(summary.quarantined.values())
    listed = _quarantine_list(tmp_path / "q" / "quarantine.csv")
    assert listed["IM9999"]["reason"] == "cannot_read" and "FileNotFoundError" in listed["IM9999"]["detail"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_no_input_and_a_file_replaced_by_one_is_listed_unread_without_waiting_for_a_writer(tmp_path):
    (tmp_path / "site").mkdir()
    os.mkfifo(tmp_path / "site" / "pipe")
    assert read_site_folder(tmp_path / "site").inputs == []
    ingest_file.init_worker(KEY, DeidOptions(), frozenset(), False)
    out = ingest_file.process_file(str(tmp_path / "site" / "pipe"))  # a file of the listing, a pipe by its read
    assert (out.status, out.reason) == ("unread", "cannot_read") and "not a regular file" in out.detail


def test_a_link_into_the_pool_is_refused_before_anything_is_ingested(tmp_path):
    build_phi_site(tmp_path / "site")
    _ingest(tmp_path)
    (tmp_path / "site" / "previous_export").symlink_to(tmp_path / "pool" / "site_a", target_is_directory=True)
    pooled = sorted((tmp_path / "pool" / "site_a").iterdir())
    with pytest.raises(ConfigError, match="previous_export.*leads into the pool.*remove the link"):
        _ingest(tmp_path)
    assert sorted((tmp_path / "pool" / "site_a").iterdir()) == pooled


# Lists a site folder as an unprivileged user would (root lists any folder): a folder it may not open is an input.
UNPRIVILEGED_LISTING = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from medtriage.io.site_folder import read_site_folder
    os.setgid(65534)
    os.setuid(65534)
    print("\\n".join(str(p) for p in read_site_folder(Path(sys.argv[1])).inputs))
""")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to list as another user")
def test_a_folder_that_cannot_be_listed_is_an_input():
    with tempfile.TemporaryDirectory() as root:  # out of pytest's folder, which only its owner may open
        site = Path(root, "site")
        (site / "locked").mkdir(parents=True)
        (site / "locked" / "IM0001").write_bytes(b"x")
        (site / "open.dcm").write_bytes(b"x")
        (site / "locked").chmod(0o700)
        Path(root).chmod(0o755)
        listing = subprocess.run([sys.executable, "-c", UNPRIVILEGED_LISTING, str(site)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == [str(site / "locked"), str(site / "open.dcm")]
