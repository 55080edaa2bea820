"""Structured config of the export step (Hydra group `export`), used by training and scripts/export.py."""

from __future__ import annotations

from dataclasses import dataclass

# Rules that turn validation scores into a threshold (see operating_point.choose_threshold).
THRESHOLD_RULES = ("sensitivity", "specificity", "youden")


@dataclass
class ExportConfig:
    """How a trained run becomes a model package under `<models_dir>/<name>/`."""

    enabled: bool = True  # export at the end of training
    models_dir: str = "models"  # packages land in <models_dir>/<name>/
    name: str = "pneumonia-r18"  # package and registered-model name
    task: str = "binary triage"
    modality: str = "CR"  # modality the model was trained for (recorded in model.json)
    positive_label: str | None = None  # the finding that is triaged; null = the last label name
    # "Review" threshold, chosen on validation: "sensitivity" = highest threshold whose
    # sensitivity >= target; "specificity" = lowest threshold whose specificity >= target;
    # "youden" = argmax(sensitivity + specificity - 1), target unused.
    threshold_rule: str = "sensitivity"
    threshold_target: float = 0.95
    # Optional second, higher threshold for "urgent" (null = no urgent tier).
    urgent_rule: str | None = "specificity"
    urgent_target: float = 0.95
    calibrate: bool = True  # fit a temperature on validation logits
    ece_bins: int = 15
    parity_tolerance: float = 1e-4  # max |p_onnx - p_torch| on validation images; above it the export fails
    parity_images: int = 64  # validation images used for the parity check
    opset: int = 18
    log_to_mlflow: bool = True  # log the package as artifacts of the run
    register_model: bool = True  # register a new MLflow model version per export
    # Tile models (trained on a pool with pathology.json): how `medtriage score` turns tile probabilities into
    # one slide score; slide thresholds are chosen on validation slides aggregated the same way.
    slide_aggregation: str = "top_k"  # top_k | mean
    slide_top_k: int = 5
