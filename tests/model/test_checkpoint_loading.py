"""Checkpoints that do not fit their network, saves that fail, and pixels of another type than the model reads."""

from __future__ import annotations

import copy

import pytest
import torch

from medtriage.config import compose_train_config, to_plain_dict
from medtriage.errors import InputError, PackageError
from medtriage.model.averaging import averaged
from medtriage.model.checkpoint import config_value, load_model, model_from_config, read_checkpoint, save_checkpoint
from medtriage.model.networks import PreprocessSpec, build_triage_net


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs")
    return to_plain_dict(compose_train_config(["experiment=pneumoniamnist", "model=resnet10", f"paths.output_dir={output_dir}"]))


def changed(config: dict, section: str, key: str, value) -> dict:
    other = copy.deepcopy(config)
    other[section][key] = value
    return other


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path):
    save_checkpoint(tmp_path / "last.pt", epoch=1)
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint(tmp_path / "last.pt", epoch=2, scheduler=lambda step: step)  # not picklable
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.parametrize(
    ("section", "key", "value", "names"),
    [
        ("model", "name", "resnet18", "missing, e.g. backbone.layer1.1"),
        ("data", "label_names", ["a", "b", "c"], "backbone.fc.weight: [2, 512] in the checkpoint, [3, 512] in the network"),
    ],
)
def test_weights_of_another_network_are_a_clear_error_naming_the_config_keys(tmp_path, config, section, key, value, names):
    weights = model_from_config(config).state_dict()
    path = save_checkpoint(tmp_path / "best.pt", model=weights, config=changed(config, section, key, value))
    with pytest.raises(PackageError, match="do not fit the network") as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message and names in message and "data.label_names" in message and "model.name" in message


def test_unexpected_weights_are_refused_not_ignored(tmp_path, config):
    weights = model_from_config(config).state_dict() | {"backbone.extra.weight": torch.zeros(2)}
    path = save_checkpoint(tmp_path / "best.pt", model=weights, config=config)
    with pytest.raises(PackageError, match="1 unexpected, e.g. backbone.extra.weight"):
        load_model(path)


def test_a_checkpoint_without_weights_or_config_is_a_clear_error(tmp_path, config):
    path = save_checkpoint(tmp_path / "last.pt", epoch=3, config=config)
    with pytest.raises(PackageError, match=r"needs 'model' and 'config', has \['config', 'epoch'\]"):
        load_model(path)


def test_float64_pixels_score_as_their_float32_values():
    torch.manual_seed(0)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=32)).eval()
    pixels = torch.rand(2, 1, 40, 36)
    with torch.no_grad():
        assert torch.equal(net(pixels.double()), net(pixels))
        shifted = averaged(net, "shift")
        assert torch.equal(shifted(pixels.double()), shifted(pixels))


def test_integer_pixels_are_refused_rather_than_read_on_a_0_to_255_scale():
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=32)).eval()
    with pytest.raises(InputError, match=r"torch.uint8, expected float32 in \[0, 1\]"):
        net(torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8))


@pytest.mark.parametrize("dotted", ["model.stem_stride", "model.preprocess.mean", "data.label_names"])
def test_a_checkpoint_whose_config_lacks_a_key_names_it(tmp_path, config, dotted):
    weights = model_from_config(config).state_dict()
    broken = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = broken
    for key in parents:
        node = node[key]
    del node[last]
    path = save_checkpoint(tmp_path / "best.pt", model=weights, config=broken)
    with pytest.raises(PackageError, match=f"config lacks {dotted}:") as refused:
        load_model(path)
    assert refused.value.where == str(path)


def test_a_dotted_key_is_looked_up_in_a_plain_config_and_a_none_value_is_present():
    config = {"data": {"pool_dir": None, "label_names": ["a", "b"]}, "model": "resnet10"}
    assert config_value(config, "data.label_names") == ["a", "b"]
    assert config_value(config, "data.pool_dir", default="absent") is None  # set to None: present
    assert config_value(config, "data.holdout_site", default="absent") == "absent"
    assert config_value(config, "model.name") is None  # a value where a group is expected: no such key
    assert config_value(None, "data") is None
