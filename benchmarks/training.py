"""Training throughput: this engine's data path and step vs a plain MONAI-tutorial loop, in one run.

    python -m benchmarks.training [--quick] [--networks resnet18 densenet121] [--compile] [--pool data/pool/pneumonia_sites]

(a) the engine as `trainer=gpu` (or `trainer=cpu trainer.augment_on=device` on CPU) runs it: the
    resized split from the on-disk cache, batches gathered from it, batched augmentation on the
    device, and on CUDA bf16 autocast, channels_last, fused AdamW and the split held in GPU memory;
(b) a plain loop as MONAI's tutorials write it: a Dataset that reads and decodes each DICOM file
    with pydicom every time it is asked, per-image MONAI transforms (scale, resize, affine,
    intensity, noise), a torch DataLoader, fp32, no cache.

Both train the same network on the same site pool at the same size and batch. Each is warmed up,
then timed in windows of a few steps, (a) and (b) taking turns, so a busy neighbour slows both
alike; figures are medians over the windows. Busy fraction: CUDA event time inside the steps (or,
on CPU, wall time inside the steps) over the window's wall time. Runs on CUDA when present, else on
CPU (use --quick there: batch 16, short windows). Without an existing site pool it writes a small
one under outputs/benchmark_training/. The `## Training` section of docs/benchmarks.md is replaced
after each network that leaves more to time, saying what that is (a run stopped at a time limit
keeps what it timed), and again at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import chain, count
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    BENCHMARKS_DOC,
    ROOT,
    command_line,
    header,
    interleaved,
    machine,
    publish,
    today,
    verdict,
    write_section,
)
from medtriage.config import AugmentConfig, compose_train_config, to_plain_dict
from medtriage.data.manifest import MANIFEST_FILE, Manifest, load_manifest
from medtriage.data.torch.split_cache import cache_path, persistent_split
from medtriage.training.optimiser import native_bf16
from medtriage.training.throughput import EpochClock

SECTION = "## Training"
# Targets on one H100 for ResNet-18 at 224: engine images/s, engine over plain loop, GPU busy fraction.
TARGET_SIZE, TARGET_IMAGES_S, TARGET_RATIO, TARGET_BUSY = 224, 15_000, 3.0, 0.90


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
    precision: bool = False  # also time ResNet-18 in fp32 NCHW against bf16 channels_last training steps


def quick_settings(cuda: bool) -> Settings:
    if cuda:
        return Settings(windows=3, steps_per_window=5, warmup_steps=3)
    return Settings(batch_size=16, windows=5, steps_per_window=3, warmup_steps=1, plain_workers=0)


# --- data -----------------------------------------------------------------------------------------


def site_pool(pool_dir: Path | None, work_dir: Path, limit: int) -> tuple[Manifest, Path]:
    """The 3-site pool and its DICOM folders: an existing one, else a small one built from the npz."""
    from medtriage.data.pool import INPUTS_FILE, build_sites_pool
    from medtriage.data.simulate.sites import make_sites

    if pool_dir and (pool_dir / MANIFEST_FILE).is_file() and (pool_dir / INPUTS_FILE).is_file():
        sites_dir = Path(json.loads((pool_dir / INPUTS_FILE).read_text())["sites_dir"])
        if sites_dir.is_dir():
            return load_manifest(pool_dir), sites_dir
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
    return T.Compose(
        [
            T.ScaleIntensity(),
            T.Resize((size, size)),
            T.RandAffine(
                prob=p,
                rotate_range=np.deg2rad(augment.rotate_deg),
                scale_range=augment.scale,
                translate_range=augment.translate * size,
                padding_mode="border",
            ),
            T.RandScaleIntensity(factors=augment.intensity_scale, prob=p),
            T.RandShiftIntensity(offsets=augment.intensity_shift, prob=p),
            T.RandGaussianNoise(prob=p, std=augment.noise_std),
        ]
    )


def decoding_dataset(manifest: Manifest, sites_dir: Path, augment, size: int) -> DecodingDataset:
    rows = manifest.split("train")
    return DecodingDataset([sites_dir / p for p in rows["path"]], rows["label"].to_numpy(), tutorial_transforms(augment, size))


def endless(dataset, batch_size: int, workers: int) -> Iterator:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    return chain.from_iterable(loader for _ in count())


# --- the two loops --------------------------------------------------------------------------------


def engine_config(network: str, settings: Settings, manifest: Manifest, sites_dir: Path, cuda: bool, trainer_overrides=()):
    trainer = ["trainer=gpu"] if cuda else ["trainer=cpu", "trainer.augment_on=device"]
    return compose_train_config(
        [
            "experiment=pneumonia_sites",
            f"model={network}",
            f"model.preprocess.size={settings.size}",
            *trainer,
            *trainer_overrides,
            f"data.batch_size={settings.batch_size}",
            f"data.pool_dir={manifest.pool_dir}",
            f"data.sites_dir={sites_dir}",
            "paths.output_dir=unused",
        ]
    )


@dataclass
class Loop:
    """A training loop cut in two: fetching the next batch (data path) and training on it (the step)."""

    next_batch: Callable[[], tuple]
    train_on: Callable[[tuple], int]  # returns the number of images


def engine_loop(cfg, manifest: Manifest, device: torch.device) -> Loop:
    """The real engine (medtriage.training.loop.TrainingLoop): its loader and its public training step."""
    from medtriage.model.checkpoint import model_from_config
    from medtriage.training.loop import TrainingLoop

    model = model_from_config(to_plain_dict(cfg))
    fit = TrainingLoop(cfg.trainer, cfg.data, model, {"train": persistent_split(manifest, "train", model.preprocess)}, device)
    fit.model.train()

    def epochs():
        for epoch in count(1):
            if fit.device_augment:
                fit.device_augment.reseed(epoch)
            yield fit.loader(epoch)

    batches = chain.from_iterable(epochs())

    def train_on(batch) -> int:
        fit.train_step(*batch)
        return len(batch[1])

    return Loop(lambda: next(batches), train_on)


def plain_loop(network: str, settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device, augment) -> Loop:
    """The tutorial loop: decode + transforms in a DataLoader, fp32, plain AdamW."""
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    batches = endless(decoding_dataset(manifest, sites_dir, augment, settings.size), settings.batch_size, settings.plain_workers)
    torch.manual_seed(0)
    model = build_triage_net(network, 2, PreprocessSpec(size=settings.size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()

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
    busy: dict[str, list[float]] = {name: [] for name in loops}

    def window(name: str, loop: Loop) -> Callable[[], int]:
        def run() -> int:  # fetching a batch is outside the clock's step: busy shows what waiting for data costs
            clock = EpochClock(device)
            for _ in range(settings.steps_per_window):
                batch = loop.next_batch()
                clock.step_begins()
                clock.step_ends(loop.train_on(batch))
            figures = clock.summary()  # synchronises CUDA, so the window's wall time is complete
            busy[name].append(figures.get("train/gpu_busy_fraction", figures.get("train/cpu_compute_fraction")))
            return clock.images

        return run

    if device.type == "cuda":
        torch.cuda.synchronize()
    timings = interleaved({name: window(name, loop) for name, loop in loops.items()}, settings.windows, warmup=0)
    return {name: (timings[name].rate, statistics.median(busy[name])) for name in loops}


# --- the parts on their own -----------------------------------------------------------------------


def cache_start_seconds(manifest: Manifest, size: int) -> tuple[float, float]:
    """Seconds to get the resized training split: resizing it (first run) vs reading the stored one."""
    from medtriage.model.networks import Preprocess, PreprocessSpec

    preprocess = Preprocess(PreprocessSpec(size=size))
    cache_path(manifest, "train", preprocess).unlink(missing_ok=True)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        persistent_split(manifest, "train", preprocess)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def data_path_rates(settings: Settings, manifest: Manifest, sites_dir: Path, device: torch.device, augment) -> dict[str, float]:
    """Augmented batches without a model: decode + MONAI per image; cache + MONAI per image; cache + batched."""
    from medtriage.data.torch.datasets import CachedDataset, train_transforms
    from medtriage.model.networks import Preprocess, PreprocessSpec
    from medtriage.training.augmentation import BatchAugment
    from medtriage.training.batch_loader import CachedBatchLoader

    split = persistent_split(manifest, "train", Preprocess(PreprocessSpec(size=settings.size)))
    streams = {
        "decode + MONAI per image (b)": endless(
            decoding_dataset(manifest, sites_dir, augment, settings.size), settings.batch_size, settings.plain_workers
        ),
        "cache + MONAI per image": endless(CachedDataset(split, train_transforms(augment, settings.size)), settings.batch_size, 0),
    }
    batched = CachedBatchLoader(split, settings.batch_size, device, drop_last=True, on_device=True)
    batched_stream = chain.from_iterable(batched.batches(torch.randperm(len(split))) for _ in count())
    batch_augment = BatchAugment(augment, device)

    def augment_on_device(batch) -> int:
        batch_augment(batch[0])
        return len(batch[1])

    loops = {name: Loop(lambda s=stream: next(s), lambda batch: len(batch[1])) for name, stream in streams.items()}
    loops["cache + batched augmentation on the device (a)"] = Loop(lambda: next(batched_stream), augment_on_device)
    return {name: rate for name, (rate, _) in timed_windows(loops, settings, device).items()}


# Engine settings timed against each other on ResNet-18 (`--compile`, `--precision`): name -> trainer overrides.
COMPILE_VARIANTS = {"compile=off": ["trainer.compile=false"], "compile=on": ["trainer.compile=true"]}
PRECISION_VARIANTS = {
    "fp32, NCHW": ["trainer.precision=fp32", "trainer.channels_last=false"],
    "bf16, channels_last": ["trainer.precision=bf16", "trainer.channels_last=true"],
}


def variant_rates(variants: dict[str, list[str]], settings: Settings, manifest: Manifest, sites_dir: Path, device) -> dict[str, dict]:
    """ResNet-18 engine steps under each variant: seconds of the first step, then images/s (interleaved)."""
    loops, first_step = {}, {}
    for name, overrides in variants.items():
        loops[name] = engine_loop(
            engine_config("resnet18", settings, manifest, sites_dir, device.type == "cuda", overrides), manifest, device
        )
        started = time.perf_counter()
        loops[name].train_on(loops[name].next_batch())
        first_step[name] = time.perf_counter() - started
    figures = timed_windows(loops, settings, device)
    return {name: {"first_step_s": first_step[name], "images_per_s": rate, "busy": busy} for name, (rate, busy) in figures.items()}


def run_benchmark(
    settings: Settings, pool_dir: Path | None, work_dir: Path, pool_limit: int = 600, measured: Callable[[dict], None] | None = None
) -> dict:
    """Every figure of the section. `measured(result so far)` is called after each network that leaves stages to time,
    with those under "pending", so a run stopped at a machine's time limit leaves what it timed."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    result = {
        "machine": machine(),
        "date": today(),
        "device": _device_name(device),
        "cuda": device.type == "cuda",
        "native_bf16": native_bf16(device),
        "settings": vars(settings),
    }
    manifest, sites_dir = site_pool(pool_dir, work_dir, pool_limit)
    result["pool"] = _pool_line(manifest)
    result["cache_seconds"] = cache_start_seconds(manifest, settings.size)
    result["data_path"] = data_path_rates(settings, manifest, sites_dir, device, AugmentConfig())
    result["rows"] = []
    for network in tqdm(settings.networks, desc="networks", unit="net"):
        cfg = engine_config(network, settings, manifest, sites_dir, device.type == "cuda")
        figures = timed_windows(
            {
                "engine": engine_loop(cfg, manifest, device),
                "plain": plain_loop(network, settings, manifest, sites_dir, device, cfg.data.augment),
            },
            settings,
            device,
        )
        result["rows"].append(
            {
                "network": network,
                "engine": figures["engine"][0],
                "plain": figures["plain"][0],
                "engine_busy": figures["engine"][1],
                "plain_busy": figures["plain"][1],
            }
        )
        pending = _pending(settings, len(result["rows"]))
        if measured and pending:  # with nothing left, the caller writes the finished result
            measured({**result, "pending": pending})
    if settings.compile:
        result["compile"] = variant_rates(COMPILE_VARIANTS, settings, manifest, sites_dir, device)
    if settings.precision:
        result["precision"] = variant_rates(PRECISION_VARIANTS, settings, manifest, sites_dir, device)
    return result


