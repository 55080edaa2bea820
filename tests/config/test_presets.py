"""Config presets say only what differs: a group file never repeats its schema default, the GPU preset
never repeats the CPU preset it builds on, and every model option is selectable by name."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtriage.config import (
    DataConfig,
    ExportConfig,
    ModelConfig,
    TrackingConfig,
    TrainerConfig,
    compose_train_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"data": DataConfig, "model": ModelConfig, "trainer": TrainerConfig, "export": ExportConfig, "tracking": TrackingConfig}


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf, interpolations left as written."""
    if OmegaConf.is_dict(node):
        for key in node:
            yield from leaves(node._get_node(key), f"{prefix}{key}.")
    else:
        yield prefix[:-1], node._value() if hasattr(node, "_value") else node


def repeats(written, base) -> list[str]:
    """Keys of `written` whose value equals the one `base` already gives (an option's `name` is its identity)."""
    return [
        key
        for key, value in leaves(written)
        if key != "name" and not OmegaConf.is_interpolation(written, key) and OmegaConf.select(base, key, throw_on_missing=False) == value
    ]


@pytest.mark.parametrize(
    "path", sorted(p for g in SCHEMAS for p in (CONFIGS / g).glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_a_group_file_sets_only_what_differs_from_its_schema(path):
    written = OmegaConf.load(path)
    written.pop("defaults", None)
    if path.read_text().startswith("# @package _global_"):  # a preset on top of another: compare with what it builds on
        base = compose_train_config([f"{path.parent.name}=cpu"])
    else:
        base = OmegaConf.structured(SCHEMAS[path.parent.name])
    assert repeats(written, base) == []


def test_the_check_can_fail():
    assert repeats(OmegaConf.create({"lr": 0.001, "max_epochs": 9}), OmegaConf.structured(TrainerConfig)) == ["lr"]


def test_the_gpu_preset_is_the_cpu_preset_plus_its_differences():
    cpu, gpu = compose_train_config(["trainer=cpu"]), compose_train_config(["trainer=gpu"])
    assert gpu.trainer.early_stopping_patience == cpu.trainer.early_stopping_patience == 3  # inherited, written once
    assert (gpu.trainer.device.value, gpu.trainer.precision.value, gpu.data.batch_size) == ("cuda", "bf16", 256)
    assert (cpu.trainer.device.value, cpu.trainer.precision.value, cpu.data.batch_size) == ("cpu", "fp32", 64)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_every_model_option_selects_its_network_by_name(name):
    assert compose_train_config([f"model={name}"]).model.name == name
