"""Test-time views averaged inside the network: which views, their mean, and the package they export to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtriage.errors import ConfigError
from medtriage.model.averaging import EnsembleNet, averaged, shift_step, view_count, views
from medtriage.model.networks import PreprocessSpec, build_triage_net


def tiny_net(seed: int = 0, size: int = 28):
    torch.manual_seed(seed)
    return build_triage_net("resnet10", 2, PreprocessSpec(size=size)).eval()


def test_shift_views_move_the_image_by_one_step_each_way_with_edges_replicated():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    shifted = views(x, "shift", step=2)
    assert len(shifted) == 9 and torch.equal(shifted[0], x)  # the image itself first
    spots = {tuple(torch.nonzero(v[0, 0])[0].tolist()) for v in shifted}
    assert spots == {(4 + dy, 4 + dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)}
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # columns 0..7
    assert views(ramp, "shift", step=1)[1][0, 0, 0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]  # edge column repeated, not wrapped


def test_affine_views_add_small_turns_and_zooms_about_the_centre_to_the_shifts():
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 8:24, 14:18] = 1.0  # an upright bar through the centre
    affine = views(x, "affine", step=1)
    assert view_count("affine") == len(affine) == 13 and view_count("shift") == 9
    for view, reference in zip(affine[:9], views(x, "shift", step=1)):
        assert torch.equal(view, reference)  # the shift grid first, unchanged
    turned_left, turned_right, zoomed_out, zoomed_in = affine[9:]
    assert torch.allclose(turned_left, torch.flip(turned_right, dims=[3]), atol=1e-5)  # opposite turns mirror each other
    assert not torch.allclose(turned_left, x, atol=0.1)
    centre = (slice(None), slice(None), slice(15, 17), slice(15, 17))
    assert torch.allclose(turned_left[centre], x[centre], atol=1e-5)  # turned about the centre
    assert zoomed_out.sum() < x.sum() < zoomed_in.sum()  # the bar covers less of the image zoomed out, more zoomed in


def test_the_shift_is_one_source_pixel_of_a_28px_image_at_any_model_size():
    assert shift_step(28) == 1 and shift_step(64) == 2 and shift_step(128) == 5 and shift_step(8) == 1


def test_shift_tta_is_the_mean_probability_over_the_nine_views():
    net = tiny_net()
    pixels = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(net.backbone(v), -1) for v in views(net.preprocess(pixels), "shift", 1)]).mean(0)
        got = averaged(net, "shift")(pixels).exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, torch.softmax(net(pixels), -1), atol=1e-4)  # the views do change the output


def test_no_tta_is_the_network_itself_and_unknown_views_are_refused():
    net = tiny_net()
    assert averaged(net, "none") is net
    with pytest.raises(ConfigError, match="unknown test-time augmentation 'rotate'") as err:
        averaged(net, "rotate")
    assert "shift" in str(err.value)


def test_the_averaged_output_of_one_member_is_its_own_probability_without_views():
    net = tiny_net(3)
    pixels = torch.rand(2, 1, 30, 26)
    with torch.no_grad():
        assert torch.allclose(EnsembleNet([net])(pixels).exp(), torch.softmax(net(pixels), -1), atol=1e-6)


def test_members_of_different_input_sizes_each_see_the_image_resized_and_shifted_at_their_own_size():
    small, large = tiny_net(1, size=28), tiny_net(2, size=84)  # a one-pixel shift of a 28 px source: 1 and 3 px
    ensemble = EnsembleNet([small, large, tiny_net(3, size=28)], "shift")
    pixels = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        alone = [averaged(net, "shift")(pixels).exp() for net in ensemble.members]
        assert torch.allclose(ensemble(pixels).exp(), torch.stack(alone).mean(0), atol=1e-6)  # each member weighs alike
    assert ensemble.sizes == [28, 84] and ensemble.preprocess is large.preprocess  # the largest resize: model.json's size
    assert ensemble.describe()["shift_px"] == [1, 3]
    assert [(sorted(part.sizes), count) for part, count in ensemble.size_groups()] == [([28], 2), ([84], 1)]


AFFINE = {"rotations_deg": [-5.0, 5.0], "zooms": [0.95, 1.05]}


@pytest.mark.slow
@pytest.mark.parametrize(("tta", "described"), [("shift", {"count": 9}), ("affine", {"count": 13, **AFFINE})])
def test_a_package_with_views_serves_the_averaged_probabilities_with_its_ood_score(tmp_path, tta, described):
    """Exported with views and the OOD output: ONNX Runtime reproduces the torch averaged probabilities (the turns
    and zooms as GridSample), the OOD score reads the image itself through the one network, and model.json says which
    views the graph averages."""
    from medtriage.config.schema import ExportConfig
    from medtriage.data.sources.medmnist import PNEUMONIA_LABELS, as_chw
    from medtriage.evaluation.predictions import Predictions
    from medtriage.export.ood import feature_taps
    from medtriage.export.run import export_model
    from medtriage.io.npz import read_npz
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from tests.export.tiny_package import NPZ, linear_probe_net, ood_data

    net = linear_probe_net(32)
    served = averaged(net, tta)
    images, labels = read_npz(NPZ)["val"]
    pick = np.random.default_rng(0).choice(len(labels), 200, replace=False)
    pixels = np.stack([as_chw(image) for image in images[pick]])
    with torch.no_grad():
        logits = served(torch.from_numpy(pixels)).numpy()
    cfg = ExportConfig(models_dir=str(tmp_path), name="tta", parity_images=8, log_to_mlflow=False, register_model=False)
    result = export_model(
        served,
        cfg,
        label_names=PNEUMONIA_LABELS,
        val=Predictions(logits, labels[pick], np.array(["a"] * len(pick))),
        parity_images=list(pixels),
        ood_data=ood_data(list(pixels), train_images=200),
    )
    expected_views = {"views": tta, "shift_px": 1, **described, "in_graph": True}
    assert result.meta["preprocessing"]["test_time_augmentation"] == expected_views
    assert result.meta["parity"]["max_abs_diff"] <= 1e-4 and "ood" in result.meta
    package = load_package(result.package_dir)
    probabilities = Predictor(package).probabilities(pixels[:8])
    temperature = result.meta["calibration"]["temperature"]
    with torch.no_grad():
        expected = torch.softmax(served(torch.from_numpy(pixels[:8])) / temperature, -1).numpy()
        taps, _, _ = feature_taps(net)
        expected_ood = result.served.ood_score([taps(torch.from_numpy(pixels[:8]))]).numpy()
        _, ood = result.served(torch.from_numpy(pixels[:8]))
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    np.testing.assert_allclose(ood.numpy(), expected_ood, rtol=1e-5)
