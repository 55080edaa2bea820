"""An export refuses, by name and before writing anything, what the package could not state truthfully or would put
somewhere else: a package name that is not one folder name, an opset the graph is not written in, labels that are not
the graph's classes, a graph that fixes an axis model.json calls dynamic, a models folder that is a file, and re-export
overrides that cannot be read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medtriage.config.schema import ExportConfig
from medtriage.errors import ConfigError, PackageError
from medtriage.evaluation.predictions import Predictions
from medtriage.model.networks import Preprocess, PreprocessSpec, TriageNet

LABELS = ["normal", "pneumonia"]


def small_net(classes: int = 2) -> TriageNet:
    """A real TriageNet with a backbone small enough to export in well under a second."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    return TriageNet(Preprocess(PreprocessSpec(size=16, in_channels=1)), backbone).eval()


def export_small(net: TriageNet, tmp_path, logits_width: int = 2, name: str = "small", labels=LABELS):
    from medtriage.export.run import export_model

    rng = np.random.default_rng(0)
    val = Predictions(rng.normal(size=(40, logits_width)).astype(np.float32), np.arange(40) % 2, np.full(40, "site-a"))
    cfg = ExportConfig(models_dir=str(tmp_path / "models"), name=name, parity_images=2, log_to_mlflow=False, register_model=False)
    images = [rng.random((1, 20, 24), dtype=np.float32) for _ in range(2)]
    return export_model(net, cfg, label_names=labels, val=val, parity_images=images)


def reexport_config(*overrides: str):
    """A run's stored config plus command-line overrides, merged as a re-export does (untyped)."""
    stored = OmegaConf.create({"export": {"name": "tiny"}, "data": {"pool_dir": "/no/such/pool"}})
    return OmegaConf.merge(stored, OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.parametrize("name", ["../outside/tiny", "a/b", "/abs/tiny", "..", "${oc.env:HOME}"])
def test_a_package_name_that_is_not_one_folder_name_is_refused_before_training(name):
    from medtriage.export.run import check_export_settings

    with pytest.raises(ConfigError) as refused:
        check_export_settings({"name": name})
    assert refused.value.where == "export.name" and "folder name" in refused.value.hint


def test_a_package_name_that_leaves_the_models_folder_makes_no_folder_anywhere(tmp_path):
    """export_model is also called with a typed config directly (tests, notebooks): the name is checked there too."""
    with pytest.raises(ConfigError) as refused:
        export_small(small_net(), tmp_path, name="../outside/tiny")
    assert refused.value.where == "export.name"
    assert list(tmp_path.iterdir()) == []


def test_an_ensembles_name_is_refused_before_any_member_is_fetched(tmp_path):
    from medtriage.export.ensemble import export_ensemble
    from medtriage.export.fold_ensemble import export_fold_ensemble, export_refit

    for export in (
        lambda: export_ensemble(["0" * 32], "../chest"),  # no such run: MLflow is never reached
        lambda: export_fold_ensemble(tmp_path, "../chest"),  # no fold models there: never looked for
        lambda: export_refit(tmp_path, [tmp_path], "../chest"),
    ):
        with pytest.raises(ConfigError) as refused:
            export()
        assert refused.value.where == "export.name"


@pytest.mark.parametrize("opset", [14, 17, 40])
def test_an_opset_the_graph_cannot_be_written_in_is_refused_before_training(opset):
    """The exporter writes opset 18 whatever lower (or unknown) opset it is asked for: model.json would say 17 or 40."""
    from medtriage.export.run import check_export_settings

    with pytest.raises(ConfigError) as refused:
        check_export_settings(reexport_config(f"export.opset={opset}").export)
    assert refused.value.where == "export.opset" and "18" in refused.value.hint


def test_an_opset_the_exporter_did_not_write_is_refused_where_the_graph_is_made(tmp_path):
    """export_onnx is also called without the settings check: it compares the graph's opset with the one asked for."""
    from medtriage.export.onnx import CalibratedNet, export_onnx

    with pytest.raises(ConfigError, match="asked for, but the exporter wrote opset 18") as refused:
        export_onnx(CalibratedNet(small_net()), tmp_path / "model.onnx", opset=17)
    assert refused.value.where == "export.opset"


def test_labels_that_are_not_the_networks_classes_are_refused_before_anything_is_exported(tmp_path):
    """A re-export with another pool (data.pool_dir=...) of three labels for a two-class network."""
    with pytest.raises(ConfigError, match="scores 3 classes, but the pool names 2 labels") as refused:
        export_small(small_net(classes=3), tmp_path, logits_width=3)
    assert refused.value.where == "data.pool_dir"
    assert list(tmp_path.iterdir()) == []


def test_a_graph_whose_output_width_is_not_the_label_count_is_never_written(tmp_path):
    """The scores the export calibrated on are two columns, but the network it exports outputs three."""
    with pytest.raises(PackageError, match="classes 2 in model.json, 3 in the graph"):
        export_small(small_net(classes=3), tmp_path, logits_width=2)
    assert not (tmp_path / "models" / "small").exists()


def test_an_exported_package_names_its_graphs_opset_channels_and_classes(tmp_path, monkeypatch):
    """... and the export reads them from its graph once (the graph may be large)."""
    from medtriage.export import onnx as exporting
    from medtriage.export.onnx import graph_signature

    reads = []
    monkeypatch.setattr(exporting, "graph_signature", lambda path: reads.append(path) or graph_signature(path))
    result = export_small(small_net(), tmp_path)
    assert len(reads) == 1
    graph = graph_signature(result.package_dir / "model.onnx")
    meta = result.meta
    assert graph == {
        "opset": meta["onnx"]["opset"],
        "channels": meta["input"]["channels"],
        "classes": len(meta["label_names"]),
        "input": ["batch", meta["input"]["channels"], "height", "width"],  # the axes model.json calls dynamic are free
        "output": ["batch", len(meta["label_names"])],
    }


@pytest.mark.parametrize("below", ["models", "models/deeper"])
def test_a_models_folder_that_is_a_file_is_a_package_error(tmp_path, below):
    from medtriage.export.package import next_version

    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(PackageError, match="is a file") as refused:
        next_version(tmp_path / below / "tiny")
    assert refused.value.where == str(tmp_path / below) and "another folder" in refused.value.hint
    assert (tmp_path / "models").read_text() == "not a folder"


@pytest.mark.parametrize("override", ["export.name=${oops", "export..name=x", "=x", "export.name"])
def test_an_override_that_cannot_be_read_is_refused_before_mlflow_is_asked(override):
    from medtriage.export.from_mlflow import export_from_mlflow

    with pytest.raises(ConfigError) as refused:
        export_from_mlflow("0" * 32, [override])  # no such run: MLflow is never reached
    assert refused.value.where == override and refused.value.hint


def test_overrides_read_one_at_a_time_apply_as_hydra_s_dotted_list_does():
    from medtriage.export.from_mlflow import parse_overrides

    overrides = ["export.name=first", "export.tta=shift", "export.name=second", "model.preprocess.size=64"]
    assert parse_overrides(overrides) == OmegaConf.from_dotlist(overrides)  # the last of a key wins
    with pytest.raises(ConfigError) as refused:
        parse_overrides(["export.name=ok", "export.tta=${oops"])
    assert refused.value.where == "export.tta=${oops"


@pytest.mark.parametrize(
    ("override", "where"),
    [("export.name=${oc.env:MEDTRIAGE_NO_SUCH_VARIABLE}", "export.name"), ("export.models_dir=${paths.nowhere}", "export.models_dir")],
)
def test_an_override_whose_interpolation_names_nothing_is_a_config_error(override, where):
    from medtriage.export.run import export_net

    with pytest.raises(ConfigError) as refused:
        export_net(None, {}, reexport_config(override), run_id=None)
    assert refused.value.where == where


def test_an_override_that_replaces_the_whole_export_group_is_a_config_error():
    from medtriage.export.run import export_net

    with pytest.raises(ConfigError, match="group of settings"):
        export_net(None, {}, reexport_config("export=5"), run_id=None)


def fixed_batch_export(model, path, opset: int = 18) -> dict:
    """export_onnx's graph, but with only height and width left free: the batch axis stays the example's 2."""
    from medtriage.export.onnx import graph_signature

    size = model.net.preprocess.spec.size
    example = torch.rand(2, model.net.preprocess.spec.in_channels, size + 7, size + 11)
    dims = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamic_shapes={"pixels": dims},
        )
    program.save(str(path))
    return graph_signature(path)


