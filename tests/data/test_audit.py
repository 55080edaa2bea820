"""Leakage audit on pools of real PneumoniaMNIST X-rays, clean and with planted leaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtriage.cli import main as cli_main
from medtriage.data.audit import LeakageError, audit_manifest, near_pairs, perceptual_hashes, require_clean
from medtriage.data.manifest import PoolWriter
from medtriage.data.sources.medmnist import as_chw, build_npz_pool, read_npz

NPZ = Path(__file__).resolve().parents[2] / "data/samples/pneumoniamnist_28.npz"
SITES = ("site_a", "site_b")


def first_xrays(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): the first `per_class` normal and pneumonia training X-rays (no duplicates among them)."""
    images, labels = read_npz(NPZ)["train"]
    chosen = np.concatenate([np.flatnonzero(labels == 0)[:per_class], np.flatnonzero(labels == 1)[:per_class]])
    return images[chosen], labels[chosen]


@pytest.fixture(scope="module")
def xrays():
    return first_xrays(45)


def _pool(folder: Path, xrays, extra=()):
    """A clean 2-site pool: 30 patients per split, 1-2 images each, both labels at every site in every split."""
    images, labels = xrays
    order = np.argsort(labels, kind="stable")  # negatives first, so every split gets some of each
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    for rank, i in enumerate(np.concatenate([order[0::3], order[1::3], order[2::3]])):
        split = ("train", "val", "test")[rank * 3 // len(order)]
        _add(writer, images[i], int(labels[i]), SITES[rank % 2], f"{split}-p{rank // 2}", split)
    for image, label, site, patient, split in extra:
        _add(writer, image, label, site, patient, split)
    return writer.close()


def _add(writer, image, label, site, patient, split):
    uid = f"{site}-{len(writer.rows)}"
    writer.add(
        as_chw(image),
        site=site,
        patient_id=patient,
        study_uid=uid,
        series_uid=uid,
        sop_uid=uid,
        path=f"{uid}.dcm",
        label=label,
        split=split,
    )


def _resampled(image: np.ndarray, size: int, noise: float, seed: int = 0) -> np.ndarray:
    """What another site's detector makes of the same X-ray: another matrix, its own noise."""
    big = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    noisy = big + np.random.default_rng(seed).normal(0, noise * 255, big.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_clean_pool_passes(tmp_path, xrays):
    result = audit_manifest(_pool(tmp_path / "pool", xrays))
    assert result.ok and result.findings == [], result.summary()
    assert result.to_dict()["ok"] is True and result.images == 90


def test_patient_copied_into_test_is_found_and_training_refuses(tmp_path, xrays):
    clean = _pool(tmp_path / "clean", xrays)
    train = clean.split("train").iloc[0]
    image = np.rint(clean.image(int(train.name))[0] * 255).astype(np.uint8)  # the cached pixels, back to uint8
    leaky = _pool(tmp_path / "leaky", xrays, extra=[(image, int(train["label"]), train["site"], train["patient_id"], "test")])
    result = audit_manifest(leaky)
    kinds = {f.kind: f for f in result.findings}
    assert not result.ok
    assert kinds["patient_in_two_splits"].examples[0] == {
        "site": train["site"],
        "patient_id": train["patient_id"],
        "splits": ["test", "train"],
    }
    assert kinds["same_image_in_two_splits"].count == 1
    with pytest.raises(LeakageError, match="patient_in_two_splits") as err:
        require_clean(leaky)
    assert "override" in str(err.value)
    with pytest.raises(LeakageError, match="no override"):
        require_clean(leaky, override=True)  # no override lets a patient in two splits through


def test_same_xray_resampled_at_another_site_in_another_split_is_found(tmp_path, xrays):
    images, labels = xrays
    copy = _resampled(images[5], 96, 0.01)
    result = audit_manifest(_pool(tmp_path / "pool", xrays, extra=[(copy, int(labels[5]), "site_c", "c-p1", "test")]))
    near = [f for f in result.findings if f.kind in ("near_duplicate_in_two_splits", "same_image_at_two_sites")]
    assert near and near[0].examples[0]["sites"][1] == "site_c"
    assert near[0].examples[0]["distance"] <= 12


def test_site_without_positives_in_a_split_fails(tmp_path, xrays):
    images, labels = xrays
    negatives = np.flatnonzero(labels == 0)[:4]
    extra = [(images[i], 0, "site_c", f"c-p{i}", "val") for i in negatives]
    result = audit_manifest(_pool(tmp_path / "pool", xrays, extra=extra), check_images=False)
    finding = next(f for f in result.findings if f.kind == "site_without_positives")
    assert finding.examples == [{"split": "val", "site": "site_c"}] and not result.ok


def test_perceptual_hash_tells_distinct_xrays_apart(xrays):
    images = [as_chw(x) for x in xrays[0]]
    hashes = perceptual_hashes(images)
    assert hashes.shape == (90, 143)
    assert near_pairs(hashes, 12) == []  # 90 different patients' X-rays: no false match
    copies = perceptual_hashes([as_chw(_resampled(x, 64, 0.02, seed=i)) for i, x in enumerate(xrays[0][:30])])
    distance = (hashes[:30] != copies).sum(axis=1)
    assert (distance <= 12).mean() >= 0.9


@pytest.mark.slow
def test_published_pneumoniamnist_splits_share_identical_images(tmp_path):
    """A real finding: the npz's own train/val splits hold byte-identical X-rays."""
    result = audit_manifest(build_npz_pool(NPZ, tmp_path / "pool", ["normal", "pneumonia"]))
    finding = next(f for f in result.findings if f.kind == "same_image_in_two_splits")
    assert finding.count >= 8 and {tuple(sorted(e["splits"])) for e in finding.examples} <= {
        ("train", "val"),
        ("test", "train"),
        ("test", "val"),
    }


def test_cli_audit_exit_code_and_json(tmp_path, xrays, capsys):
    _pool(tmp_path / "clean", xrays)
    assert cli_main(["audit", str(tmp_path / "clean")]) == 0
    assert "PASSED" in capsys.readouterr().out
    images, labels = xrays
    _pool(tmp_path / "leaky", xrays, extra=[(images[0], int(labels[0]), "site_a", "val-p0", "test")])
    assert cli_main(["audit", str(tmp_path / "leaky"), "--json", str(tmp_path / "audit.json")]) == 1
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["ok"] is False and "same_image_in_two_splits" in {f["kind"] for f in report["findings"]}
