"""The model package on disk: `model.onnx`, `model.json` (validated against the schema), `MODEL_CARD.md`."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medtriage.errors import PackageError
from medtriage.evaluation.operating_points import flagged
from medtriage.format import CARD_FILE, META_FILE, ONNX_FILE, meta_bytes, sha256_file, temperature_applied, validate_model_json
from medtriage.format.graph import check_graph_file
from medtriage.format.schema import check_precision
from medtriage.io.safe_output import copy_atomic, sync_folder, try_lock, write_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one export of a name at a time
    fcntl = None

# Retired folder -> a descriptor holding flock's lock on it, from write_package(keep_previous=True) until
# settle_package: another export's cleanup leaves a locked one alone; the kernel drops the lock when its export dies.
_claims: dict[str, int] = {}


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """AUC and sensitivity/specificity at `threshold`, compared as served (None where a class is missing)."""
    labels = np.asarray(labels).astype(int)
    predicted = flagged(scores, threshold)
    positives, negatives = labels == 1, labels == 0
    return {
        "n": int(len(labels)),
        "positives": int(positives.sum()),
        "auc": float(roc_auc_score(labels, scores)) if positives.any() and negatives.any() else None,
        "sensitivity": float(predicted[positives].mean()) if positives.any() else None,
        "specificity": float((~predicted[negatives]).mean()) if negatives.any() else None,
    }


def split_metrics(scores: np.ndarray, labels: np.ndarray, sites: np.ndarray, threshold: float) -> dict:
    """Overall and per-site metrics of one split at the review threshold."""
    sites = np.asarray(sites).astype(str)
    per_site = {site: binary_metrics(scores[sites == site], labels[sites == site], threshold) for site in sorted(set(sites))}
    return {"overall": binary_metrics(scores, labels, threshold), "per_site": per_site}


def next_version(package_dir: Path) -> int:
    """One more than the package already there and than any number handed out before for its folder (1 for a new
    name), recorded beside it as handed out: an export that takes a number and then fails may already have named it in
    its log or its MLflow run, so no later export takes it again."""
    package_dir = Path(package_dir)
    with _package_lock(package_dir):
        _restore_retired(package_dir)
        version = max(_held_version(package_dir), _last_handed_out(package_dir)) + 1
        write_atomic(_handed_out_name(package_dir), f"{version}\n".encode())
    return version


def _held_version(package_dir: Path) -> int:
    """The version of the package in `package_dir` (0: none there)."""
    meta_path = package_dir / META_FILE
    if not meta_path.is_file():
        return 0
    try:
        version = json.loads(meta_path.read_text())["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TypeError(version)
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as err:
        # Starting again at 1 would give a second, different package of the same name and version.
        raise PackageError(
            f"cannot read the version of the package already there ({type(err).__name__}: {err}), so the next one is unknown",
            where=meta_path,
            hint=f"restore that package from MLflow or the model registry, or remove the folder (and "
            f"{_handed_out_name(package_dir).name} beside it) to start again at version 1",
        ) from err
    return version


def _handed_out_name(package_dir: Path) -> Path:
    """Hidden beside the package (the loader and the bundle skip hidden names): the last number next_version gave."""
    return package_dir.with_name(f".{package_dir.name}.last-version")


def _last_handed_out(package_dir: Path) -> int:
    """The last version next_version handed out for `package_dir` (0: none yet)."""
    path = _handed_out_name(package_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return 0
    try:
        version = int(text)
    except ValueError:
        version = 0
    if version < 1:  # counting from the package alone could give a failed export's number again
        raise PackageError(
            f"cannot read the last version handed out for this package: {text[:40]!r}",
            where=path,
            hint="write into it the highest version this package has had (see its MLflow runs), or remove it to count on "
            "from the package in the folder",
        )
    return version


def write_package(package_dir: Path, onnx_path: Path, meta: dict, keep_previous: bool = False) -> dict:
    """Fill in the sha256, validate, write the package into a hidden staging folder (each file flushed to
    disk) and swap it into place by renames: a crash leaves the previous package or the new one, never a
    half-written one under the package's name. With `keep_previous`, the package it replaced stays aside (hidden)
    until `settle_package` keeps the new one or puts the previous one back. Returns the metadata as written."""
    meta = completed_meta(onnx_path, meta, where=package_dir / META_FILE)
    package_dir = Path(package_dir)
    with _package_lock(package_dir):
        _restore_retired(package_dir)
        _check_replaceable(package_dir, meta["name"], meta["version"])
        _remove_leftovers(package_dir)
        staging = package_dir.with_name(f".{package_dir.name}.staging-{os.getpid()}")
        staging.mkdir(parents=True)
        retired = _retired_name(package_dir, meta["version"])
        try:
            copy_atomic(onnx_path, staging / ONNX_FILE)
            _check_loadable(meta, staging / ONNX_FILE, package_dir)
            write_atomic(staging / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            write_atomic(staging / CARD_FILE, model_card(meta).encode())
            _swap_in(staging, package_dir, retired)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _release(retired)
            raise
        if not keep_previous:
            _remove_retired(retired)
    return meta


def _check_loadable(meta: dict, onnx_path: Path, package_dir: Path) -> None:
    """Refuse, before the package takes its name, what load_package would refuse in model.json against the graph at
    `onnx_path` (the copy being written) and in its precision: the same checks, so no server refuses it later."""
    try:
        check_precision(meta, where=package_dir / META_FILE)
        check_graph_file(meta, onnx_path, where=package_dir)
    except PackageError as err:
        raise PackageError(
            f"the package would not load: {err.reason}",
            where=err.where,
            hint="model.json and the graph exported with it disagree; nothing was written: fix the export's network "
            "or settings and export again",
        ) from err


def completed_meta(onnx_path: Path, meta: dict, where: Path) -> dict:
    """`meta` with the graph's sha256 filled in, validated as model.json: what `write_package` writes."""
    meta = {**meta, "sha256": sha256_file(onnx_path)}
    validate_model_json(meta, where=where)
    non_finite = list(_non_finite_paths(meta, "$"))
    if non_finite:  # JSON has no NaN or Infinity: json.dumps would write them, and other readers refuse the file
        raise PackageError(
            f"model.json would hold NaN or infinite values at {', '.join(non_finite[:8])}",
            where=where,
            hint="a figure was computed on too few or degenerate images (or a diverged model): check the split it names",
        )
    return meta


