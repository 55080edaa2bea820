"""The structured config: every experiment composes, and a wrong key, type or value fails clearly."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from medtriage.config import Device, TrainConfig, compose_train_config, to_plain_dict
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.model.networks import BACKBONES


def compose(*overrides, tmp_path=None):
    extra = [f"paths.output_dir={tmp_path}", f"paths.runs_dir={tmp_path}/runs", f"paths.cache_dir={tmp_path}/pools"] if tmp_path else []
    return compose_train_config([*overrides, *extra])


@pytest.mark.parametrize("experiment", ["pneumonia_sites", "pneumoniamnist"])
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose(f"experiment={experiment}", tmp_path=tmp_path)
    plain = to_plain_dict(cfg)
    assert plain["name"] == experiment
    assert plain["model"]["name"] in BACKBONES
    assert plain["trainer"]["device"] in {d.value for d in Device}
    assert plain["paths"]["root"].startswith("/") and plain["tracking"]["uri"].startswith("sqlite:///")
    assert OmegaConf.get_type(cfg.trainer).__name__ == "TrainerConfig"  # typed, not a loose dict


def test_gpu_preset_asks_for_cuda_bf16_and_bigger_batches(tmp_path):
    cpu, gpu = compose("trainer=cpu", tmp_path=tmp_path), compose("trainer=gpu", tmp_path=tmp_path)
    assert (gpu.trainer.device, gpu.trainer.precision.value, gpu.trainer.loader.value) == (Device.cuda, "bf16", "thread")
    assert gpu.data.batch_size > cpu.data.batch_size


def test_tracking_uri_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert compose(tmp_path=tmp_path).tracking.uri == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = compose(tmp_path=tmp_path)
    assert cfg.tracking.uri == f"sqlite:///{cfg.paths.root}/mlflow.db"


def test_a_misspelt_key_names_the_key_and_the_config():
    with pytest.raises(ConfigCompositionException) as err:
        compose("trainer.max_epoch=3")
    assert "max_epoch" in str(err.value.__cause__) and "TrainerConfig" in str(err.value.__cause__)


def test_a_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose("trainer.max_epochs=three")
    assert "max_epochs" in str(err.value.__cause__)


def test_an_unknown_choice_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose("trainer.device=tpu")
    assert all(name in str(err.value.__cause__) for name in ("auto", "cpu", "cuda"))


def test_the_schema_rejects_unknown_keys_directly():
    schema = OmegaConf.structured(TrainConfig)
    with pytest.raises(ConfigKeyError, match="learning_rate"):
        OmegaConf.merge(schema, {"trainer": {"learning_rate": 0.1}})


def test_unknown_model_name_lists_known_ones_before_any_data_work(tmp_path):
    import medtriage.training

    cfg = compose("experiment=pneumoniamnist", "model.name=resnet999", "data.npz_path=/nonexistent.npz", tmp_path=tmp_path)
    with pytest.raises(ConfigError) as err:
        medtriage.training.run(cfg)
    assert err.value.where == "model.name" and all(name in str(err.value) for name in BACKBONES)


@pytest.mark.parametrize("network", ["densenet121", "efficientnet-b0"])
def test_a_stem_stride_a_network_does_not_take_is_refused_not_recorded_as_trained(network):
    from medtriage.config import check_values
    from medtriage.config.schema import FIXED_STEM_NETWORKS, FIXED_STEM_STRIDE

    with pytest.raises(ConfigError, match=f"model.stem_stride=1 with model.name={network}"):
        check_values(compose(f"model.name={network}", "model.stem_stride=1"))
    check_values(compose(f"model.name={network}", f"model.stem_stride={FIXED_STEM_STRIDE}"))
    check_values(compose("model.name=resnet18", "model.stem_stride=1"))  # a ResNet's stem takes it
    assert set(FIXED_STEM_NETWORKS) <= set(BACKBONES)


def test_the_networks_said_to_keep_their_stem_stride_are_built_alike_whatever_it_is():
    from medtriage.config.schema import FIXED_STEM_NETWORKS
    from medtriage.model.networks import build_backbone

    def shapes(network: str, stride: int) -> list:
        return [tuple(p.shape) for p in build_backbone(network, 1, 2, stride).parameters()]

    assert all(shapes(network, 1) == shapes(network, 2) for network in FIXED_STEM_NETWORKS)
    assert shapes("resnet18", 1) != shapes("resnet18", 2)  # a stem that takes it is built otherwise


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
    import medtriage.training

    cfg = compose("experiment=pneumoniamnist", "model=resnet10", "trainer.resume=true", tmp_path=tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        medtriage.training.run(cfg)
    assert str(tmp_path / "runs" / "pneumoniamnist") in str(err.value) and "resume_from" in str(err.value)


def test_missing_sites_folder_says_which_command_creates_it(tmp_path):
    import medtriage.training

    cfg = compose("experiment=pneumonia_sites", "model=resnet10", f"data.sites_dir={tmp_path}/no_sites", tmp_path=tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        medtriage.training.run(cfg)
    assert "no_sites" in str(err.value) and "scripts/make_sites.py" in str(err.value)


def test_missing_npz_names_the_file(tmp_path):
    import medtriage.training

    cfg = compose("experiment=pneumoniamnist", "model=resnet10", f"data.npz_path={tmp_path}/gone.npz", tmp_path=tmp_path)
    with pytest.raises(DataNotFoundError, match="gone.npz"):
        medtriage.training.run(cfg)
