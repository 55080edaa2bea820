"""Training throughput: this engine's data path and step vs a plain MONAI-tutorial loop, in one run.

(a) the engine as `trainer=gpu` (or `trainer=cpu trainer.augment_on=device` on CPU) runs it: the
    resized split from the on-disk cache, batches gathered from it, batched augmentation on the
    device, and on CUDA bf16 autocast, channels_last, fused AdamW and the split held in GPU memory;
(b) a plain loop as MONAI's tutorials write it: a Dataset that reads and decodes each DICOM file
    with pydicom every time it is asked, per-image MONAI transforms (scale, resize, affine,
    intensity, noise), a torch DataLoader, fp32, no cache.

Both train the same network on the same site pool at the same size and batch. Each is warmed up,
then timed in windows of a few steps, (a) and (b) taking turns, so a busy neighbour slows both
alike; figures are medians over the windows. Busy fraction: CUDA event time inside the steps (or,
on CPU, wall time inside the steps) over the window's wall time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from medtriage.data.manifest import MANIFEST_FILE, Manifest, load_manifest
from medtriage.data.split_cache import cache_path, persistent_split
from medtriage.training.throughput import EpochClock

SECTION = "## Training"


@dataclass
class Settings:
    networks: tuple[str, ...] = ("resnet18", "densenet121")
    size: int = 224
    batch_size: int = 256
    windows: int = 5
    steps_per_window: int = 10
    warmup_steps: int = 5
    plain_workers: int = 8
    compile: bool = False  # also time ResNet-18 with trainer.compile=true


@dataclass
class Row:
    network: str
    engine: float  # images/s
    plain: float
    engine_busy: float
    plain_busy: float
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.engine / self.plain


def quick_settings(cuda: bool) -> Settings:
    if cuda:
        return Settings(windows=3, steps_per_window=5, warmup_steps=3)
    return Settings(batch_size=16, windows=5, steps_per_window=3, warmup_steps=1, plain_workers=0)


# --- data -----------------------------------------------------------------------------------------

def site_pool(pool_dir: Path | None, work_dir: Path, limit: int) -> tuple[Manifest, Path]:
    """The 3-site pool and its DICOM folders: an existing one, else a small one built from the npz."""
    from medtriage.data.pool import INPUTS_FILE, build_sites_pool

    if pool_dir and (pool_dir / MANIFEST_FILE).is_file() and (pool_dir / INPUTS_FILE).is_file():
        sites_dir = Path(json.loads((pool_dir / INPUTS_FILE).read_text())["sites_dir"])
        if sites_dir.is_dir():
            return load_manifest(pool_dir), sites_dir
    from medtriage.data.sources.dicom_sites import make_sites

    sites_dir, pool_dir = work_dir / f"sites_{limit}", work_dir / f"pool_{limit}"
    if not (pool_dir / MANIFEST_FILE).is_file():
        make_sites(out_dir=sites_dir, limit=limit)
    return build_sites_pool(sites_dir, pool_dir, verbose=False), sites_dir


class DecodingDataset(torch.utils.data.Dataset):
    """The tutorial way: every access reads and decodes the DICOM file, then runs the transforms."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import pydicom

        pixels = pydicom.dcmread(self.paths[i]).pixel_array.astype(np.float32)
        image = self.transform(pixels[None])
        return torch.as_tensor(np.asarray(image), dtype=torch.float32), int(self.labels[i])


def tutorial_transforms(augment, size: int):
    from monai import transforms as T

    p = augment.prob
    return T.Compose([
        T.ScaleIntensity(), T.Resize((size, size)),
        T.RandAffine(prob=p, rotate_range=np.deg2rad(augment.rotate_deg), scale_range=augment.scale,
                     translate_range=augment.translate * size, padding_mode="border"),
        T.RandScaleIntensity(factors=augment.intensity_scale, prob=p),
        T.RandShiftIntensity(offsets=augment.intensity_shift, prob=p),
        T.RandGaussianNoise(prob=p, std=augment.noise_std),
    ])


# --- the two loops --------------------------------------------------------------------------------

