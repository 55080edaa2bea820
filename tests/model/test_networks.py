import pytest
import torch

from medtriage.errors import ConfigError
from medtriage.model.networks import BACKBONES, PreprocessSpec, build_triage_net


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_network_takes_any_image_size(name):
    model = build_triage_net(name, num_classes=2, spec=PreprocessSpec(size=32)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 50, 70)).shape == (2, 2)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_networks_batch_norm_forgets_its_initial_statistics_within_fifty_steps(name):
    # The evaluated and exported network uses the running statistics; a short run must have replaced the initial ones
    # (EfficientNet's TensorFlow momentum, 0.01, kept 60% of them after 50 steps: validation AUC at chance).
    norms = [m for m in build_triage_net(name, 2, PreprocessSpec(size=32)).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert norm.momentum is not None and (1 - norm.momentum) ** 50 < 0.01, norm


def test_resize_is_identity_at_training_size():
    model = build_triage_net("resnet10", 2, PreprocessSpec(size=32))
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(model.preprocess.resize(x), x)


def test_unknown_network_lists_known_ones():
    with pytest.raises(ConfigError, match="densenet121"):
        build_triage_net("resnet999", 2, PreprocessSpec())


def test_per_image_intensity_removes_a_sites_brightness_and_contrast():
    model = build_triage_net("resnet10", 2, PreprocessSpec(size=32, intensity="per_image")).eval()
    fixed = build_triage_net("resnet10", 2, PreprocessSpec(size=32)).eval()
    fixed.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 40, 40) * 0.5
    windowed = 0.3 + 1.6 * x  # another site's window: brighter, more contrast
    with torch.no_grad():
        assert torch.allclose(model(windowed), model(x), atol=1e-4)
        assert not torch.allclose(fixed(windowed), fixed(x), atol=1e-2)  # the fixed normalisation keeps the difference
        assert torch.isfinite(model(torch.full((1, 1, 40, 40), 0.7))).all()  # a blank image stays finite


def test_per_image_intensity_exports_to_onnx_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    from medtriage.export.onnx import CalibratedNet, export_onnx, parity

    net = build_triage_net("resnet10", 2, PreprocessSpec(size=32, intensity="per_image")).eval()
    path = tmp_path / "model.onnx"
    export_onnx(CalibratedNet(net, 1.3), path)
    diff, count = parity(path, CalibratedNet(net, 1.3), [torch.rand(1, 45, 37).numpy() * 0.4 + 0.2, torch.rand(1, 32, 32).numpy()])
    assert count == 2 and diff < 1e-4


def test_unknown_intensity_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="per_image"):
        PreprocessSpec(intensity="histogram")


def test_upsampling_happens_inside_the_onnx_graph(tmp_path):
    """A 64 px model fed 28 px pixels: the exported graph resizes (a Resize node) and matches PyTorch."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from medtriage.export.onnx import CalibratedNet, export_onnx, parity

    net = build_triage_net("resnet10", 2, PreprocessSpec(size=64)).eval()
    assert net.preprocess(torch.rand(2, 1, 28, 28)).shape == (2, 1, 64, 64)
    path = tmp_path / "model.onnx"
    export_onnx(CalibratedNet(net, 1.0), path)
    assert any(node.op_type == "Resize" for node in onnx.load(str(path)).graph.node)
    diff, count = parity(path, CalibratedNet(net, 1.0), [torch.rand(1, 28, 28).numpy() for _ in range(3)])
    assert count == 3 and diff < 1e-4
