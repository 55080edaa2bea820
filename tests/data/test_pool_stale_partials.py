"""A build killed outright (SIGKILL, power loss) leaves its hidden `.partial` pixel file, as large as the pool: the
next build of that pool removes it, but never the file of a writer still at work, in this process or another."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np

from medtriage.data import pool_folder
from medtriage.data.manifest import PoolWriter, load_manifest
from medtriage.data.pool_folder import LOCK_FILE, PIXELS_FILE, remove_stale_partials
from medtriage.data.sources.medmnist import build_npz_pool
from tests.data.test_npz_pool_source import LABELS, write_npz
from tests.data.test_pool_writer import add, image

# A builder that writes one image, says so, and then waits to be killed (or to be told to finish).
WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from medtriage.data.manifest import PoolWriter
    writer = PoolWriter(sys.argv[1], ["normal", "pneumonia"])
    writer.add(np.full((1, 64, 64), 0.5, np.float32), site="a", patient_id="u", study_uid="u", series_uid="u",
               sop_uid="u", path="u", label=0, split="train")
    writer._pixels.file.flush()
    print("writing", flush=True)
    sys.stdin.readline()
    writer.close()
    print("closed", flush=True)
    """
)


def start_writer(pool_dir) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(pool_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing", process.stderr.read()
    return process


def partials(pool_dir) -> list[str]:
    return sorted(p.name for p in pool_dir.iterdir() if p.name.endswith(".partial"))


def test_the_pixel_file_of_a_killed_build_is_removed_by_the_next_build_but_not_a_live_builders(tmp_path):
    pool = tmp_path / "pool"
    killed, live = start_writer(pool), None
    try:
        killed_files = partials(pool)
        live = start_writer(pool)  # another builder of the same pool, still at work
        live_files = sorted(set(partials(pool)) - set(killed_files))
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert len(killed_files) == len(live_files) == 1 and killed_files[0].startswith(f".{PIXELS_FILE}.")
        build_npz_pool(write_npz(tmp_path / "a.npz", 2, 0), pool, LABELS)
        assert partials(pool) == live_files  # the dead builder's pixels are gone, the live one's kept
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "closed", live.stderr.read()
        assert load_manifest(pool).image(0)[0, 0, 0] == 0.5  # the live builder finished, and its pool is whole
        assert partials(pool) == []
    finally:
        for process in (p for p in (killed, live) if p is not None):
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)  # reaps it and closes its pipes


def test_a_writer_in_this_process_keeps_its_pixel_file_while_another_build_of_the_pool_runs(tmp_path):
    first = PoolWriter(tmp_path / "pool", ["normal", "pneumonia"])
    add(first, 0.25)
    build_npz_pool(write_npz(tmp_path / "a.npz", 2, 0), tmp_path / "pool", LABELS)
    assert first.close().image(0)[0, 0, 0] == 0.25


def test_leftover_temporary_files_of_the_pools_other_files_go_with_the_next_build(tmp_path):
    pool = tmp_path / "pool"
    build_npz_pool(write_npz(tmp_path / "a.npz", 2, 0), pool, LABELS)
    for name in (".manifest.csv.k1ll3d.partial", ".source.json.k1ll3d.partial", f".{PIXELS_FILE}.k1ll3d.partial"):
        (pool / name).write_bytes(b"left by a killed build")
    (pool / ".staging.partial").mkdir()  # not a file a writer left: kept
    build_npz_pool(write_npz(tmp_path / "b.npz", 3, 1), pool, LABELS)
    assert sorted(p.name for p in pool.iterdir() if p.name.startswith(".")) == [LOCK_FILE, ".staging.partial"]


def test_a_writer_whose_new_file_is_removed_before_it_claims_it_takes_another(tmp_path, monkeypatch):
    """Between creating its file and locking it, a writer's file looks stale to another builder cleaning up."""
    real_atomic_file, cleaned = pool_folder.AtomicFile, []

    class CleanedAtOnce(real_atomic_file):
        def __init__(self, path):
            super().__init__(path)
            if not cleaned:
                cleaned.append(remove_stale_partials(path.parent))

    monkeypatch.setattr(pool_folder, "AtomicFile", CleanedAtOnce)
    writer = PoolWriter(tmp_path, ["normal", "pneumonia"])
    assert cleaned == [1]  # its first file went
    add(writer, 0.75)
    assert np.array_equal(writer.close().image(0), image(0.75))
    assert partials(tmp_path) == []
