"""The `## Training` section of docs/benchmarks.md, from a medtriage.training.speed_benchmark result."""

from __future__ import annotations

from medtriage.training.speed_benchmark import SECTION

TARGETS = "Targets on one H100: ≥ 15,000 images/s for ResNet-18 at 224, ≥ 3× the plain loop, GPU busy ≥ 90%."


def markdown(result: dict, command: str) -> str:
    s = result["settings"]
    cuda = "CUDA" in result["device"]
    busy_name = "GPU busy fraction (CUDA event time inside the steps / wall time)" if cuda else \
        "CPU compute fraction (wall time inside the steps / wall time; the rest is waiting for data)"
    lines = [
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}; device: {result['device']}; torch {result['torch']}  ",
        f"Date: {result['date']}; 1-min load average at start {result['load']:.1f}  ",
        f"Data: {result['pool']}; upsampled to {s['size']}x{s['size']}; batch {s['batch_size']}  ",
        f"Timing: {s['warmup_steps']} warm-up step(s), then {s['windows']} windows of {s['steps_per_window']} steps per loop, "
        "(a) and (b) taking turns; medians over the windows.",
        "",
        "(a) this engine with everything on (`trainer=gpu`; on CPU `trainer=cpu trainer.augment_on=device`): resized split "
        "read from the on-disk cache, batches gathered from it, batched affine + intensity augmentation on the device; on "
        "CUDA also bf16 autocast, channels_last, fused AdamW and the split held in GPU memory. (b) a plain MONAI-tutorial "
        f"loop: a Dataset that decodes each DICOM file with pydicom on every access, per-image MONAI transforms, a torch "
        f"DataLoader with {s['plain_workers']} worker(s), fp32, no cache. Same network, size, batch and augmentation settings.",
        "",
        "| network | (a) engine, images/s | (b) plain loop, images/s | a/b | (a) busy | (b) busy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row.network} | {row.engine:.1f} | {row.plain:.1f} | {row.ratio:.2f} | "
                     f"{row.engine_busy:.0%} | {row.plain_busy:.0%} |")
    lines += ["", f"Busy: {busy_name}.", ""]
    if all(row.plain_busy > 0.85 for row in result["rows"]):
        lines += ["Both loops spend most of their time inside the step, so the network's own compute sets the pace here "
                  "and a/b stays near 1; what the data path saves shows in the next table, and counts once the step "
                  "is fast (a GPU).", ""]
    lines += _data_path(result) + _start_up(result) + _compile(result)
    if not cuda:
        lines += ["**GPU figures are not measured yet**: this run had no CUDA device. The same command runs unchanged on "
                  f"CUDA (without `--quick` it uses batch 256 and longer windows). {TARGETS}", ""]
    return "\n".join(lines)


def _data_path(result: dict) -> list[str]:
    lines = ["Data path alone (augmented batches at the same size and batch, no model), images/s:", "",
             "| data path | images/s |", "|---|---:|"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in result["data_path"].items()]
    return lines + [""]


def _start_up(result: dict) -> list[str]:
    first, second = result["cache_seconds"]
    size = result["settings"]["size"]
    return [f"Start-up, resized training split at {size}x{size}: first run (resize every image, store "
            f"`<pool>/resized/*.npy`) {first:.2f} s; second run (read the stored split) {second:.2f} s "
            f"({first / max(second, 1e-9):.0f}x faster).", ""]


def _compile(result: dict) -> list[str]:
    if "compile" not in result:
        return []
    lines = ["`trainer.compile` (ResNet-18, engine (a)):", "", "| setting | first step, s | images/s after warm-up | busy |",
             "|---|---:|---:|---:|"]
    for name, figures in result["compile"].items():
        lines.append(f"| {name} | {figures['first_step_s']:.1f} | {figures['images_per_s']:.1f} | {figures['busy']:.0%} |")
    return lines + [""]