def engine_config(network: str, settings: Settings, manifest: Manifest, sites_dir: Path, cuda: bool, compile_model: bool = False):
    from medtriage.config import compose_train_config

    trainer = ["trainer=gpu"] if cuda else ["trainer=cpu", "trainer.augment_on=device"]
    return compose_train_config([
        "experiment=pneumonia_sites", f"model={network}", f"model.preprocess.size={settings.size}", *trainer,
        f"trainer.compile={str(compile_model).lower()}", f"data.batch_size={settings.batch_size}",
        f"data.pool_dir={manifest.pool_dir}", f"data.sites_dir={sites_dir}", "paths.output_dir=unused",
    ])


@dataclass
class Loop:
    """A training loop cut in two: fetching the next batch (data path) and training on it (the step)."""

    next_batch: Callable[[], tuple]
    train_on: Callable[[tuple], int]  # returns the number of images


def engine_loop(cfg, manifest: Manifest, device: torch.device) -> Loop:
    """The real engine (medtriage.training.fit.Fit): its loader and its training step."""
    from medtriage.config import to_plain_dict
    from medtriage.training.checkpoint import model_from_config
    from medtriage.training.fit import Fit

    model = model_from_config(to_plain_dict(cfg))
    split = persistent_split(manifest, "train", model.preprocess)
    fit = Fit(cfg, model, {"train": split}, device)
    fit.model.train()

    def epochs():
        for epoch in count(1):
            if fit.device_augment:
                fit.device_augment.reseed(epoch)
            yield fit.loader(epoch)

    batches = chain.from_iterable(epochs())

    def train_on(batch) -> int:
        fit._step(*batch)
        return len(batch[1])

    return Loop(lambda: next(batches), train_on)


