"""The typed training config: one dataclass per config group (data, model, trainer, tracking, export, paths).

Hydra merges every YAML group file onto these (medtriage.config.compose registers them), so a
misspelt key or a value of the wrong type fails when the config is composed, naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING, OmegaConf

from medtriage.errors import ConfigError

SYNTHETIC_SITE_NAMES = ("synthetic_site_a", "synthetic_site_b", "synthetic_site_c")  # their stains: data.simulate.tiles


class Device(Enum):
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast in the training forward (CUDA, or a CPU: training.optimiser.training_autocast); evaluation on a CPU stays fp32


class Imbalance(Enum):
    none = "none"
    weighted_loss = "weighted_loss"  # cross-entropy weighted by inverse class frequency
    sampler = "sampler"  # class-balanced sampling of training images


class AugmentOn(Enum):
    cpu = "cpu"  # per-image MONAI transforms in the loader
    device = "device"  # one batched affine + intensity jitter on the training device (medtriage.training.augmentation)


class LrScaling(Enum):
    none = "none"  # trainer.lr as given
    linear = "linear"  # lr * global_batch / lr_reference_batch
    sqrt = "sqrt"  # lr * sqrt(global_batch / lr_reference_batch)


class Schedule(Enum):
    cosine = "cosine"  # linear warm-up over trainer.warmup_epochs, cosine decay to trainer.min_lr_ratio * lr
    one_cycle = "one_cycle"  # torch OneCycleLR: lr/25 up to lr over trainer.one_cycle_pct_start of the steps, then down to ~0


class Weights(Enum):
    best = "best"  # the epoch with the best validation AUC (best.pt)
    last = "last"  # the weights at the end of training (last.pt; the EMA weights when trainer.ema_decay is set)


class EmaWarmup(Enum):
    # decay min(ema_decay, (1 + n) / (10 + n)) after n updates: it reaches 0.99 after 890 updates and 0.998 after
    # 4,490, so in a shorter run the ramp, not ema_decay, sets the average (the run says so when it starts)
    ramp = "ramp"
    # ema_decay from the first update, bias-corrected as Adam's moments are: each trained step weighs ema_decay^age,
    # the initial weights not at all, so ema_decay sets the horizon (about 1 / (1 - ema_decay) updates) in any run
    debiased = "debiased"


class Loader(Enum):
    torch = "torch"  # torch DataLoader (worker processes when num_workers > 0)
    thread = "thread"  # MONAI ThreadDataLoader: cached tensors, no process hop (GPU)


@dataclass
class AugmentConfig:
    """MONAI augmentation on the cached, resized training tensors (no vertical flip: anatomy)."""

    enabled: bool = True
    prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05  # fraction of the image side
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    noise_std: float = 0.01
    # Tone-curve jitter: each image's intensities (rescaled to its own [min, max]) raised to a power drawn in
    # [1 / (1 + gamma), 1 + gamma] (MONAI's RandAdjustContrast); it spans the sites' VOI LUT curves. 0 = off.
    gamma: float = 0.0
    hflip: bool = False  # random left-right flip (trainer.augment_on=device only); off for chest X-rays (heart side)
    # H&E stain jitter of RGB tiles (medtriage.io.stain.augment_stain): concentration scale 1 ± sigma, shift ± bias; 0 = off.
    stain_sigma: float = 0.0
    stain_bias: float = 0.0


@dataclass
class SyntheticTilesConfig:
    """The `data.tiles` group of a training config (source=tiles) and of scripts/make_tiles.py."""

    sites: list[str] = field(default_factory=lambda: list(SYNTHETIC_SITE_NAMES))
    patients_per_site: int = 24
    tiles_per_slide: int = 12
    tile_size: int = 64
    tumour_slide_fraction: float = 0.5
    tumour_tile_fraction: float = 0.7  # of the tiles of a tumour slide
    stain_normalize: bool = False  # Macenko, fitted per slide, to the reference stains
    holdout_site: str | None = None  # every patient of this site goes to test (leave-one-site-out)
    seed: int = 0


@dataclass
class DataConfig:
    source: str = MISSING  # a key of medtriage.data.sources.registry.SOURCES
    pool_dir: str = MISSING  # pooled manifest + pixel cache (built when missing)
    npz_path: str | None = None  # source=npz
    sites_dir: str | None = None  # source=sites (made by scripts/make_sites.py)
    label_names: list[str] = field(default_factory=lambda: ["normal", "pneumonia"])
    pool_seed: int = 0  # patient-level split seed of the pool builder
    batch_size: int = 64
    num_workers: int = 0
    limit: int | None = None  # at most this many images per split (quick runs)
    persistent_cache: bool = True  # keep resized splits on disk under <pool_dir>/resized (medtriage.data.torch.split_cache)
    site_stratified: bool = False  # every batch (and every rank's shard) holds the sites in proportion (training.samplers)
    allow_audit_failure: bool = False  # train despite known duplicate images (logged); never a patient in two splits
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiles: SyntheticTilesConfig = field(default_factory=SyntheticTilesConfig)  # source=tiles
    holdout_site: str | None = None  # leave-one-site-out: this site's rows all become test, other sites keep train/val
    # k-fold cross-validation on train+val (medtriage.data.folds): fold cv_fold is validation, test is left out
    cv_folds: int | None = None
    cv_fold: int = 0
    cv_seed: int = 0
    # train on train + validation pooled, test left out, no validation split (medtriage.data.folds.all_labelled);
    # served as `scripts/export_ensemble.py --refit`, calibrated on the recipe's out-of-fold scores
    refit: bool = False


INTENSITY_MODES = ("fixed", "per_image")


@dataclass(unsafe_hash=True)  # hashable: ensemble members must share one spec but for its size
class PreprocessSpec:
    """What happens to decoded pixels inside the model (`model.preprocess`; recorded in the model package)."""

    size: int = 64
    in_channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    # "fixed": (x - mean) / std for every image. "per_image": each image standardised by its own mean and
    # std, which removes the brightness and contrast a site's windowing and detector give its images
    # (per-site intensity harmonisation that needs no site label, so it also holds for a site never seen).
    intensity: str = "fixed"

    def __post_init__(self):
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"unknown intensity normalisation {self.intensity!r}",
                where="model.preprocess.intensity",
                hint=f"use one of {list(INTENSITY_MODES)}",
            )


# Networks whose stem keeps its own stride (medtriage.model.networks builds them without model.stem_stride)
FIXED_STEM_NETWORKS, FIXED_STEM_STRIDE = ("densenet121", "efficientnet-b0"), 2


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a key of medtriage.model.networks.BACKBONES
    stem_stride: int = FIXED_STEM_STRIDE
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)


@dataclass
class TrainerConfig:
    device: Device = Device.auto
    precision: Precision = Precision.bf16
    channels_last: bool = True  # NHWC training steps (evaluation too on CUDA)
    loader: Loader = Loader.torch
    num_threads: int | None = None  # torch intra-op threads on CPU (None = torch default)
    augment_on: AugmentOn = AugmentOn.cpu
    cache_on_device: bool = True  # augment_on=device on CUDA: hold the training split in GPU memory
    compile: bool = False  # torch.compile the training step
    lr_scaling: LrScaling = LrScaling.none
    lr_reference_batch: int = 256  # global batch at which trainer.lr applies unscaled
    max_epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    imbalance: Imbalance = Imbalance.weighted_loss
    early_stopping_patience: int | None = None  # epochs without a better val AUC
    eval_batch_size: int = 256
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms (CPU runs repeat exactly)
    resume: bool = False  # continue the latest interrupted run of this experiment
    resume_from: str | None = None  # a last.pt, or a run folder holding checkpoints/last.pt (resumes it: resume implied)
    limit_train_batches: int | None = None  # per epoch (quick runs)
    stop_after_epochs: int | None = None  # end this process after N epochs, as an interruption would
    # Recipe knobs (medtriage.training.losses); the defaults leave training as it was.
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # mixup Beta(alpha, alpha) on training batches; 0 = off
    ema_decay: float | None = None  # EMA of weights (e.g. 0.999); evaluated and checkpointed when set
    ema_warmup: EmaWarmup = EmaWarmup.ramp  # how the EMA starts (EmaWarmup)
    schedule: Schedule = Schedule.cosine  # learning-rate schedule over max_epochs (medtriage.training.optimiser)
    one_cycle_pct_start: float = 0.3  # schedule=one_cycle: share of the steps spent raising the rate
    # Which weights the run ends with (final metrics, exported package). "last" needs no validation choice, which
    # matters when validation AUC saturates near 1 and shares images with train.
    weights: Weights = Weights.best


@dataclass
class TrackingConfig:
    uri: str = MISSING  # MLFLOW_TRACKING_URI when set, else sqlite:///<root>/mlflow.db
    experiment_name: str = "medtriage"
    run_name: str | None = None
    log_checkpoint: bool = True  # best.pt as a run artifact


@dataclass
class PathsConfig:
    root: str = MISSING  # project root (absolute)
    data_dir: str = MISSING
    cache_dir: str = MISSING  # pools built from sources
    output_dir: str = MISSING  # this job's folder (Hydra's runtime output dir)
    runs_dir: str = MISSING  # where runs of all experiments live (resume looks here)


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
    # Test-time augmentation inside the served graph (model/averaging.py): none | shift (one-pixel shifts) | affine
    # (also small turns and zooms) | flip (also the mirror image; not for chest X-rays, and only for models trained
    # with data.augment.hflip=true).
    # Calibration, thresholds and the OOD fit see the averaged output.
    tta: str = "none"
    calibrate: bool = True  # allow temperature scaling; kept only where it lowers cross-validated ECE on validation
    ece_bins: int = 15
    # Out-of-distribution score as a second ONNX output (export/ood.py): fitted on training features,
    # thresholded so that this share of validation images is flagged.
    ood: bool = True
    ood_false_alarm_rate: float = 0.01
    ood_fit_images: int = 4000  # training images the distance is fitted on (a random subset when there are more)
    parity_tolerance: float = 1e-4  # max |p_onnx - p_torch| on validation images; above it the export fails
    parity_images: int = 64  # validation images used for the parity check
    opset: int = 18
    log_to_mlflow: bool = True  # log the package as artifacts of the run
    register_model: bool = True  # register a new MLflow model version per export
    # Tile models (trained on a pool with pathology.json): how `medtriage score` turns tile probabilities into
    # one slide score; slide thresholds are chosen on validation slides aggregated the same way.
    slide_aggregation: str = "top_k"  # top_k | mean
    slide_top_k: int = 5


@dataclass
class CrossValidationConfig:
    """`scripts/cross_validate.py` (medtriage.workflows.cross_validation): folds of train+val, trainings at a time."""

    folds: int = 3
    jobs: int = 1


@dataclass
class TrainConfig:
    name: str = "pneumonia_sites"  # experiment name: output folder and default run name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cv: CrossValidationConfig = field(default_factory=CrossValidationConfig)


# Values the schema's types admit but no run can use: (test, what is allowed). Unchecked, a zero batch size or a
# negative learning rate ends in a library's traceback (an evaluation batch size of 0 only after the first epoch, an
# OOD fit on 0 images only after the whole training), a negative early-stopping patience ends every run after its
# first epoch, and a minimum learning-rate ratio above 1 or a negative mixup alpha trains a different recipe without a word.
_COUNT, _POSITIVE, _NON_NEGATIVE, _FRACTION = (
    (lambda v: v >= 1, "1 or more"),
    (lambda v: v > 0, "above 0"),
    (lambda v: v >= 0, "0 or more"),
    (lambda v: 0 <= v <= 1, "between 0 and 1"),
)
VALUE_RANGES = {
    "data.batch_size": _COUNT,
    "data.num_workers": _NON_NEGATIVE,
    "data.limit": _COUNT,  # null: every image
    "data.cv_folds": (lambda v: v >= 2, "2 or more, or null for no cross-validation fold"),
    "data.augment.prob": _FRACTION,
    "data.augment.noise_std": _NON_NEGATIVE,
    "data.augment.gamma": _NON_NEGATIVE,
    "data.augment.stain_sigma": _NON_NEGATIVE,
    "data.augment.stain_bias": _NON_NEGATIVE,
    "data.tiles.patients_per_site": _COUNT,
    "data.tiles.tiles_per_slide": _COUNT,
    "data.tiles.tile_size": _COUNT,
    "data.tiles.tumour_slide_fraction": _FRACTION,
    "data.tiles.tumour_tile_fraction": _FRACTION,
    "model.stem_stride": _COUNT,
    "model.preprocess.size": _COUNT,
    "model.preprocess.std": _POSITIVE,
    "trainer.num_threads": (_COUNT[0], "1 or more, or null for torch's default"),
    "trainer.max_epochs": _COUNT,
    "trainer.lr": _POSITIVE,
    "trainer.lr_reference_batch": _COUNT,
    "trainer.weight_decay": _NON_NEGATIVE,
    "trainer.warmup_epochs": _NON_NEGATIVE,
    "trainer.min_lr_ratio": _FRACTION,
    "trainer.one_cycle_pct_start": (lambda v: 0 < v < 1, "above 0 and below 1"),
    "trainer.mixup_alpha": _NON_NEGATIVE,
    "trainer.early_stopping_patience": (_COUNT[0], "1 or more, or null for no early stopping"),
    "trainer.eval_batch_size": _COUNT,
    "trainer.limit_train_batches": _COUNT,  # null: every batch
    "trainer.stop_after_epochs": (_COUNT[0], "1 or more, or null to run to trainer.max_epochs"),
    "export.ece_bins": _COUNT,
    "export.ood_fit_images": _COUNT,
    "export.parity_tolerance": _NON_NEGATIVE,
    "export.parity_images": _COUNT,
    "cv.folds": (lambda v: v >= 2, "2 or more"),
    "cv.jobs": _COUNT,
}


def check_values(cfg) -> None:
    """Fail before any data work on every key no field of the schema has, every value out of its range or not finite,
    on label names that are not two or more distinct classes or a positive label none of them, on a fold beyond
    data.cv_folds, and on stain jitter of grey-level images (which fails inside the loader's workers otherwise)."""
    wrong = _unknown_keys(cfg) | value_problems(cfg)
    wrong |= {key: text for key, text in (_label_problems(cfg) | _combination_problems(cfg)).items() if key not in wrong}
    if wrong:
        raise ConfigError(
            "values no run can use: " + "; ".join(wrong.values()),
            where="config",
            hint="change them on the command line or in the experiment file",
        )


def _unknown_keys(cfg) -> dict[str, str]:
    """Every key of `cfg` that no field of TrainConfig has. Hydra's `+key=value` adds one past the schema (its own
    message for a misspelt key suggests it): `+trainer.lr_warmup=2` would train, the setting meant read by nothing."""
    found = {}

    def visit(node: dict, fields: dict, prefix: str) -> None:
        for key, value in node.items():
            if key not in fields:
                found[prefix + key] = f"{prefix}{key} (no such setting in medtriage/config/schema.py)"
            elif isinstance(value, dict) and isinstance(fields[key], dict):
                visit(value, fields[key], f"{prefix}{key}.")

    visit(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(OmegaConf.structured(TrainConfig)), "")
    return found


def value_problems(cfg, group: str = "") -> dict[str, str]:
    """Every number of `cfg` that is not finite, and every value out of its VALUE_RANGES range (only the keys of
    `group`, e.g. "export", when given): key -> what is wrong."""
    wrong = _not_finite(cfg)
    for key, (allowed, text) in VALUE_RANGES.items():
        if not key.startswith(group):
            continue
        value = OmegaConf.select(cfg, key)
        if value is not None and key not in wrong and not allowed(value):
            wrong[key] = f"{key}={value} (must be {text})"
    return wrong


def _combination_problems(cfg) -> dict[str, str]:
    """Values each allowed alone but not together."""
    found = {}
    folds, fold = cfg.data.cv_folds, cfg.data.cv_fold
    if folds is not None and folds >= 2 and not 0 <= fold < folds:
        found["data.cv_fold"] = f"data.cv_fold={fold} (must be one of 0..{folds - 1} with data.cv_folds={folds})"
    trainer = cfg.trainer
    if trainer.schedule == Schedule.cosine and trainer.warmup_epochs >= trainer.max_epochs:  # the rate would never decay
        found["trainer.warmup_epochs"] = (
            f"trainer.warmup_epochs={trainer.warmup_epochs} with trainer.max_epochs={trainer.max_epochs} "
            "(the cosine schedule's warm-up must end before the last epoch)"
        )
    if cfg.data.site_stratified and trainer.imbalance == Imbalance.sampler:  # two orders for one epoch's images
        found["data.site_stratified"] = (
            "data.site_stratified=true with trainer.imbalance=sampler (site-stratified batches and class-balanced "
            "sampling exclude each other: use trainer.imbalance=weighted_loss)"
        )
    if cfg.model.name in FIXED_STEM_NETWORKS and cfg.model.stem_stride != FIXED_STEM_STRIDE:  # recorded, never used
        found["model.stem_stride"] = (
            f"model.stem_stride={cfg.model.stem_stride} with model.name={cfg.model.name} (its stem's stride is its own, "
            f"{FIXED_STEM_STRIDE}: a ResNet's stem takes model.stem_stride)"
        )
    augment, channels = cfg.data.augment, cfg.model.preprocess.in_channels
    if augment.enabled and augment.hflip and cfg.trainer.augment_on == AugmentOn.cpu:  # the CPU transforms have no flip
        found["data.augment.hflip"] = (
            "data.augment.hflip=true with trainer.augment_on=cpu (the flip runs on the device only: trainer.augment_on=device)"
        )
    if augment.enabled and (augment.stain_sigma or augment.stain_bias) and channels != 3:
        found["stain"] = f"data.augment.stain_sigma/stain_bias with model.preprocess.in_channels={channels} (stain jitter needs RGB: 3)"
    if cfg.export.enabled and cfg.export.tta == "flip" and not trained_with_flips(cfg):
        found["export.tta"] = (
            "export.tta=flip for a model trained without left-right flips (data.augment.hflip=true with "
            "trainer.augment_on=device), to which mirrored views are out of distribution"
        )
    return found


def trained_with_flips(train_config: Mapping) -> bool:
    """Whether a run of this training config (a resolved dict as checkpoints store it, or the composed config) saw
    left-right mirrored images: only then may the export average mirrored views. Missing keys read as their defaults."""
    data, trainer = train_config.get("data") or {}, train_config.get("trainer") or {}
    augment = data.get("augment") or {}
    augment_on = trainer.get("augment_on", AugmentOn.cpu)
    on_device = getattr(augment_on, "value", augment_on) == AugmentOn.device.value  # the CPU transforms have no flip
    return bool(augment.get("enabled", AugmentConfig.enabled) and augment.get("hflip", AugmentConfig.hflip) and on_device)


def _label_problems(cfg) -> dict[str, str]:
    """Label names that are not two or more distinct classes, and a positive label that is none of them (which the
    export would otherwise refuse only after the whole training)."""
    labels, positive = list(cfg.data.label_names), cfg.export.positive_label
    found = {}
    if len(labels) < 2 or len(set(labels)) < len(labels):
        found["data.label_names"] = f"data.label_names={labels} (must name 2 or more distinct classes, in label order)"
    if positive is not None and positive not in labels:
        found["export.positive_label"] = (
            f"export.positive_label={positive!r} (must be one of data.label_names {labels}, or null for the last)"
        )
    return found


def _not_finite(cfg) -> dict[str, str]:
    """Every number of the config that is nan or infinite (a range test lets inf through: an infinite learning rate
    trains to nan and fails only when the first evaluation meets its outputs)."""
    found = {}

    def visit(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{prefix[:-1]}[{index}].")
        elif isinstance(node, float) and not math.isfinite(node):
            found[prefix[:-1]] = f"{prefix[:-1]}={node} (must be a finite number)"

    visit(OmegaConf.to_container(cfg, resolve=False), "")
    return found
