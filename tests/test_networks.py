import pytest
import torch

from medtriage.errors import ConfigError
from medtriage.networks import BACKBONES, PreprocessSpec, build_triage_net


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_network_takes_any_image_size(name):
    model = build_triage_net(name, num_classes=2, spec=PreprocessSpec(size=32)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 50, 70)).shape == (2, 2)


def test_resize_is_identity_at_training_size():
    model = build_triage_net("resnet10", 2, PreprocessSpec(size=32))
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(model.preprocess.resize(x), x)


def test_unknown_network_lists_known_ones():
    with pytest.raises(ConfigError, match="densenet121"):
        build_triage_net("resnet999", 2, PreprocessSpec())