def _pending(settings: Settings, networks_done: int) -> list[str]:
    """The stages still to be timed once `networks_done` networks have been."""
    extras = [name for name, on in (("trainer.compile", settings.compile), ("precision", settings.precision)) if on]
    return [*settings.networks[networks_done:], *extras]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def _pool_line(manifest: Manifest) -> str:
    train = manifest.split("train")
    sizes = sorted({f"{h}x{w}" for h, w in zip(train["height"], train["width"])})
    return (
        f"{len(train)} training images from {len(manifest.sites)} sites ({', '.join(manifest.sites)}), "
        f"acquired at {', '.join(sizes)}, fingerprint {manifest.fingerprint[:12]}"
    )


# --- the section ----------------------------------------------------------------------------------


def markdown(result: dict, command: str) -> str:
    s, cuda = result["settings"], result["cuda"]
    busy_name = (
        "GPU busy fraction (CUDA event time inside the steps / wall time)"
        if cuda
        else "CPU compute fraction (wall time inside the steps / wall time; the rest is waiting for data)"
    )
    lines = [
        SECTION,
        "",
        *header(command, f"{result['machine']}; device: {result['device']}", date=result.get("date")),
        f"- data: {result['pool']}; upsampled to {s['size']}x{s['size']}; batch {s['batch_size']}",
        f"- timing: {s['warmup_steps']} warm-up step(s), then {s['windows']} windows of {s['steps_per_window']} steps per "
        "loop, the loops taking turns; medians over the windows",
        *_cut_short(result),
        "",
        "(a) this engine with everything on (`trainer=gpu`; on CPU `trainer=cpu trainer.augment_on=device`): resized split "
        "read from the on-disk cache, batches gathered from it, batched affine + intensity augmentation on the device; on "
        "CUDA also bf16 autocast, channels_last, fused AdamW and the split held in GPU memory. (b) a plain MONAI-tutorial "
        "loop: a Dataset that decodes each DICOM file with pydicom on every access, per-image MONAI transforms, a torch "
        f"DataLoader with {s['plain_workers']} worker(s), fp32, no cache. Same network, size, batch and augmentation settings.",
        "",
        "| network | (a) engine, images/s | (b) plain loop, images/s | a/b | (a) busy | (b) busy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['network']} | {r['engine']:.1f} | {r['plain']:.1f} | {r['engine'] / r['plain']:.2f} | "
        f"{r['engine_busy']:.0%} | {r['plain_busy']:.0%} |"
        for r in result["rows"]
    ]
    lines += ["", f"Busy: {busy_name}.", ""]
    if all(r["plain_busy"] > 0.85 for r in result["rows"]):
        lines += [
            "Both loops spend most of their time inside the step here, so the network's own compute sets the pace "
            "and a/b says little about the data path; the next table shows the data path alone.",
            "",
        ]
    return "\n".join(lines + _data_path(result) + _start_up(result) + _compile(result) + _precision(result) + _verdicts(result))


