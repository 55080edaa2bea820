"""Several builders and readers of one pool folder at once (cross-validation folds, DDP ranks, two users): builders
take turns and the later ones reuse what the first built, two writers never mix one's manifest with another's pixels,
and a manifest reads only the pixels it was loaded with."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medtriage.data import manifest as manifest_module
from medtriage.data import pool as pool_module
from medtriage.data.manifest import PoolWriter, load_manifest, pixel_fingerprint
from medtriage.data.pool import build_sites_pool
from medtriage.data.sources import registry
from medtriage.data.sources.registry import build_pool
from medtriage.errors import InputError
from tests.data.test_npz_pool_source import data, write_npz
from tests.data.test_pool_build_follow_ups import one_site

PAUSE_S = 0.5  # how long a paused builder waits for a second one to come in where nothing keeps it out


def consistent(manifest) -> bool:
    """Every row's pixels are the image it was written with (the fingerprint the writer stored beside it)."""
    return all(pixel_fingerprint(manifest.image(i)) == fp for i, fp in enumerate(manifest.rows["fingerprint"]))


def write_pool(pool_dir, value: float, images: int = 3):
    writer = PoolWriter(pool_dir, ["normal", "pneumonia"])
    for i in range(images):
        uid = f"u{i}"
        writer.add(np.full((1, 4, 4), value, np.float32) + i / 8, site="a", patient_id=uid, study_uid=uid, series_uid=uid,
                   sop_uid=uid, path=f"a/{i}.dcm", label=i % 2, split="train")  # fmt: skip
    return writer


def slowed(build, entered: list):
    """`build`, made to wait inside until a second caller comes in too (or PAUSE_S passes)."""
    both_inside = threading.Event()

    def slow_build(*args, **kwargs):
        entered.append(threading.current_thread().name)
        if len(entered) == 2:
            both_inside.set()
        both_inside.wait(PAUSE_S)
        return build(*args, **kwargs)

    return slow_build


def test_builders_started_together_build_the_pool_once_and_the_others_reuse_it(tmp_path, monkeypatch):
    npz, pool = write_npz(tmp_path / "a.npz", 4, 0), tmp_path / "pool"
    entered = []
    monkeypatch.setattr(registry, "build_npz_pool", slowed(registry.build_npz_pool, entered))
    with ThreadPoolExecutor(2) as pool_of_runs:
        manifests = list(pool_of_runs.map(build_pool, [data(npz, pool)] * 2))
    assert len(entered) == 1  # built once: the second run waited, then found the pool current
    assert manifests[0].fingerprint == manifests[1].fingerprint and len(manifests[1].rows) == 12
    assert all(consistent(m) for m in [*manifests, load_manifest(pool)])


def test_site_pool_builds_started_together_decode_once_and_the_others_reuse_the_pool(tmp_path, monkeypatch, capsys):
    sites, entered = one_site(tmp_path / "sites"), []
    monkeypatch.setattr(pool_module, "_decode_all", slowed(pool_module._decode_all, entered))
    with ThreadPoolExecutor(2) as pool_of_builds:
        runs = [pool_of_builds.submit(build_sites_pool, sites, tmp_path / "pool", workers=1) for _ in range(2)]
        manifests = [run.result() for run in runs]
    assert len(entered) == 1 and manifests[0].fingerprint == manifests[1].fingerprint
    out = capsys.readouterr().out
    assert "another build of it is under way; waiting" in out and "reusing pool built from the same inputs" in out
    assert consistent(load_manifest(tmp_path / "pool"))


def test_two_writers_publishing_at_once_never_leave_one_manifest_over_the_others_pixels(tmp_path, monkeypatch):
    first, second = write_pool(tmp_path, 0.25), write_pool(tmp_path, 0.5)
    first_paused, second_done = threading.Event(), threading.Event()
    write_atomic = manifest_module.write_atomic

    def pausing_write(path, *args, **kwargs):  # the first writer pauses between its pixels and its manifest
        if threading.current_thread().name == "first" and not first_paused.is_set():
            first_paused.set()
            second_done.wait(PAUSE_S)
        return write_atomic(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "write_atomic", pausing_write)
    publishing = threading.Thread(target=first.close, name="first")
    publishing.start()
    assert first_paused.wait(5)
    second.close()
    second_done.set()
    publishing.join()
    pool = load_manifest(tmp_path)
    assert consistent(pool) and pool.image(0)[0, 0, 0] == 0.5  # the last writer to publish is the pool, whole


def test_a_manifest_loaded_before_a_rebuild_refuses_the_new_pixels_rather_than_reading_them_as_its_rows(tmp_path):
    write_pool(tmp_path, 0.25).close()
    untouched, opened = load_manifest(tmp_path), load_manifest(tmp_path)
    assert opened.image(0)[0, 0, 0] == 0.25
    fold = dataclasses.replace(opened, _pixels=None)  # what a cross-validation fold or a held-out site makes of it
    write_pool(tmp_path, 0.75).close()  # same shapes and offsets: nothing but the pixel file's identity tells them apart
    for stale in (untouched, fold):
        with pytest.raises(InputError, match="changed since this manifest was read") as err:
            stale.image(0)
        assert "load the pool again" in err.value.hint
    assert opened.image(1)[0, 0, 0] == 0.25 + 1 / 8 and consistent(opened)  # pixels mapped before the rebuild stay its own
    assert consistent(load_manifest(tmp_path))


def test_a_pool_rebuilt_while_its_manifest_is_being_read_is_read_again_whole(tmp_path, monkeypatch):
    write_pool(tmp_path, 0.25).close()
    read_labels, rebuild = manifest_module._read_label_names, [write_pool(tmp_path, 0.75)]

    def rebuild_meanwhile(pool_dir):
        if rebuild:
            rebuild.pop().close()  # publishes between this read's manifest and its pixels
        return read_labels(pool_dir)

    monkeypatch.setattr(manifest_module, "_read_label_names", rebuild_meanwhile)
    manifest = load_manifest(tmp_path)
    assert consistent(manifest) and manifest.image(0)[0, 0, 0] == 0.75
    assert manifest.fingerprint == load_manifest(tmp_path).fingerprint  # the rows and fingerprint of one same manifest
