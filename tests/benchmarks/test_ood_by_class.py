"""The OOD-by-class benchmark's variants and section (the run is `python -m benchmarks.ood_by_class`)."""

import numpy as np
import pytest
import torch

from benchmarks import ood_by_class as bench
from medtriage.export.ood import fit_mahalanobis
from tests.benchmarks.test_docs_figures import check_section, written_sections

DIM = 6


def two_classes(rng: np.random.Generator, scarce: int, common: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 scarce and spread four times wider than class 1, their means apart."""
    features = np.concatenate([rng.normal(0.0, 4.0, (scarce, DIM)), rng.normal(10.0, 1.0, (common, DIM))])
    return features, np.repeat([0, 1], [scarce, common])


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    return {name: two_classes(rng, scarce, 8 * scarce) for name, scarce in (("train", 300), ("val", 400), ("test", 400))}


def test_the_shared_refit_is_the_served_distance(features):
    train, labels = features["train"]
    val, _ = features["val"]
    served = fit_mahalanobis(train, labels)(torch.from_numpy(val).float()).double().numpy()
    refitted = bench.class_distances(train, labels, {"val": val}, per_class=False)["val"]
    np.testing.assert_allclose(refitted.min(axis=1), served, rtol=1e-4)


def test_a_shared_covariance_flags_the_wider_scarce_class_and_per_class_fits_do_not(features):
    """One covariance shared by the classes is too narrow for the wider class: its images are flagged far more often.
    A scale or a covariance per class flags each class at about the rate set on validation (1%)."""
    train, train_labels = features["train"]
    splits = {name: [features[name][0]] for name in ("val", "test")}
    val_labels, test_labels = features["val"][1], features["test"][1]

    def test_rates(variant):
        scores = bench.variant_scores([train], train_labels, splits, val_labels, variant)
        threshold = np.quantile(scores["val"][0], bench.QUANTILE)
        counts = bench.flag_counts(scores["test"][0] > threshold, test_labels)
        return [flagged / of for flagged, of in counts["by_label"]]

    shared = test_rates(bench.SERVED)
    assert shared[0] > 0.05 and shared[1] < 0.01
    for label in ("per-class scale", "per-class covariance"):
        per_class = test_rates(bench.VARIANTS[label])
        assert per_class[0] < 0.04 and per_class[0] < shared[0] / 2, label


def result(test_normals: dict[str, int], val_normals: dict[str, int] | None = None) -> dict:
    def counts(normal: int, val_normal: int = 5) -> dict:
        return {
            "val": {"flagged": 6, "images": 524, "by_label": [[val_normal, 135], [6 - val_normal, 389]]},
            "test": {"flagged": normal + 1, "images": 624, "by_label": [[normal, 234], [1, 390]]},
        }

    val_normals = val_normals or {}
    variants = {label: counts(test_normals.get(label, 10), val_normals.get(label, 5)) for label in bench.VARIANTS}
    return {
        "seed": 0,
        "run_id": "68d51b2a49b8",
        "kept": True,
        "which": "pooled output of each residual stage",
        "train_by_label": [388, 3494],
        "served": counts(10),
        "variants": {"served (refitted)": {**counts(10), "deciding_layers": [8, 0, 0, 2]}, **variants},
        "test_auc_all": 0.9871,
        "test_auc_kept": 0.9867,
        "normal_p_flagged": 0.167,
        "normal_p_kept": 0.269,
        "gate": {
            "cut": 0.2,
            "test_released": [7, 0],
            "test_flagged": [10, 1],
            "foreign": 55,
            "foreign_withheld": 55,
            "foreign_released": ["SC_rgb.dcm", "slide tile"],
            "foreign_released_count": 12,
            "foreign_lowest_p": 0.002,
        },
    }


def served(p: list[float], labels: list[int], flags: list[bool]) -> dict:
    return {"p": np.array(p), "labels": np.array(labels), "flags": np.array(flags)}


def test_the_gate_is_set_on_validation_and_counts_what_it_releases():
    split = {
        "val": served([0.1, 0.3, 0.05, 0.9], [0, 0, 0, 1], [True, True, False, True]),
        "test": served([0.2, 0.4, 0.25, 0.1, 0.95], [0, 0, 1, 0, 1], [True, True, True, False, True]),
    }
    foreign = [{"name": "a", "p": 0.25, "withheld": True}, {"name": "b", "p": 0.5, "withheld": True}]
    foreign.append({"name": "c", "p": 0.01, "withheld": False})  # not withheld: nothing for a gate to release
    gate = bench.confidence_gate(split, foreign)
    assert gate["cut"] == 0.3  # the largest flagged normal validation image's p; the flagged pneumonia (0.9) does not count
    assert gate["test_released"] == [1, 1] and gate["test_flagged"] == [2, 2]
    assert gate["foreign_released"] == ["a"] and gate["foreign_withheld"] == 2 and gate["foreign_lowest_p"] == 0.25
    split["val"]["flags"][:] = False
    assert bench.confidence_gate(split, foreign)["cut"] is None


def test_section_judges_on_test_the_variant_chosen_on_validation():
    text = bench.section(result({}), "python -m benchmarks.ood_by_class")
    assert check_section(bench.SECTION, text, written_sections()) == []
    assert "| **served** | 6 of 524 | 5 of 135 (3.7%) | 1 of 389 (0.3%) | 11 of 624 | 10 of 234 (4.3%) |" in text
    assert "layer1 8, layer2 0, layer3 0, layer4 2" in text
    assert "fewest validation normal images: per-class scale; on test 10 against the served 10: **not met**" in text
    assert text.rstrip().endswith("7 test normal images released, 12 foreign: **not met**")
    fewer = bench.section(result({"per-class covariance": 4}, {"per-class covariance": 3}), "python -m benchmarks.ood_by_class")
    assert "per-class covariance; on test 4 against the served 10: **met**" in fewer
    fewest_on_test_only = bench.section(result({"per-class covariance": 4}, {"last layer only": 3}), "cmd")
    assert "last layer only; on test 10 against the served 10: **not met**" in fewest_on_test_only  # test chooses nothing
    safe = result({})
    safe["gate"].update(foreign_released=[], foreign_released_count=0)
    assert bench.section(safe, "cmd").rstrip().endswith("7 test normal images released, 0 foreign: **met**")