def _cut_short(result: dict) -> list[str]:
    pending = result.get("pending")
    if not pending:
        return []
    return [f"- written before {', '.join(pending)} had been timed: the run stopped there, or had not finished when this was written"]


def _verdicts(result: dict) -> list[str]:
    targets = (
        f"Targets on one H100, ResNet-18 at {TARGET_SIZE}: (a) ≥ {TARGET_IMAGES_S:,} images/s, "
        f"a/b ≥ {TARGET_RATIO:g}, GPU busy ≥ {TARGET_BUSY:.0%}."
    )
    row = next((r for r in result["rows"] if r["network"] == "resnet18"), None)
    size = result["settings"]["size"]
    if not result["cuda"] or row is None or size != TARGET_SIZE:
        why = (
            "this run had no CUDA device"
            if not result["cuda"]
            else "this run did not time ResNet-18"
            if row is None
            else f"this run used {size}x{size} images"
        )
        return [
            targets,
            f"- not assessed: {why}; the same command runs unchanged on CUDA (without `--quick`: batch 256, longer windows)",
            "",
        ]
    ratio = row["engine"] / row["plain"]
    return [
        targets,
        f"- (a) {row['engine']:,.0f} images/s: {verdict(row['engine'] >= TARGET_IMAGES_S)}",
        f"- a/b {ratio:.2f}: {verdict(ratio >= TARGET_RATIO)}",
        f"- GPU busy {row['engine_busy']:.0%}: {verdict(row['engine_busy'] >= TARGET_BUSY)}",
        f"- device: {result['device']} (the targets are for an H100)",
        "",
    ]


