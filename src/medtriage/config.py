"""Structured training config: dataclasses registered in Hydra's ConfigStore.

`configs/train.yaml` starts from the `train_schema` node, so every group file (data/, model/,
trainer/, ...) is merged onto a typed dataclass: a misspelt key or a value of the wrong type
fails when the config is composed, naming the key. `compose_train_config` gives the same config
without `@hydra.main` (tests, notebooks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medtriage.data.sources.pathology_tiles import SyntheticTilesConfig
from medtriage.export.config import ExportConfig

CONFIG_DIR_NAME = "configs"


class Device(Enum):
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast on CUDA only; CPU runs stay fp32


class Imbalance(Enum):
    none = "none"
    weighted_loss = "weighted_loss"  # cross-entropy weighted by inverse class frequency
    sampler = "sampler"  # class-balanced sampling of training images


class AugmentOn(Enum):
    cpu = "cpu"  # per-image MONAI transforms in the loader
    device = "device"  # one batched affine + intensity jitter on the training device (medtriage.training.gpu_augment)


class LrScaling(Enum):
    none = "none"  # trainer.lr as given
    linear = "linear"  # lr * global_batch / lr_reference_batch
    sqrt = "sqrt"  # lr * sqrt(global_batch / lr_reference_batch)


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
    hflip: bool = False  # random left-right flip (trainer.augment_on=device only); off for chest X-rays (heart side)
    # H&E stain jitter of RGB tiles (medtriage.io.stain.augment_stain): concentration scale 1 ± sigma, shift ± bias; 0 = off.
    stain_sigma: float = 0.0
    stain_bias: float = 0.0


@dataclass
class DataConfig:
    source: str = MISSING  # a key of medtriage.data.datasets.SOURCES
    pool_dir: str = MISSING  # pooled manifest + pixel cache (built when missing)
    npz_path: Optional[str] = None  # source=npz
    sites_dir: Optional[str] = None  # source=sites (made by scripts/make_sites.py)
    label_names: List[str] = field(default_factory=lambda: ["normal", "pneumonia"])
    pool_seed: int = 0  # patient-level split seed of the pool builder
    batch_size: int = 64
    num_workers: int = 0
    limit: Optional[int] = None  # at most this many images per split (quick runs)
    persistent_cache: bool = True  # keep resized splits on disk under <pool_dir>/resized (medtriage.data.split_cache)
    site_stratified: bool = False  # every batch (and every rank's shard) holds the sites in proportion (training.samplers)
    allow_audit_failure: bool = False  # train despite a failed leakage audit (the result is still logged)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiles: SyntheticTilesConfig = field(default_factory=SyntheticTilesConfig)  # source=tiles
    holdout_site: Optional[str] = None  # leave-one-site-out: this site's rows all become test, other sites keep train/val


@dataclass
class PreprocessConfig:
    """In-model preprocessing (medtriage.networks.PreprocessSpec); exported with the network."""

    size: int = 64
    in_channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    intensity: str = "fixed"  # or "per_image": each image standardised by its own mean and std


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a key of medtriage.networks.BACKBONES
    stem_stride: int = 2
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class TrainerConfig:
    device: Device = Device.auto
    precision: Precision = Precision.bf16
    channels_last: bool = True  # CUDA only
    loader: Loader = Loader.torch
    num_threads: Optional[int] = None  # torch intra-op threads on CPU (None = torch default)
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
    early_stopping_patience: Optional[int] = None  # epochs without a better val AUC
    eval_batch_size: int = 256
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms (CPU runs repeat exactly)
    resume: bool = False  # continue the latest interrupted run of this experiment
    resume_from: Optional[str] = None  # a last.pt, or a run folder holding checkpoints/last.pt
    limit_train_batches: Optional[int] = None  # per epoch (quick runs)
    stop_after_epochs: Optional[int] = None  # end this process after N epochs, as an interruption would
    # Recipe knobs (medtriage.training.recipes); the defaults leave training as it was.
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # mixup Beta(alpha, alpha) on training batches; 0 = off
    ema_decay: Optional[float] = None  # EMA of weights (e.g. 0.999); evaluated and checkpointed when set


@dataclass
class TrackingConfig:
    uri: str = MISSING  # MLFLOW_TRACKING_URI when set, else sqlite:///<root>/mlflow.db
    experiment_name: str = "medtriage"
    run_name: Optional[str] = None
    log_checkpoint: bool = True  # best.pt as a run artifact


@dataclass
class PathsConfig:
    root: str = MISSING  # project root (absolute)
    data_dir: str = MISSING
    cache_dir: str = MISSING  # pools built from sources
    output_dir: str = MISSING  # this job's folder (Hydra's runtime output dir)
    runs_dir: str = MISSING  # where runs of all experiments live (resume looks here)


@dataclass
class TrainConfig:
    name: str = "pneumonia_sites"  # experiment name: output folder and default run name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def find_project_root(start: str | Path | None = None) -> str:
    """MEDTRIAGE_ROOT, else the nearest folder upwards holding `configs/train.yaml`, else cwd."""
    if os.environ.get("MEDTRIAGE_ROOT"):
        return str(Path(os.environ["MEDTRIAGE_ROOT"]).resolve())
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_DIR_NAME / "train.yaml").is_file():
            return str(folder)
    return str(here)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", find_project_root)


def to_plain_dict(cfg: Any) -> dict:
    """Fully resolved config as plain Python types (enums as strings): what checkpoints store."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)


def compose_train_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `scripts/train.py` would get, composed without running a Hydra app.

    `paths.output_dir` points at Hydra's job folder; outside a Hydra app pass it as an override.
    """
    from hydra import compose, initialize_config_dir

    config_dir = Path(find_project_root()) / CONFIG_DIR_NAME
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=list(overrides or []))


register_configs()