def test_a_graph_that_fixes_an_axis_model_json_declares_dynamic_is_refused(tmp_path):
    from medtriage.export.onnx import CalibratedNet, check_dynamic_axes
    from medtriage.export.run import _input_spec

    net = small_net()
    graph = fixed_batch_export(CalibratedNet(net), tmp_path / "model.onnx")
    assert graph["input"][0] == 2 and graph["output"][0] == 2  # as written by the exporter, read as serving reads it
    with pytest.raises(PackageError, match="declares the batch axis dynamic") as refused:
        check_dynamic_axes(graph, _input_spec(net), where=tmp_path / "model.onnx")
    assert "input batch 2" in str(refused.value) and "output batch 2" in str(refused.value)
    assert refused.value.where == str(tmp_path / "model.onnx") and "export again" in refused.value.hint

    check_dynamic_axes(graph, {**_input_spec(net), "batch": 2}, where=tmp_path / "model.onnx")  # declared fixed: agrees


def test_an_export_whose_graph_fixes_the_batch_axis_is_refused_before_parity_runs_on_it(tmp_path, monkeypatch):
    """Parity feeds one image at a time: on a batch fixed at 2, ONNX Runtime would fail there, saying only its own words."""
    from medtriage.export import run

    monkeypatch.setattr(run, "export_onnx", fixed_batch_export)
    with pytest.raises(PackageError, match="graph fixes input batch 2") as refused:
        export_small(small_net(), tmp_path)
    assert refused.value.where == str(tmp_path / "models" / "small" / "model.onnx")
    assert not (tmp_path / "models" / "small").exists()