def plain_loop(network: str, settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device, augment) -> Loop:
    """The tutorial loop: decode + transforms in a DataLoader, fp32, plain AdamW."""
    from medtriage.networks import PreprocessSpec, build_triage_net

    rows = manifest.split("train")
    dataset = DecodingDataset([sites_dir / p for p in rows["path"]], rows["label"].to_numpy(), tutorial_transforms(augment, settings.size))
    workers = settings.plain_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = build_triage_net(network, 2, PreprocessSpec(size=settings.size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    batches: Iterator = chain.from_iterable(loader for _ in count())

    def train_on(batch) -> int:
        images, labels = batch
        loss = criterion(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(labels)

    return Loop(lambda: next(batches), train_on)


def timed_windows(loops: dict[str, Loop], settings: Settings, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median images/s and busy fraction per loop; the loops take turns window by window."""
    for loop in loops.values():
        for _ in range(settings.warmup_steps):
            loop.train_on(loop.next_batch())
    rates: dict[str, list[float]] = {name: [] for name in loops}
    busy: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(settings.windows):
        for name, loop in loops.items():
            figures = _window(loop, settings.steps_per_window, device)
            rates[name].append(figures["train/images_per_s"])
            busy[name].append(figures.get("train/gpu_busy_fraction", figures.get("train/cpu_compute_fraction")))
    return {name: (statistics.median(rates[name]), statistics.median(busy[name])) for name in loops}


def _window(loop: Loop, n_steps: int, device: torch.device) -> dict[str, float]:
    """Fetching a batch is outside the clock's step: the busy fraction shows what waiting for data costs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = EpochClock(device)
    for _ in range(n_steps):
        batch = loop.next_batch()
        clock.step_begins()
        clock.step_ends(loop.train_on(batch))
    return clock.summary()


# --- the parts on their own -----------------------------------------------------------------------

def cache_start_seconds(manifest: Manifest, size: int) -> tuple[float, float]:
    """Seconds to get the resized training split: resizing it (first run) vs reading the stored one."""
    from medtriage.networks import Preprocess, PreprocessSpec

    preprocess = Preprocess(PreprocessSpec(size=size))
    cache_path(manifest, "train", preprocess).unlink(missing_ok=True)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        persistent_split(manifest, "train", preprocess)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def data_path_loops(settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device, augment) -> dict[str, Loop]:
    """Augmented batches without a model: decode + MONAI per image; cache + MONAI per image; cache + batched."""
    from medtriage.data.datasets import CachedDataset, train_transforms
    from medtriage.networks import Preprocess, PreprocessSpec
    from medtriage.training.batch_loader import CachedBatchLoader
    from medtriage.training.gpu_augment import BatchAugment

    split = persistent_split(manifest, "train", Preprocess(PreprocessSpec(size=settings.size)))
    rows = manifest.split("train")
    plain = DecodingDataset([sites_dir / p for p in rows["path"]], rows["label"].to_numpy(), tutorial_transforms(augment, settings.size))
    per_image = CachedDataset(split, train_transforms(augment, settings.size))

    def endless(dataset, workers: int):
        loader = torch.utils.data.DataLoader(dataset, settings.batch_size, shuffle=True, drop_last=True,
                                             num_workers=workers, persistent_workers=workers > 0)
        return chain.from_iterable(loader for _ in count())

    batched = CachedBatchLoader(split, settings.batch_size, device, drop_last=True, on_device=True)
    batched_stream = chain.from_iterable(batched.batches(torch.randperm(len(split))) for _ in count())
    batch_augment = BatchAugment(augment, device)
    streams = {"decode + MONAI per image (b)": endless(plain, settings.plain_workers),
               "cache + MONAI per image": endless(per_image, 0)}

    def consume(batch) -> int:
        return len(batch[1])

    def augment_on_device(batch) -> int:
        batch_augment(batch[0])
        return len(batch[1])

    loops = {name: Loop(lambda s=stream: next(s), consume) for name, stream in streams.items()}
    loops["cache + batched augmentation on the device (a)"] = Loop(lambda: next(batched_stream), augment_on_device)
    return loops


def data_path_rates(settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device, augment) -> dict[str, float]:
    loops = data_path_loops(settings, manifest, sites_dir, device, augment)
    return {name: rate for name, (rate, _) in timed_windows(loops, settings, device).items()}


def compile_rates(settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device) -> dict[str, dict]:
    """ResNet-18 engine steps with trainer.compile off and on: seconds of the first step, then images/s (interleaved)."""
    loops, first_step = {}, {}
    for compiled in (False, True):
        name = f"compile={'on' if compiled else 'off'}"
        cfg = engine_config("resnet18", settings, manifest, sites_dir, device.type == "cuda", compile_model=compiled)
        loops[name] = engine_loop(cfg, manifest, device)
        started = time.perf_counter()
        loops[name].train_on(loops[name].next_batch())
        first_step[name] = time.perf_counter() - started
    figures = timed_windows(loops, settings, device)
    return {name: {"first_step_s": first_step[name], "images_per_s": rate, "busy": busy} for name, (rate, busy) in figures.items()}


# --- the whole benchmark --------------------------------------------------------------------------

def run_benchmark(settings: Settings, pool_dir: Path | None, work_dir: Path, pool_limit: int | None = None) -> dict:
    from tqdm.auto import tqdm

    from medtriage.benchmarking import machine
    from medtriage.config import AugmentConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    manifest, sites_dir = site_pool(pool_dir, work_dir, pool_limit or 600)
    result = {"machine": machine(), "device": _device_name(device), "torch": torch.__version__, "settings": vars(settings),
              "date": dt.date.today().isoformat(), "pool": _pool_line(manifest), "rows": [], "load": os.getloadavg()[0]}
    result["cache_seconds"] = cache_start_seconds(manifest, settings.size)
    result["data_path"] = data_path_rates(settings, manifest, sites_dir, device, AugmentConfig())
    for network in tqdm(settings.networks, desc="networks", unit="net"):
        cfg = engine_config(network, settings, manifest, sites_dir, device.type == "cuda")
        loops = {"engine": engine_loop(cfg, manifest, device),
                 "plain": plain_loop(network, settings, manifest, sites_dir, device, cfg.data.augment)}
        figures = timed_windows(loops, settings, device)
        result["rows"].append(Row(network, figures["engine"][0], figures["plain"][0], figures["engine"][1], figures["plain"][1]))
    if settings.compile:
        result["compile"] = compile_rates(settings, manifest, sites_dir, device)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} torch threads"


def _pool_line(manifest: Manifest) -> str:
    train = manifest.split("train")
    sizes = sorted({f"{h}x{w}" for h, w in zip(train["height"], train["width"])})
    return (f"{len(train)} training images from {len(manifest.sites)} sites ({', '.join(manifest.sites)}), "
            f"acquired at {', '.join(sizes)}, fingerprint {manifest.fingerprint[:12]}")
