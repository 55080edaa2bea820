"""Recipe knobs (EMA, mixup, label smoothing, leave-one-site-out) and a one-epoch smoke run of every recipe config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medtriage.config import compose_train_config
from medtriage.errors import ConfigError
from medtriage.training.ema import WeightEMA
from medtriage.training.losses import Mixup, make_criterion, mixed_loss, no_mix

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("pneumoniamnist_*.yaml"))


def test_ema_follows_the_ramped_decay_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 5
    ema.update(model)
    decay = min(0.9, 2 / 11)  # first update: the ramp, not the configured decay
    torch.testing.assert_close(ema.module[0].weight, decay * start + (1 - decay) * (start + 1.0))
    assert int(ema.module[1].num_batches_tracked) == 5 and not ema.module[0].weight.requires_grad
    with pytest.raises(ConfigError):
        WeightEMA(model, decay=1.5)


def test_debiased_ema_is_the_decay_weighted_average_of_the_trained_weights_alone():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = WeightEMA(model, decay=0.9, warmup="debiased")
    trained = []
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(step))  # the trained weights x_1..x_5; the initial weights are never averaged in
        trained.append(float(step))
        ema.update(model)
        if step == 1:
            torch.testing.assert_close(ema.module.weight, model.weight)
    weights = np.array([0.9 ** (5 - i) for i in range(1, 6)])
    expected = float((weights * np.array(trained)).sum() / weights.sum())
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert ema.current_decay() == pytest.approx(0.9 * (1 - 0.9**4) / (1 - 0.9**5)) and ema.updates_to_reach_decay() == 0
    with pytest.raises(ConfigError, match="ema_warmup"):
        WeightEMA(model, decay=0.9, warmup="slow")


def test_a_run_too_short_for_the_ramp_is_told_its_decay_is_never_reached():
    model = torch.nn.Linear(2, 1)
    for decay, needed in ((0.99, 890), (0.998, 4490)):
        ema = WeightEMA(model, decay=decay)
        assert ema.updates_to_reach_decay() == needed
        ema.updates = needed
        assert ema.current_decay() == pytest.approx(decay)  # reached exactly there
        assert ema.shortfall(needed) is None
    message = WeightEMA(model, decay=0.998).shortfall(920)
    assert "trainer.ema_decay=0.998 is never reached" in message and "4490 updates" in message and "0.9903" in message
    assert "trainer.ema_warmup=debiased" in message
    assert WeightEMA(model, decay=0.998, warmup="debiased").shortfall(10) is None
    config = compose_train_config(["experiment=pneumoniamnist_sota", "trainer.ema_warmup=debiased"])
    assert WeightEMA.from_config(config.trainer, model).warmup.value == "debiased"


def test_mixup_is_repeatable_per_epoch_and_mixes_the_loss():
    images, labels = torch.rand(8, 1, 4, 4), torch.tensor([0, 1] * 4)
    first, again = Mixup(0.4, seed=3), Mixup(0.4, seed=3)
    first.start_epoch(2)
    again.start_epoch(2)
    a, b = first(images, labels), again(images, labels)
    assert a.lam == b.lam and 0 < a.lam < 1 and torch.equal(a.images, b.images)
    criterion = make_criterion(type("T", (), {"label_smoothing": 0.0})(), torch.ones(2))
    logits = torch.randn(8, 2)
    expected = a.lam * criterion(logits, a.labels) + (1 - a.lam) * criterion(logits, a.partner_labels)
    torch.testing.assert_close(mixed_loss(criterion, logits, a), expected)
    torch.testing.assert_close(mixed_loss(criterion, logits, no_mix(images, labels)), criterion(logits, labels))


def test_label_smoothing_is_passed_to_the_loss_and_validated():
    smooth = make_criterion(type("T", (), {"label_smoothing": 0.1})(), torch.ones(2))
    assert smooth.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="label smoothing"):
        make_criterion(type("T", (), {"label_smoothing": 1.0})(), torch.ones(2))


def test_holdout_site_moves_one_site_to_test(tmp_path):
    from medtriage.data.holdout import hold_out_site
    from medtriage.data.manifest import PoolWriter

    writer = PoolWriter(tmp_path / "pool", ["normal", "pneumonia"])
    for i in range(18):
        site, split = f"site_{i % 3}", ("train", "val", "test")[(i // 3) % 3]
        writer.add(
            np.full((1, 4, 4), i / 18, np.float32),
            site=site,
            patient_id=f"p{i}",
            study_uid=f"s{i}",
            series_uid=f"r{i}",
            sop_uid=f"i{i}",
            path=f"{i}.dcm",
            label=i % 2,
            split=split,
        )
    manifest = writer.close()
    held = hold_out_site(manifest, "site_1")
    test = held.split("test")
    assert set(test["site"]) == {"site_1"} and len(test) == (manifest.rows["site"] == "site_1").sum()
    assert "site_1" not in set(held.split("train")["site"]) | set(held.split("val")["site"])
    assert len(held.rows) == len(manifest.rows) - ((manifest.rows["split"] == "test") & (manifest.rows["site"] != "site_1")).sum()
    assert held.fingerprint != manifest.fingerprint
    np.testing.assert_array_equal(held.image(0), manifest.image(0))
    with pytest.raises(ConfigError, match="unknown site"):
        hold_out_site(manifest, "nowhere")


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_smoke(experiment, tmp_path, npz_cache_dir):
    """Each recipe config for one short epoch (ResNet-10 at 28 px, 64 images per split): it composes, trains, checkpoints."""
    from medtriage.model.checkpoint import read_checkpoint
    from medtriage.training import run

    cfg = compose_train_config(
        [
            f"experiment={experiment}",
            "model=resnet10",
            "model.preprocess.size=28",
            "data.limit=64",
            "data.batch_size=32",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.num_threads=1",
            "export.enabled=false",
            f"paths.cache_dir={npz_cache_dir}",
            f"paths.runs_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
        ]
    )
    result = run(cfg)
    assert 0.0 <= result.metrics["test/auc"] <= 1.0 and result.metrics["test/n"] == 64
    checkpoint = read_checkpoint(result.checkpoint)
    assert result.checkpoint.name == ("last.pt" if cfg.trainer.weights.value == "last" else "best.pt")
    if cfg.trainer.ema_decay:  # the EMA weights are checkpointed; the raw ones are kept for resuming
        assert checkpoint["ema_updates"] == 2
        assert any(not torch.equal(checkpoint["model"][k], checkpoint["train_model"][k]) for k in checkpoint["model"])


@pytest.mark.slow
def test_leave_one_site_out_multirun_reports_the_worst_site(tmp_path, run_train, tracking_uri):
    """`train.py -m experiment=loso_pneumonia_sites` on tiny sites: one child per site, worst-site AUC on the parent."""
    import re

    from mlflow.tracking import MlflowClient

    from medtriage.data.simulate.sites import make_sites

    make_sites(ROOT / "data/samples/pneumoniamnist_28.npz", tmp_path / "sites", seed=0, limit=150)
    done = run_train(
        [
            "-m",
            "experiment=loso_pneumonia_sites",
            f"data.sites_dir={tmp_path / 'sites'}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.num_threads=1",
            "data.batch_size=16",
            f"paths.cache_dir={tmp_path / 'pools'}",
            f"paths.runs_dir={tmp_path / 'outputs'}",
        ]
    )
    parent = re.search(r"MLflow parent run ([0-9a-f]{32})", done.stdout).group(1)
    metrics = MlflowClient(tracking_uri).get_run(parent).data.metrics
    per_site = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("loso/") and k.endswith("/test_auc")}
    assert set(per_site) == {"northgate", "riverside", "st_marys"}
    assert metrics["loso/worst_site_test_auc"] == min(per_site.values())
