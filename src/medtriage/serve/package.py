"""Load a model package: `model.json` checked against its schema, `model.onnx` against its sha256."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import medtriage
from medtriage.errors import PackageError
from medtriage.format import (
    META_FILE,
    ONNX_FILE,
    SCHEMA_VERSION,
    meta_bytes,
    sha256_file,
    temperature_applied,
    validate_model_json,
)
from medtriage.format.graph import REEXPORT_HINT, check_graph_file
from medtriage.format.schema import check_precision, integers_as_int


@dataclass(frozen=True)
class ModelPackage:
    directory: Path
    meta: dict

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def positive_label(self) -> str:
        return self.meta["positive_label"]

    @property
    def input_name(self) -> str:
        """The graph input that takes the pixels (model.json's `input.name`)."""
        return self.meta["input"]["name"]

    @property
    def output_name(self) -> str:
        """The graph output that holds the probabilities (model.json's `output.name`)."""
        return self.meta["output"]["name"]

    @property
    def channels(self) -> int:
        return int(self.meta["input"]["channels"])

    @property
    def review_threshold(self) -> float:
        return served_threshold(self.meta["thresholds"]["review"]["threshold"])

    @property
    def urgent_threshold(self) -> float | None:
        urgent = self.meta["thresholds"].get("urgent")
        return served_threshold(urgent["threshold"]) if urgent else None

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities served are calibrated (format.temperature_applied, the rule behind export's
        `output.calibrated` and the model card's wording). A package exported before that rule could flag raw
        probabilities calibrated, so the method decides; a false flag stands."""
        return temperature_applied(self.meta["calibration"]) and self.meta["output"].get("calibrated", True) is not False

    @property
    def scope(self) -> dict | None:
        """What the model may be shown (serve/scope.py); None in packages exported before scopes existed."""
        return self.meta.get("scope")

    @property
    def ood_output(self) -> str | None:
        return (self.meta.get("ood") or {}).get("output")

    @property
    def ood_threshold(self) -> float | None:
        threshold = (self.meta.get("ood") or {}).get("threshold")
        return None if threshold is None else float(threshold)

    def describe(self, with_sha: bool = True) -> str:
        """'pneumonia-r18 v3 (sha256 4be1…)', the model column of a result."""
        return identity_label(self.identity(), sha_chars=4 if with_sha else 0)

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def scored_by(result: dict) -> dict:
    """The identity, in ModelPackage.identity()'s form, of the package that scored a result (Score.as_dict())."""
    return {"name": result["model"], "version": result["version"], "sha256": result["sha256"]}


def calibrated_result(result: dict, package: ModelPackage) -> bool | None:
    """Whether a result's probability (Score.as_dict()) is calibrated: as the result recorded it, else as `package`
    says where it scored the result; None (not known) for a result of another package stored before scores said."""
    if result.get("calibrated") is not None:
        return result["calibrated"]
    return package.calibrated if scored_by(result) == package.identity() else None


def identity_label(identity: dict, sha_chars: int = 0) -> str:
    """'pneumonia-r18 v3', followed by ' (sha256 4be1…)' with `sha_chars` of the model's digest."""
    text = f"{identity['name']} v{identity['version']}"
    return f"{text} (sha256 {identity['sha256'][:sha_chars]}…)" if sha_chars else text


def picture_refused(scoring: dict, served: dict) -> str | None:
    """Why the served package may not draw the picture of an image another package scored (identities as above);
    None when it scored it. A picture from another model would not show where the scoring model looked."""
    if scoring == served:
        return None
    return (
        f"the image was scored by {identity_label(scoring, 12)} and the service now runs {identity_label(served, 12)}; "
        "a picture drawn by another model would not show where the scoring model looked"
    )


def served_threshold(threshold: float) -> float:
    """An operating point's threshold as served probabilities meet it: its nearest float32. It was chosen among
    float64 validation scores, but ONNX Runtime serves float32 probabilities, and a score at the threshold may round
    below it, to a lower priority than validation gave it. Rounding keeps order, so against the rounded threshold
    every validation score at or above the threshold stays at or above it, and every one below stays below unless
    float32 cannot tell it from the threshold. Both sides being float32 values, `p >= threshold` is then the float32
    comparison."""
    return float(np.float32(threshold))


def load_package(directory: str | Path) -> ModelPackage:
    """Read and verify `directory`; raise PackageError saying what is wrong and what to do."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PackageError(
            "model package folder not found",
            where=directory,
            hint="pass the folder that holds model.onnx and model.json, e.g. models/pneumonia-sites-r18",
        )
    meta = integers_as_int(_read_meta(directory / META_FILE))  # a tile_size of 48.0 would fail deep in slide scoring
    _check_schema_version(meta, directory / META_FILE)
    validate_model_json(meta, where=directory / META_FILE)
    check_precision(meta, where=directory / META_FILE)
    onnx_path = directory / ONNX_FILE
    if not onnx_path.is_file():
        raise PackageError("model.onnx is missing", where=directory, hint=REEXPORT_HINT)
    actual = sha256_file(onnx_path)
    if actual != meta["sha256"]:
        raise PackageError(
            f"model.onnx does not match its recorded sha256 (model.json says {meta['sha256'][:12]}…, "
            f"the file hashes to {actual[:12]}…): the model was changed or corrupted after export; refusing to load it",
            where=onnx_path,
            hint=REEXPORT_HINT,
        )
    # From the graph's header, not an ONNX Runtime session: tools that only load a package (inspect, verify, bundling,
    # the service's listing) refuse what a predictor would, and the graph is built once, when a predictor starts.
    check_graph_file(meta, onnx_path, where=directory)
    return ModelPackage(directory, meta)


def _check_schema_version(meta: dict, where: Path) -> None:
    """A package from a newer medtriage would otherwise fail the schema check with advice to re-export it here."""
    version = meta.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        provenance = meta.get("provenance")
        written_by = provenance.get("medtriage_version", "unknown") if isinstance(provenance, dict) else "unknown"
        raise PackageError(
            f"model.json has package schema version {version}, written by medtriage {written_by}; this medtriage "
            f"({medtriage.__version__}) reads schema version {SCHEMA_VERSION} and cannot load it",
            where=where,
            hint=f"upgrade medtriage on this machine to {written_by} or later, or export the model with medtriage {medtriage.__version__}",
        )


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise PackageError("model.json is missing", where=path.parent, hint=REEXPORT_HINT)
    try:
        meta = json.loads(meta_bytes(path, f"copy the package folder again from where it came from; {REEXPORT_HINT}").decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise PackageError(f"model.json is not valid JSON ({err})", where=path, hint=REEXPORT_HINT) from err
    if not isinstance(meta, dict):
        raise PackageError("model.json must hold a JSON object", where=path, hint=REEXPORT_HINT)
    return meta