def _non_finite_paths(value, path: str) -> Iterator[str]:
    """The path of each float in `value` (nested dicts and lists) that is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_paths(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite_paths(item, f"{path}[{i}]")


@contextmanager
def _package_lock(package_dir: Path) -> Iterator[None]:
    """Held while a package folder is checked and replaced: a lock on the folder that holds it (no lock file is left
    beside the package). Two exports of one name (a re-export while another runs, two registered versions) would
    otherwise interleave: one deletes the other's staging folder as a leftover, or swaps its lower version in over the
    other's newer package after both passed their checks."""
    parent = Path(package_dir).parent
    _make_models_folder(parent)
    if fcntl is None:
        yield
        return
    handle = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield
    finally:
        os.close(handle)


def _make_models_folder(folder: Path) -> None:
    """The folder packages land in, made where missing; refused with what the system said where it cannot be (a file
    under its name or above it, no permission), before anything is written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = (
            "it, or a folder above it, is a file" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or str(err)
        )
        raise PackageError(
            f"cannot make the folder the package goes in: {reason}",
            where=folder,
            hint="choose another folder for the package (export.models_dir, or --out)",
        ) from err


def _parity_of(meta: dict) -> str:
    """Whose graph the ONNX-vs-PyTorch parity was measured on: a quantized package keeps its fp32 source's figure
    (its own graph's distance from that source is under Precision)."""
    return " (of the fp32 source graph; this graph's distance from it: Precision, below)" if meta.get("quantization") else ""


def _check_replaceable(package_dir: Path, name: str, version: int) -> None:
    """The swap deletes whatever held the package's folder: only an earlier package of the same model (or an empty
    folder) may be replaced, never another model's package, a folder of other things (`--out models`), or the same
    model at this version or a later one (two different packages would share a name and version)."""
    if not package_dir.exists():
        return
    if not package_dir.is_dir():
        raise PackageError("the package folder is a file", where=package_dir, hint="choose another folder for the package")
    if not any(package_dir.iterdir()):
        return
    meta_path = package_dir / META_FILE
    hint = "choose another folder for the package, or move that one away first"
    if not meta_path.is_file():
        raise PackageError(
            f"the folder exists and is not a model package (no {META_FILE}); refusing to replace it", where=package_dir, hint=hint
        )
    try:
        existing = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        return  # a package whose model.json broke: replacing it is the repair
    if isinstance(existing, dict) and existing.get("name", name) != name:
        raise PackageError(
            f"the folder holds the package of another model ('{existing['name']}'), not of '{name}'; refusing to replace it",
            where=package_dir,
            hint=hint,
        )
    held = existing.get("version") if isinstance(existing, dict) else None
    if isinstance(held, int) and not isinstance(held, bool) and held >= version:
        raise PackageError(
            f"the folder already holds v{held} of '{name}'; writing v{version} over it would reuse or lower its version",
            where=package_dir,
            hint=f"move that package away first (an export numbered from this folder takes v{held + 1})",
        )


def settle_package(package_dir: Path, meta: dict, keep: bool) -> None:
    """After write_package(keep_previous=True): keep the new package (the previous one deleted), or undo it: the
    previous package back in its place, or no package where there was none, so an export that failed after writing
    leaves no version on disk that the registry does not know. The folder is undone only while it still holds this
    package; where a later export put its own there, this package, which that one set aside, is withdrawn there."""
    package_dir = Path(package_dir)
    with _package_lock(package_dir):
        previous = _retired_name(package_dir, meta["version"])
        if not keep and _holds(package_dir, meta):
            undone = package_dir.with_name(f".{package_dir.name}.staging-undone-{os.getpid()}")  # a leftover if killed here
            package_dir.rename(undone)
            if (previous / META_FILE).is_file():
                previous.rename(package_dir)
            sync_folder(package_dir.parent)
            shutil.rmtree(undone, ignore_errors=True)
        elif not keep:
            _withdraw_aside(package_dir, meta, previous)
        _remove_retired(previous)


def _withdraw_aside(package_dir: Path, meta: dict, previous: Path) -> None:
    """Where a later export set this failed package aside, to put back should it fail too, what this one replaced takes
    its place there (nothing, where it replaced none). File by file: the later export's claim is on that folder."""
    aside = next((p for p in package_dir.parent.glob(f".{package_dir.name}.retired-by-v*") if p != previous and _holds(p, meta)), None)
    if aside is None:
        return
    withdrawn = package_dir.with_name(f".{package_dir.name}.staging-withdrawn-{os.getpid()}")  # a leftover if killed here
    withdrawn.mkdir()
    (aside / META_FILE).rename(withdrawn / META_FILE)  # first: without it the folder is no package to put back
    for item in list(aside.iterdir()):
        item.rename(withdrawn / item.name)
    if (previous / META_FILE).is_file():
        for item in sorted(previous.iterdir(), key=lambda p: p.name == META_FILE):  # model.json last, for the same reason
            item.rename(aside / item.name)
        sync_folder(aside)
    else:
        aside.rmdir()
        sync_folder(package_dir.parent)
    shutil.rmtree(withdrawn, ignore_errors=True)


def _holds(package_dir: Path, meta: dict) -> bool:
    try:
        held = json.loads(meta_bytes(package_dir / META_FILE).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, PackageError):  # no package's model.json
        return False
    return isinstance(held, dict) and all(held.get(key) == meta[key] for key in ("name", "version", "sha256"))


def _retired_name(package_dir: Path, version: int) -> Path:
    """Where the package that `version` replaces is kept aside: named by the version, so that settle_package finds it
    and exports of one package at once never share it (while one holds its version in place, _check_replaceable
    refuses another of that version)."""
    return package_dir.with_name(f".{package_dir.name}.retired-by-v{version}")


def _swap_in(staging: Path, package_dir: Path, retired: Path) -> None:
    """The old package aside at `retired`, claimed (its deletion is the caller's), the new one in: each step one
    rename, both flushed to disk before anyone is told the package is there."""
    if package_dir.exists():
        package_dir.rename(retired)
        _claim(retired)
    staging.rename(package_dir)
    sync_folder(package_dir.parent)


def _claim(retired: Path) -> None:
    """Hold flock's lock on `retired` until _release. Where folders cannot be locked (no fcntl, some network shares)
    it is left unclaimed: another export's cleanup then takes it for a stopped export's."""
    handle = os.open(retired, os.O_RDONLY)
    if try_lock(handle):
        _claims[str(retired)] = handle
    else:
        os.close(handle)


def _release(retired: Path) -> None:
    handle = _claims.pop(str(retired), None)
    if handle is not None:
        os.close(handle)


def _remove_retired(retired: Path) -> None:
    shutil.rmtree(retired, ignore_errors=True)
    _release(retired)


def _claimed(folder: Path) -> bool:
    """Whether a running export holds `folder`'s lock (tried on a descriptor of its own, so this process's claims count)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # gone meanwhile
        return False
    try:
        return try_lock(handle) is False
    finally:
        os.close(handle)  # releases the lock just taken


def _restore_retired(package_dir: Path) -> None:
    """An export killed between the two renames of `_swap_in` leaves the previous package retired and none in its
    place: put it back, so the next version counts on from it rather than from 1."""
    retired = sorted(package_dir.parent.glob(f".{package_dir.name}.retired-*"), key=lambda p: p.stat().st_mtime)
    if retired and not package_dir.exists() and (retired[-1] / META_FILE).is_file():
        retired[-1].rename(package_dir)


def _remove_leftovers(package_dir: Path) -> None:
    """Staging and retired folders of a killed export (hidden; the loader never sees them). A retired folder a running
    export claims stays: that export puts it back if it fails."""
    for pattern in (f".{package_dir.name}.staging-*", f".{package_dir.name}.retired-*"):
        for leftover in package_dir.parent.glob(pattern):
            if not _claimed(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _metrics_table(split: dict) -> list[str]:
    lines = ["| site | images | positives | AUC | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    rows = [("**all sites**", split["overall"])] + list(split["per_site"].items())
    lines += [
        f"| {site} | {m['n']} | {m['positives']} | {_fmt(m['auc'])} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} |"
        for site, m in rows
    ]
    return lines


def worst_site(split: dict) -> tuple[str, float] | None:
    scored = [(site, m["auc"]) for site, m in split["per_site"].items() if m["auc"] is not None]
    return min(scored, key=lambda item: item[1]) if scored else None


def slide_card_lines(block: dict) -> list[str]:
    """The model card's section on whole slides: tiling, aggregation and which thresholds set slide priorities."""
    stain = block["stain_normalization"] or "none"
    lines = [
        "",
        "## Whole slides",
        f"Slides are cut into {block['tile_size']} px tiles at {block['tile_mpp']} µm/pixel (positions with at least "
        f"{block['min_tissue']:.0%} tissue), stain normalisation: {stain}. The slide score is the {_aggregation_text(block)} "
        "of the tile probabilities.",
    ]
    slide = block.get("slide_thresholds")
    if not slide:
        reason = block.get("note", "none were chosen on validation slides")
        return lines + [f"**Slide priorities use the tile thresholds above**, not thresholds chosen on slides ({reason})."]
    lines.append("Slide priorities use thresholds on the slide score, chosen on validation slides with the same rules:")
    for tier in ("review", "urgent"):
        if slide[tier]:
            point = slide[tier]
            lines.append(
                f"- {tier}: slide score >= {point['threshold']:.4f} (sensitivity {point['sensitivity']:.3f}, "
                f"specificity {point['specificity']:.3f} on validation slides)"
            )
    for split_name, split in block.get("slide_metrics", {}).items():
        lines += ["", f"Slide-level metrics, {split_name} split (the counts are slides):", *_metrics_table(split)]
    return lines


def _aggregation_text(block: dict) -> str:
    return f"mean of the {block['top_k']} highest" if block["aggregation"] == "top_k" else "mean"


def _resize_text(resize: dict) -> str:
    sizes = resize.get("member_sizes") or [resize["size"]]
    squares = " or ".join(f"{size}x{size}" for size in sizes)
    return squares + (" (each member at the size it was trained on)" if len(sizes) > 1 else "")


def _normalisation_text(normalize: dict) -> str:
    if normalize.get("per_image"):
        return "standardised by each image's own mean and standard deviation"
    return f"normalised with mean {normalize['mean']}, std {normalize['std']}"


def _precision_lines(block: dict) -> list[str]:
    """The card's section on an int8 package: its fp32 source and how far int8 moves the probabilities."""
    parity, source = block["parity"], block["source"]
    lines = [
        "## Precision: int8",
        f"Quantised from {source['name']} v{source['version']} (sha256 `{source['sha256'][:12]}…`): {block['method']}, "
        f"calibrated on {block['calibration']}. On those images the probability of the positive label moved by at most "
        f"{parity['max_abs_diff']:.4f} (mean {parity['mean_abs_diff']:.4f}); {parity['priority_changes']} of "
        f"{parity['images']} priorities changed.",
    ]
    if parity.get("auc_fp32") is not None:
        lines.append(f"AUC on them: fp32 {parity['auc_fp32']:.4f}, int8 {parity['auc_int8']:.4f}.")
    if parity.get("ood_max_abs_diff") is not None:
        lines.append(
            f"OOD score: max |Δ| {parity['ood_max_abs_diff']:.4f}"
            + (f", {parity['ood_flag_changes']} unusual-input flags changed." if "ood_flag_changes" in parity else ".")
        )
    return lines + [
        "Metrics above are the fp32 model's. Its operating points, OOD threshold and drift references say under `refit` "
        "in model.json whether they were refitted on this int8 graph's outputs.",
        "",
    ]


HELD_OUT_TEXT = {
    "val": "the validation split",
    "out-of-fold": "out-of-fold predictions (each train and validation image scored by the cross-validation fold model "
    "that did not train on it, or the mean of those of several cross-validations cut alike; the served ensemble averages "
    "all the fold models, so its scores are slightly less extreme)",
    "out-of-fold (refit)": "out-of-fold predictions of the recipe's cross-validation (each train and validation image "
    "scored by the fold model that did not train on it); the served model is the same recipe refitted on all of those "
    "images, which has no held-out images of its own, so the fold models' scores stand in for its",
}


def held_out_text(meta: dict) -> str:
    """What the package's temperature, thresholds and `val` metrics were fitted and measured on."""
    split = meta["calibration"].get("split", "val")
    return HELD_OUT_TEXT.get(split, split)


SCOPE_CARD_FIELDS = {  # model.json scope key -> what the card calls it
    "modalities": "modality",
    "sop_classes": "SOP class",
    "photometric": "photometric interpretation",
    "channels": "channels",
    "body_parts": "body part",
    "view_positions": "view position",
    "bits_stored": "bits stored (range)",
    "min_rows": "rows at least",
    "min_columns": "columns at least",
    "pixel_spacing_mm": "pixel spacing in mm (range)",
}


def _refusal_lines(scope: dict | None, ood: dict | None) -> list[str]:
    """What the package withholds a score from, so a deployer knows what reaches the worklist unscored."""
    lines = ["", "## What it refuses to score"]
    if scope:
        checked = [f"{name} {_listed(scope[key])}" for key, name in SCOPE_CARD_FIELDS.items() if scope.get(key) is not None]
        lines.append(f"- An image whose header is outside its scope: {'; '.join(checked)} ({scope.get('source', 'scope')}).")
    else:
        lines.append("- **No declared scope**: any decodable image is scored, whatever its header says.")
    if ood:
        lines.append(
            f"- An image unlike its training images: OOD score above {ood['threshold']:.3f}, which flags "
            f"{ood.get('val_flagged', ood['false_alarm_rate']):.1%} of the {ood.get('threshold_split', 'val')} images ({ood['method']})."
            + (f" **The threshold was {ood['note']}.**" if ood.get("note") else "")
        )
    else:
        lines.append("- **No OOD score**: images unlike the training images are scored like any other.")
    lines.append("- `--allow-out-of-scope` scores refused images anyway and marks each result.")
    return lines


def _calibration_text(cal: dict) -> str:
    """What the graph does to the network's probabilities: a fitted temperature, or nothing (the raw ones were kept)."""
    if temperature_applied(cal):
        return f"calibrated with temperature {cal['temperature']:.3f} (held-out ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f})"
    return f"not temperature-scaled: the network's own probabilities (held-out ECE {cal['ece_before']:.3f})"


def _listed(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def model_card(meta: dict) -> str:
    review, urgent = meta["thresholds"]["review"], meta["thresholds"]["urgent"]
    cal, prov, pre = meta["calibration"], meta["provenance"], meta["preprocessing"]
    held_out = held_out_text(meta)
    lines = [
        f"# {meta['name']} v{meta['version']}",
        "",
        "## Intended use",
        f"Decision support for {meta['task']} of {meta['modality']} images: it orders a worklist by the "
        f"{'calibrated ' if temperature_applied(cal) else ''}probability of **{meta['positive_label']}**. It is not a "
        "diagnosis; a radiologist reads every image.",
        "",
        "## Input and output",
        f"Decoded pixels (medtriage.io, float32 in [0, 1], {meta['input']['channels']} channel(s), any size), resized inside "
        f"the graph to {_resize_text(pre['resize'])} and {_normalisation_text(pre['normalize'])}. Output: probabilities of {', '.join(meta['label_names'])}, "
        f"{_calibration_text(cal)}.",
        "",
        f"Temperature, operating points and the `val` metrics come from {held_out}.",
        "",
        "## Operating points (chosen on held-out images)",
        f"- review: p >= {review['threshold']:.4f} (rule {review['rule']}, sensitivity {review['sensitivity']:.3f}, specificity {review['specificity']:.3f})",
    ]
    if urgent:
        lines.append(
            f"- urgent: p >= {urgent['threshold']:.4f} (rule {urgent['rule']}, sensitivity {urgent['sensitivity']:.3f}, specificity {urgent['specificity']:.3f})"
        )
    if meta.get("pathology"):
        lines += slide_card_lines(meta["pathology"])
    lines += _refusal_lines(meta.get("scope"), meta.get("ood"))
    lines += ["", "## Data", f"Training sites: {', '.join(meta['training_sites']) or 'unknown'}."]
    for split_name, split in meta["metrics"].items():
        split_name = cal.get("split", "val") if split_name == "val" else split_name
        lines += ["", f"## Metrics: {split_name} split (at the review threshold)", *_metrics_table(split)]
        worst = worst_site(split)
        if worst:
            lines.append(f"\nWorst site on {split_name}: **{worst[0]}** (AUC {worst[1]:.3f}).")
    lines += [
        "",
        "## Limitations",
        "- Validated only on the sites listed above; performance at a new site, scanner or population may be lower: "
        "check it on local data before use.",
        f"- Trained for {meta['modality']} images; other modalities or body parts give meaningless scores.",
        "- Thresholds were fitted on held-out images (above) and carry their sampling error.",
        "",
        "## Provenance",
        f"MLflow run `{_fmt(prov['mlflow_run_id'])}`, git commit `{_fmt(prov['git_commit'])}`, "
        f"data fingerprint `{_fmt(prov['data_fingerprint'])}`, "
        f"medtriage {prov['medtriage_version']}. ONNX vs PyTorch max |dp| = {meta['parity']['max_abs_diff']:.1e} "
        f"on {meta['parity']['images']} held-out images{_parity_of(meta)}. model.onnx sha256 `{meta['sha256']}`.",
        "",
    ]
    if meta.get("quantization"):
        lines += _precision_lines(meta["quantization"])
    return "\n".join(lines)
