import random

import numpy as np
import pytest
import torch

from medtriage.config import compose_train_config, to_plain_dict
from medtriage.errors import PackageError
from medtriage.model.checkpoint import load_model, model_from_config, save_checkpoint
from medtriage.model.predict import predict_logits
from medtriage.training.resume import restore_rng_state, rng_state


@pytest.fixture
def config(tmp_path):
    cfg = compose_train_config(["experiment=pneumoniamnist", "model=resnet10", f"paths.output_dir={tmp_path}"])
    return to_plain_dict(cfg)


def test_load_model_rebuilds_the_trained_network(tmp_path, config):
    model = model_from_config(config).eval()
    path = save_checkpoint(tmp_path / "best.pt", model=model.state_dict(), config=config, epoch=3, rng=rng_state())
    loaded, loaded_config = load_model(path)
    images = torch.rand(5, 1, 40, 33)  # any size: the model resizes
    assert loaded_config == config and not loaded.training
    np.testing.assert_array_equal(predict_logits(loaded, images), predict_logits(model, images))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(tmp_path / "last.pt", rng=state)
    restore_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path, config):
    path = save_checkpoint(tmp_path / "best.pt", model=model_from_config(config).state_dict(), config=config)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PackageError, match="best.pt"):
        load_model(path)


def test_final_checkpoint_is_last_when_asked_else_best(tmp_path):
    from medtriage.model.checkpoint import final_checkpoint

    save_checkpoint(tmp_path / "last.pt", epoch=2)
    assert final_checkpoint(tmp_path, "best").name == "last.pt"  # no epoch was ever best
    save_checkpoint(tmp_path / "best.pt", epoch=1)
    assert final_checkpoint(tmp_path, "best").name == "best.pt"
    assert final_checkpoint(tmp_path, "last").name == "last.pt"


def test_a_resume_on_fewer_gpus_than_the_run_saved_restores_the_generators_it_has(monkeypatch):
    """Before, every saved CUDA state was set, and a checkpoint of an 8-GPU node resumed on a 1-GPU workstation failed
    with an IndexError (torch sets state i on device i). CPU-only here: torch.cuda's device count is the machine's."""
    import torch

    from medtriage.training.resume import restore_rng_state, rng_state

    state = {**rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8) + k for k in range(8)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    restore_rng_state(state)
    assert len(restored) == 1 and int(restored[0][0]) == 0


def test_no_images_give_logits_of_no_rows_that_join_a_gather(config):
    """A rank whose shard of a small split is empty: its part must concatenate with the others' `[N, K]`."""
    model = model_from_config(config).eval()
    images = torch.rand(3, 1, 28, 28)
    empty = predict_logits(model, images[3:])
    assert empty.shape == (0, 2) and empty.dtype == np.float32
    assert np.concatenate([predict_logits(model, images), empty]).shape == (3, 2)