def _data_path(result: dict) -> list[str]:
    lines = [
        "Data path alone (augmented batches at the same size and batch, no model), images/s:",
        "",
        "| data path | images/s |",
        "|---|---:|",
    ]
    return lines + [f"| {name} | {rate:.0f} |" for name, rate in result["data_path"].items()] + [""]


def _start_up(result: dict) -> list[str]:
    first, second = result["cache_seconds"]
    size = result["settings"]["size"]
    return [
        f"Start-up, resized training split at {size}x{size}: first run (resize every image, store "
        f"`<pool>/resized/*.npy`) {first:.2f} s; second run (read the stored split) {second:.2f} s "
        f"({first / max(second, 1e-9):.0f}x faster).",
        "",
    ]


def _compile(result: dict) -> list[str]:
    if "compile" not in result:
        return []
    lines = [
        "`trainer.compile` (ResNet-18, engine (a)):",
        "",
        "| setting | first step, s | images/s after warm-up | busy |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {f['first_step_s']:.1f} | {f['images_per_s']:.1f} | {f['busy']:.0%} |" for name, f in result["compile"].items()]
    return lines + [""]


def _precision(result: dict) -> list[str]:
    if "precision" not in result:
        return []
    figures = result["precision"]
    baseline = figures[next(iter(PRECISION_VARIANTS))]["images_per_s"]
    lines = [
        "Training-step precision (ResNet-18, engine (a); `trainer.precision`, `trainer.channels_last`; weights, optimiser "
        f"and loss fp32 throughout; this CPU has native bf16: {'yes' if result.get('native_bf16') else 'no'}):",
        "",
        "| setting | first step, s | images/s after warm-up | vs fp32 | busy |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {f['first_step_s']:.1f} | {f['images_per_s']:.1f} | {f['images_per_s'] / baseline:.2f}x | {f['busy']:.0%} |"
        for name, f in figures.items()
    ]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few, short windows (CPU: batch 16)")
    parser.add_argument("--networks", nargs="+", default=list(Settings.networks))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the plain loop")
    parser.add_argument("--compile", action="store_true", help="also time ResNet-18 with trainer.compile=true")
    parser.add_argument("--precision", action="store_true", help="also time ResNet-18 with fp32 and with bf16 training steps")
    parser.add_argument("--pool", type=Path, default=ROOT / "data" / "pool" / "pneumonia_sites")
    parser.add_argument("--pool-limit", type=int, default=600, help="images of the site pool written when none exists")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_DOC)
    args = parser.parse_args(argv)
    settings = quick_settings(torch.cuda.is_available()) if args.quick else Settings()
    settings = replace(
        settings,
        networks=tuple(args.networks),
        size=args.size,
        compile=args.compile,
        precision=args.precision,
        batch_size=args.batch_size or settings.batch_size,
        plain_workers=settings.plain_workers if args.workers is None else args.workers,
    )
    command = command_line()

    def measured(so_far: dict) -> None:  # what is timed reaches the doc at once: a run may be stopped at a time limit
        write_section(markdown(so_far, command), args.doc)

    result = run_benchmark(settings, args.pool, ROOT / "outputs" / "benchmark_training", args.pool_limit, measured)
    publish(markdown(result, command), args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
