"""Which new chest X-rays of the same kind the OOD score flags, per class, and whether fitting it per class flags fewer of
the scarce class; writes `## OOD score by class`.

    python -m benchmarks.ood_by_class [--seed 0] [--threads 2] [--doc docs/benchmarks.md]

The default recipe's package for one seed (trained, or found trained where `benchmarks.accuracy_recipe` keeps its
seeds) withholds as unusual an image whose features lie far from the nearest training class mean
(`medtriage.export.ood`: one covariance shared by the classes, each layer's distance divided by its validation 99th
percentile, the largest over layers thresholded to flag 1% of validation). Normal images are scarce in this training
split (388 of 3,882), so the served score may flag them more often than pneumonia. Variants refitted here on the same
network's features, each thresholded to flag the same 1% of validation:

- per-class scale: each class's distance divided by the 99th percentile of the validation images of that class;
- per-class covariance: one Ledoit-Wolf covariance per class instead of one shared;
- both of those;
- last layer only: the served score on the penultimate features alone (are the early layers what flags them?).

It also asks whether the package could release the flagged normal images because the model scores them confidently as
normal: a gate that scores an unusual image anyway when its p(pneumonia) is at most the largest of the flagged normal
validation images' (set on validation, counted on test), against images that are not chest X-rays at all (pydicom's
non-radiographs relabelled as CR, and tissue tiles of the sample slide, as `benchmarks.safety` sends them).

The served row is the package's own answer (`medtriage score --npz ... --split val|test --json`); the refit of the served
score must reproduce the package's threshold, or the run stops. Test is scored for every variant but chooses nothing:
the variant judged is the one that flags the fewest validation normal images, and the section says whether it
also flags fewer test normal images than the served score.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.accuracy_recipe import EXPERIMENT, served_document, stage_dir, trained_seed
from benchmarks.common import ROOT, command_line, header, machine, verdict, write_section

SECTION = "## OOD score by class"
QUANTILE = 0.99  # the served score's: each layer scaled, and the threshold set, at validation's 99th percentile
VARIANTS = {  # label: (covariance per class, scale per class, layers)
    "per-class scale": (False, True, "all"),
    "per-class covariance": (True, False, "all"),
    "per-class covariance and scale": (True, True, "all"),
    "last layer only": (False, False, "last"),
}
SERVED = (False, False, "all")
THRESHOLD_TOLERANCE = 1e-3  # relative: the refit's threshold against the package's (float32 graph, float64 here)


def class_distances(train: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray], per_class: bool) -> dict:
    """{split: `[N, K]` Mahalanobis distance of each image's features to each training class mean}, under the served
    fit (`fit_mahalanobis`: one Ledoit-Wolf covariance shared by the classes) or one covariance per class, fitted once
    for all splits."""
    from sklearn.covariance import LedoitWolf

    from medtriage.export.ood import fit_mahalanobis

    classes = np.unique(labels)
    if per_class:
        means = [train[labels == k].mean(axis=0) for k in classes]
        covariances = [LedoitWolf().fit(train[labels == k] - m).covariance_ for k, m in zip(classes, means)]
        precisions = [np.linalg.pinv(c, hermitian=True) for c in covariances]
    else:
        served = fit_mahalanobis(train, labels)
        means = list(served.means.double().numpy())
        precisions = [served.precision.double().numpy()] * len(classes)

    def distances(features: np.ndarray) -> np.ndarray:
        centred = [features - mean for mean in means]
        return np.stack([np.sqrt(np.maximum(((c @ p) * c).sum(axis=1), 0.0)) for c, p in zip(centred, precisions)], axis=1)

    return {name: distances(features) for name, features in splits.items()}


def variant_scores(train: list, train_labels: np.ndarray, splits: dict[str, list], val_labels: np.ndarray, variant: tuple) -> dict:
    """{split: (score `[N]`, deciding layer `[N]`)} for `splits` (which include "val", the scaling split): per layer, the
    distance to the nearest class divided by its validation 99th percentile (per class: each class's distance by that
    class's own validation images'), the largest over layers."""
    per_class_covariance, per_class_scale, layers = variant
    chosen = range(len(train)) if layers == "all" else [len(train) - 1]
    scaled = {name: [] for name in splits}
    for layer in chosen:
        distances = class_distances(train[layer], train_labels, {name: f[layer] for name, f in splits.items()}, per_class_covariance)
        val = distances["val"]
        if per_class_scale:
            scale = np.array([np.quantile(val[val_labels == k, k], QUANTILE) for k in range(val.shape[1])])
            for name, d in distances.items():
                scaled[name].append((d / scale).min(axis=1))
        else:
            scale = np.quantile(val.min(axis=1), QUANTILE)
            for name, d in distances.items():
                scaled[name].append(d.min(axis=1) / scale)
    return {name: (np.max(s, axis=0), np.asarray(chosen)[np.argmax(s, axis=0)]) for name, s in scaled.items()}


def flag_counts(flags: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "flagged": int(flags.sum()),
        "images": int(flags.size),
        "by_label": [[int(flags[labels == k].sum()), int((labels == k).sum())] for k in (0, 1)],
    }


def network_features(checkpoint: Path) -> dict:
    """The trained network's tapped features of every train, validation and test image, with labels and layer names."""
    from medtriage.data.manifest import load_manifest
    from medtriage.export.ood import feature_taps, tapped_features
    from medtriage.model.checkpoint import load_model

    net, config = load_model(checkpoint)
    manifest = load_manifest(config["data"]["pool_dir"])
    taps, _, which = feature_taps(net)
    out = {"which": which}
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(manifest.rows["split"].to_numpy() == split)
        out[split] = tapped_features(taps, list(manifest.images(rows)))
        out[f"{split}_labels"] = manifest.rows["label"].to_numpy()[rows].astype(int)
    return out


def served_flags(package: Path, split: str) -> dict:
    """The package's own answer for `split`: p(pneumonia), reference label and whether it withholds each image as unusual."""
    from medtriage.serve.scope import UNUSUAL_INPUT

    document = served_document(package, split)
    results = document["results"]
    return {
        "p": np.array([r["probability"] for r in results]),
        "labels": np.array([document["labels"][r["file"]] for r in results]),
        "flags": np.array([UNUSUAL_INPUT in r["flags"] for r in results]),
    }


def refitted_rows(features: dict, served_threshold: float) -> dict:
    """{variant: flag counts on val and test, its threshold}; the served score's refit must reproduce the package's
    threshold, and its row also counts the layer that decides each flagged test image."""
    splits = {"val": features["val"], "test": features["test"]}
    rows = {}
    for label, variant in {"served (refitted)": SERVED, **VARIANTS}.items():
        scores = variant_scores(features["train"], features["train_labels"], splits, features["val_labels"], variant)
        threshold = float(np.quantile(scores["val"][0], QUANTILE))
        rows[label] = {s: flag_counts(scores[s][0] > threshold, features[f"{s}_labels"]) for s in splits}
        rows[label]["threshold"] = threshold
        if variant == SERVED:
            if abs(threshold - served_threshold) > THRESHOLD_TOLERANCE * abs(served_threshold):
                raise RuntimeError(f"the refitted served score's threshold {threshold:.4f} is not the package's {served_threshold:.4f}")
            test_flags = scores["test"][0] > threshold
            rows[label]["deciding_layers"] = np.bincount(scores["test"][1][test_flags], minlength=len(features["train"])).tolist()
    return rows


def withheld(test: dict) -> dict:
    """What the served flags withhold from test: AUC with and without the flagged images, and how the model scores the
    flagged normal images against the other normal ones."""
    kept, normal = ~test["flags"], test["labels"] == 0
    flagged_normal = normal & test["flags"]
    return {
        "test_auc_all": float(roc_auc_score(test["labels"], test["p"])),
        "test_auc_kept": float(roc_auc_score(test["labels"][kept], test["p"][kept])),
        "normal_p_flagged": float(test["p"][flagged_normal].mean()) if flagged_normal.any() else None,
        "normal_p_kept": float(test["p"][normal & kept].mean()),
    }


def foreign_outcomes(package: Path) -> list[dict]:
    """Each foreign file (the lowest p(pneumonia) of its frames, the one a gate would release first) and each slide tile:
    name, p(pneumonia) and whether the package withholds it as unusual."""
    from pydicom.data import get_testdata_file

    from benchmarks.safety import NOT_RADIOGRAPHS, SLIDE, decoded, relabelled_as_cr
    from medtriage.io.pathology import iter_tile_batches, prepare_slide
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from medtriage.serve.scope import UNUSUAL_INPUT

    predictor = Predictor(load_package(package), allow_out_of_scope=True)  # scores the withheld images, flagged

    def outcome(name: str, scores: list) -> dict:
        lowest = min(scores, key=lambda s: s.probability)
        return {"name": name, "p": float(lowest.probability), "withheld": UNUSUAL_INPUT in lowest.flags}

    files = [Path(p) for p in map(get_testdata_file, NOT_RADIOGRAPHS) if p]
    outcomes = [outcome(f.name, predictor.score_file(relabelled_as_cr(str(f)), f.name)) for f in files]
    prepared = prepare_slide(SLIDE, tile_size=224, min_tissue=0.5)
    try:
        tiles = np.concatenate([batch for _, batch in iter_tile_batches(prepared, batch_size=32)])
    finally:
        prepared.slide.close()
    return outcomes + [outcome("slide tile", predictor.score_decoded(decoded(t[None], "RGB"), "tile")) for t in tiles]


def confidence_gate(served: dict, foreign: list[dict]) -> dict:
    """The gate that releases every flagged normal validation image (p(pneumonia) at most the largest of theirs), and
    what it releases on test and among the withheld foreign images."""
    val, test = served["val"], served["test"]
    flagged_normal_val = val["p"][val["flags"] & (val["labels"] == 0)]
    withheld_foreign = [f for f in foreign if f["withheld"]]
    if not flagged_normal_val.size:
        return {"cut": None, "foreign_withheld": len(withheld_foreign), "foreign": len(foreign)}
    cut = float(flagged_normal_val.max())
    released = test["flags"] & (test["p"] <= cut)
    return {
        "cut": cut,
        "test_released": [int((released & (test["labels"] == k)).sum()) for k in (0, 1)],
        "test_flagged": [int((test["flags"] & (test["labels"] == k)).sum()) for k in (0, 1)],
        "foreign": len(foreign),
        "foreign_withheld": len(withheld_foreign),
        "foreign_released": sorted({f["name"] for f in withheld_foreign if f["p"] <= cut}),
        "foreign_released_count": sum(f["p"] <= cut for f in withheld_foreign),
        "foreign_lowest_p": min((f["p"] for f in withheld_foreign), default=None),
    }


def measure(trained: dict) -> dict:
    package = Path(trained["package"])
    meta = json.loads((package / "model.json").read_text())
    features = network_features(Path(trained["checkpoint"]))
    served = {split: served_flags(package, split) for split in ("val", "test")}
    return {
        "seed": trained["seed"],
        "run_id": trained["run_id"],
        "kept": trained.get("kept", False),
        "which": features["which"],
        "train_by_label": [int((features["train_labels"] == k).sum()) for k in (0, 1)],
        "served": {split: flag_counts(s["flags"], s["labels"]) for split, s in served.items()},
        "variants": refitted_rows(features, meta["ood"]["threshold"]),
        **withheld(served["test"]),
        "gate": confidence_gate(served, foreign_outcomes(package)),
    }


def count_cell(counts: dict, k: int) -> str:
    flagged, of = counts["by_label"][k]
    return f"{flagged} of {of} ({flagged / of:.1%})"


def table_row(label: str, counts: dict) -> str:
    val, test = counts["val"], counts["test"]
    return (
        f"| {label} | {val['flagged']} of {val['images']} | {count_cell(val, 0)} | {count_cell(val, 1)} | "
        f"{test['flagged']} of {test['images']} | {count_cell(test, 0)} | {count_cell(test, 1)} |"
    )


def layer_names(count: int, which: str) -> list[str]:
    return [f"layer{i + 1}" for i in range(count)] if count > 1 else [which]


def section(r: dict, command: str) -> str:
    served_normals = r["served"]["test"]["by_label"][0][0]
    variants = r["variants"]
    # chosen on validation (the first of a tie, in VARIANTS order), judged on test: test chooses nothing
    best = min(VARIANTS, key=lambda label: variants[label]["val"]["by_label"][0][0])
    best_normals = variants[best]["test"]["by_label"][0][0]
    deciding = variants["served (refitted)"]["deciding_layers"]
    names = layer_names(len(deciding), r["which"])
    normal_train, pneumonia_train = r["train_by_label"]
    flagged_p = "—" if r["normal_p_flagged"] is None else f"{r['normal_p_flagged']:.3f}"
    lines = [
        SECTION,
        "",
        *header(command, f"{machine()}; CPU"),
        f"- package: the default recipe (`experiment={EXPERIMENT}`) seed {r['seed']}, MLflow run `{r['run_id'][:8]}`"
        + (" (found trained in the accuracy benchmarks' stages)" if r["kept"] else ""),
        f"- served OOD score: {r['which']}; Mahalanobis distance to the nearest training class mean, one covariance shared "
        f"by the classes, fitted on {normal_train + pneumonia_train} training images ({normal_train} normal, "
        f"{pneumonia_train} pneumonia); each layer divided by its validation 99th percentile, the largest thresholded "
        "to flag 1% of validation. Row *served*: the package's own answer (`medtriage score --npz ... --split val|test "
        "--json`); the refit here reproduces its threshold",
        "- variants, refitted on the same network's features, each thresholded to flag the same 1% of validation: "
        "per-class scale (each class's distance divided by its own validation images' 99th percentile), per-class "
        "covariance (a Ledoit-Wolf covariance per class), both, and the last layer alone. The variant judged is the one "
        "that flags the fewest validation normal images (the first of a tie, in this order); test chooses nothing",
        "",
        "| OOD score | val flagged | val normal | val pneumonia | test flagged | test normal | test pneumonia |",
        "|---|---|---|---|---|---|---|",
        table_row("**served**", r["served"]),
        *[table_row(label, variants[label]) for label in ("served (refitted)", *VARIANTS)],
        "",
        "- layers that decide the served score on its flagged test images: "
        + ", ".join(f"{name} {count}" for name, count in zip(names, deciding)),
        f"- what the flags withhold: served test AUC {r['test_auc_all']:.4f} on all {r['served']['test']['images']} images, "
        f"{r['test_auc_kept']:.4f} on the {r['served']['test']['images'] - r['served']['test']['flagged']} not flagged; mean "
        f"p(pneumonia) of the flagged normal images {flagged_p}, of the other normal images {r['normal_p_kept']:.3f}",
        *gate_lines(r["gate"]),
        "",
        "Targets: the variant chosen on validation flags fewer test normal images than the served score, each flagging 1% "
        "of validation; a gate set on validation releases flagged normal images without releasing any image that is not "
        "a chest X-ray.",
        f"- fewest validation normal images: {best}; on test {best_normals} against the served {served_normals}: "
        f"{verdict(best_normals < served_normals)}",
        gate_verdict(r["gate"]),
    ]
    return "\n".join(lines) + "\n"


def gate_lines(gate: dict) -> list[str]:
    foreign = f"{gate['foreign_withheld']} of the {gate['foreign']} images that are not chest X-rays"
    if gate["cut"] is None:
        return [f"- confidence gate: no normal validation image is flagged, so none is set; the package withholds {foreign}"]
    (normal, pneumonia), (of_normal, of_pneumonia) = gate["test_released"], gate["test_flagged"]
    names = ", ".join(gate["foreign_released"]) or "none"
    return [
        f"- confidence gate (scores an unusual image anyway when p(pneumonia) ≤ {gate['cut']:.4f}, the largest of the "
        f"flagged normal validation images'): on test it releases {normal} of the {of_normal} flagged normal images and "
        f"{pneumonia} of the {of_pneumonia} flagged pneumonia; the package withholds {foreign} (pydicom's "
        "non-radiographs relabelled as CR, tissue tiles of the sample slide), and the gate would release "
        f"{gate['foreign_released_count']} of them onto the worklist as confidently normal ({names}); the lowest "
        f"p(pneumonia) among them is {gate['foreign_lowest_p']:.4f}",
    ]


def gate_verdict(gate: dict) -> str:
    if gate["cut"] is None:
        return "- confidence gate: not assessed (no flagged normal validation image to set it on)"
    normal, foreign = gate["test_released"][0], gate["foreign_released_count"]
    return f"- confidence gate: {normal} test normal images released, {foreign} foreign: {verdict(normal > 0 and foreign == 0)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, if the seed must be trained")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    from medtriage.config import compose_train_config

    overrides = [f"experiment={EXPERIMENT}"]
    cfg = compose_train_config([*overrides, "paths.output_dir=."])
    result = measure(trained_seed(args.seed, args.threads, overrides, cfg, stage_dir(False)))
    print(json.dumps(result, default=str), flush=True)
    write_section(section(result, command_line()), args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
