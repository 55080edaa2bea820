"""Config values that the schema's types admit but no run can use fail before any data work, naming the key: counts
that silently end a run after one epoch, ranges a library refuses with a traceback, numbers that are not finite,
and label lists that name fewer than two classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtriage import training
from medtriage.config import check_values, compose_train_config
from medtriage.errors import ConfigError
from tests.training.conftest import tiny_recipe

MISSING_NPZ = "data.npz_path=/nonexistent/pneumoniamnist.npz"  # reaching the data would fail with DataNotFoundError


def _tiny(tmp_path: Path, npz_cache_dir: Path, *extra: str):
    runs = tmp_path / "outputs"
    return compose_train_config([*tiny_recipe(runs, npz_cache_dir), f"paths.output_dir={runs / 'run'}", MISSING_NPZ, *extra])


@pytest.mark.parametrize(
    "override",
    [
        "trainer.early_stopping_patience=-1",  # stopped every run after its first epoch
        "trainer.stop_after_epochs=-1",  # ended every run after one epoch, as an interruption
        "trainer.num_threads=-2",  # torch's RuntimeError
        "model.stem_stride=0",  # torch's RuntimeError while the network is built
        "data.augment.noise_std=-0.1",  # MONAI's error inside the loader, after the pool was built
        "data.augment.gamma=-0.5",  # an inverted tone-curve range on CPU, no jitter at all on the device
        "data.tiles.tile_size=0",  # PIL's ValueError while the tile pool is drawn
        "data.tiles.patients_per_site=0",  # an empty tile pool
        "data.tiles.tumour_slide_fraction=2",  # every slide a tumour slide, without a word
        "data.cv_folds=1",  # refused only once the pool was built
        "data.cv_folds=3 data.cv_fold=3",  # refused only once the pool was built
        "export.ood_fit_images=0",  # an IndexError in the export, after the whole training
        "export.parity_images=0",  # "the pool's val split is empty", after the whole training
        "export.parity_tolerance=-1",  # "ONNX and PyTorch disagree" for any export
        "export.ece_bins=0",  # every image in one bin: another calibration measure, chosen on without a word
        "trainer.schedule=one_cycle trainer.one_cycle_pct_start=1",  # refused only once the pool was built
        "trainer.max_epochs=2 trainer.warmup_epochs=2",  # a cosine schedule that never decays, without a word
        "cv.jobs=0",  # read as one training at a time, without a word
    ],
)
def test_a_value_out_of_range_fails_before_any_data_work_naming_the_key(tmp_path, npz_cache_dir, override):
    key = override.split()[-1].split("=")[0]
    with pytest.raises(ConfigError) as err:
        training.run(_tiny(tmp_path, npz_cache_dir, *override.split()))
    assert err.value.where == "config" and f"{key}=" in str(err.value)


@pytest.mark.parametrize(
    "override", ["trainer.lr=inf", "model.preprocess.mean=nan", "trainer.warmup_epochs=inf", "export.threshold_target=nan"]
)
def test_a_number_that_is_not_finite_fails_before_any_data_work(tmp_path, npz_cache_dir, override):
    key = override.split()[-1].split("=")[0]
    with pytest.raises(ConfigError) as err:
        training.run(_tiny(tmp_path, npz_cache_dir, *override.split()))
    assert key in str(err.value) and "finite" in str(err.value)


def test_a_not_finite_value_is_reported_once():
    message = _message_of(compose_train_config(["trainer.lr=nan"]))
    assert message.count("trainer.lr") == 1


@pytest.mark.parametrize("labels", ["[]", "[pneumonia]", "[normal,normal]", "[normal,pneumonia,normal]"])
def test_label_names_must_name_two_or_more_distinct_classes(tmp_path, npz_cache_dir, labels):
    with pytest.raises(ConfigError) as err:
        training.run(_tiny(tmp_path, npz_cache_dir, f"data.label_names={labels}"))
    assert err.value.where == "config" and "data.label_names" in str(err.value)


def test_null_still_means_off_and_every_preset_passes():
    check_values(
        compose_train_config(["trainer.early_stopping_patience=null", "trainer.num_threads=null", "trainer.stop_after_epochs=null"])
    )
    for experiment in sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "experiment").glob("*.yaml")):
        for trainer in ("cpu", "gpu"):
            check_values(compose_train_config([f"experiment={experiment}", f"trainer={trainer}"]))


def test_the_message_says_what_null_does_for_an_optional_count():
    message = _message_of(compose_train_config(["trainer.early_stopping_patience=0"]))
    assert "trainer.early_stopping_patience=0" in message and "null" in message


def _message_of(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        check_values(cfg)
    return str(err.value)


def test_a_positive_label_that_is_no_class_fails_before_the_training(tmp_path, npz_cache_dir):
    with pytest.raises(ConfigError) as err:
        training.run(_tiny(tmp_path, npz_cache_dir, "export.positive_label=pnuemonia"))
    assert "export.positive_label='pnuemonia'" in str(err.value) and "['normal', 'pneumonia']" in str(err.value)
    check_values(_tiny(tmp_path, npz_cache_dir, "export.positive_label=normal"))  # a class of the run is fine


def test_a_flip_asked_of_the_cpu_transforms_is_refused_not_ignored(tmp_path, npz_cache_dir):
    with pytest.raises(ConfigError, match="data.augment.hflip=true with trainer.augment_on=cpu"):
        training.run(_tiny(tmp_path, npz_cache_dir, "data.augment.hflip=true", "trainer.augment_on=cpu"))
    check_values(_tiny(tmp_path, npz_cache_dir, "data.augment.hflip=true", "trainer.augment_on=device"))  # the device flips


def test_site_stratified_batches_with_class_balanced_sampling_are_refused_before_the_pool_is_built(tmp_path, npz_cache_dir):
    """Before, only the first training loader refused them, after the pool was built and the network made."""
    with pytest.raises(ConfigError, match="data.site_stratified=true with trainer.imbalance=sampler"):
        check_values(_tiny(tmp_path, npz_cache_dir, "data.site_stratified=true", "trainer.imbalance=sampler"))
    check_values(_tiny(tmp_path, npz_cache_dir, "data.site_stratified=true", "trainer.imbalance=weighted_loss"))
