"""Export settings refused before any work wherever an export starts: a re-export of a finished run
(`scripts/export.py run_id=... export.key=value`), the export after training and a cross-validation's fold models."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medtriage.errors import ConfigError

NPZ_LABELS = ["normal", "pneumonia"]


def reexport_config(*overrides: str):
    """A run's stored config plus command-line overrides, merged as `export_from_mlflow` does (untyped)."""
    stored = OmegaConf.create({"export": {"name": "tiny", "ece_bins": 15}, "data": {"pool_dir": "/no/such/pool"}})
    return OmegaConf.merge(stored, OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("export.ece_bins=0", "export.ece_bins=0"),
        ("export.ood_fit_images=0", "export.ood_fit_images=0"),
        ("export.parity_images=0", "export.parity_images=0"),
        ("export.parity_images=-4", "export.parity_images=-4"),
        ("export.parity_tolerance=-0.1", "export.parity_tolerance=-0.1"),
        ("export.parity_tolerance=.nan", "export.parity_tolerance=nan"),
        ("export.ood_false_alarm_rate=.inf", "export.ood_false_alarm_rate=inf"),
    ],
)
def test_a_reexport_refuses_an_out_of_range_value_before_reading_any_data(override, named):
    from medtriage.export.run import export_net

    with pytest.raises(ConfigError) as refused:
        export_net(None, {}, reexport_config(override), run_id=None)
    assert named in refused.value.reason
    assert refused.value.where == "export"
    assert "export.key=value" in refused.value.hint


@pytest.mark.parametrize(("override", "where"), [("export.ece_bins=abc", "export.ece_bins"), ("export.ece_bin=5", "export.ece_bin")])
def test_a_reexport_refuses_a_value_of_the_wrong_type_or_a_misspelt_key_naming_it(override, where):
    from medtriage.export.run import check_export_settings

    with pytest.raises(ConfigError) as refused:
        check_export_settings(reexport_config(override).export)
    assert refused.value.where == where


def test_untyped_overrides_become_the_settings_types():
    from medtriage.export.run import check_export_settings

    checked = check_export_settings(reexport_config("export.parity_images=8", "export.parity_tolerance=1e-3").export)
    assert (checked.parity_images, checked.parity_tolerance, checked.ece_bins) == (8, 1e-3, 15)
    assert isinstance(checked.parity_tolerance, float)


def test_the_fold_models_export_refuses_an_out_of_range_value_before_scoring_any_fold():
    from medtriage.export.fold_ensemble import HELD_OUT_SPLIT, FoldMembers, _export_out_of_fold
    from medtriage.export.from_mlflow import parse_overrides

    members = FoldMembers(nets=[], configs=[{"export": {"name": "folds"}}], manifests=[], folds=[])
    with pytest.raises(ConfigError) as refused:
        _export_out_of_fold([], members, [], "none", parse_overrides(["export.ece_bins=0"]), HELD_OUT_SPLIT, "folds", {})
    assert "export.ece_bins=0" in refused.value.reason


def test_the_fold_models_export_refuses_a_positive_label_no_fold_has_before_loading_any_pool():
    from medtriage.export.fold_ensemble import HELD_OUT_SPLIT, FoldMembers, _export_out_of_fold
    from medtriage.export.from_mlflow import parse_overrides

    config = {"export": {"name": "folds"}, "data": {"label_names": ["normal", "pneumonia"], "pool_dir": "/no/such/pool"}}
    members = FoldMembers(nets=[], configs=[config], manifests=[], folds=[])  # as fold_runs returns them: no pool yet
    with pytest.raises(ConfigError, match="positive label 'pnuemonia'") as refused:
        _export_out_of_fold([], members, [], "none", parse_overrides(["export.positive_label=pnuemonia"]), HELD_OUT_SPLIT, "folds", {})
    assert refused.value.where == "export.positive_label"


@pytest.fixture
def tiny_pool(tmp_path):
    """Six real X-rays, two per split."""
    from medtriage.data.manifest import PoolWriter
    from medtriage.data.sources.medmnist import as_chw, read_npz
    from tests.export.tiny_package import NPZ

    images, labels = read_npz(NPZ)["val"]
    writer = PoolWriter(tmp_path / "pool", NPZ_LABELS)
    for i in range(6):
        uid = f"u{i}"
        split = ("train", "val", "test")[i % 3]
        writer.add(
            as_chw(images[i]),
            site="a",
            patient_id=uid,
            study_uid=uid,
            series_uid=uid,
            sop_uid=uid,
            path=uid,
            label=int(labels[i]),
            split=split,
        )
    return writer.close()


def test_a_positive_label_the_pool_does_not_have_is_refused_before_the_splits_are_scored(tiny_pool, monkeypatch):
    from medtriage.export import run
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    def scored(*_args, **_kwargs):
        raise AssertionError("the splits were scored before the settings were checked")

    monkeypatch.setattr(run, "predict", scored)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=28, in_channels=1))
    config = {"export": {"positive_label": "tumour"}, "data": {"pool_dir": str(tiny_pool.pool_dir)}}
    with pytest.raises(ConfigError) as refused:
        run.export_net(net, {}, config, run_id=None)
    assert refused.value.where == "export.positive_label"
    assert str(NPZ_LABELS) in refused.value.hint


# A second export of the same name, run while the first waits just before swapping its package in.
HELD_EXPORT = """
import json, sys, time
from pathlib import Path
from medtriage.export import package

package_dir, onnx, meta_file, arrived, go = map(Path, sys.argv[1:])
swap_in = package._swap_in


def swap_when_told(*places):
    arrived.touch()
    while not go.exists():
        time.sleep(0.02)
    swap_in(*places)


package._swap_in = swap_when_told
package.write_package(package_dir, onnx, json.loads(meta_file.read_text()))
"""


def test_two_exports_of_one_name_at_once_leave_the_newer_package_in_place(exported, tmp_path):
    import json
    import subprocess
    import sys
    import threading
    import time

    from medtriage.export.package import write_package
    from medtriage.format import META_FILE, ONNX_FILE

    result, _ = exported
    onnx, meta = result.package_dir / ONNX_FILE, {k: v for k, v in result.meta.items() if k != "sha256"}
    package_dir = tmp_path / "models" / meta["name"]
    write_package(package_dir, onnx, {**meta, "version": 2})
    (tmp_path / "v3.json").write_text(json.dumps({**meta, "version": 3}))
    arrived, go = tmp_path / "arrived", tmp_path / "go"
    older = subprocess.Popen(
        [sys.executable, "-c", HELD_EXPORT, str(package_dir), str(onnx), str(tmp_path / "v3.json"), str(arrived), str(go)],
        stderr=subprocess.PIPE,
        text=True,
    )
    while not arrived.exists() and older.poll() is None:
        time.sleep(0.02)
    assert older.poll() is None, older.stderr.read()
    newer = threading.Thread(target=write_package, args=(package_dir, onnx, {**meta, "version": 5}))
    newer.start()
    newer.join(timeout=2)  # it waits for v3 to be in place, or (unguarded) writes over its staging folder meanwhile
    go.touch()
    _, errors = older.communicate(timeout=60)
    newer.join(timeout=60)
    assert older.returncode == 0, errors
    assert json.loads((package_dir / META_FILE).read_text())["version"] == 5
    assert not list(package_dir.parent.glob(f".{package_dir.name}.staging-*"))
    assert not list(package_dir.parent.glob(f".{package_dir.name}.retired-*"))
