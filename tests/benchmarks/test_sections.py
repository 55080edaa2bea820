"""Ingest, pathology and training sections: ratios compare equal work and verdicts follow the figures."""

from benchmarks import ingest, pathology, training


def test_ingest_ratios_pair_runs_that_do_the_same_decoding():
    """The verdicts pair ingest with bare pydicom writing each file durably as ingest does; the runs that write
    nothing stay as references."""
    rates = {"read": 2000.0, "read_write": 1000.0, "ingest": 850.0, "decode": 800.0, "decode_write": 400.0}
    rates |= {"ingest_verify": 200.0, "ingest_all": 1500.0}
    text = ingest.markdown({"files": 602, "megabytes": 10.2, "cores": 2, "repeats": 5, "rates": rates}, "cmd", "cpu")
    assert "- without decoding, c/b = 85%: **met**" in text
    assert "- with decoding, f/e = 50%: **not met**" in text
    assert "c/a = 42% and f/d = 25%" in text
    assert "- command: `cmd`" in text and "- machine: cpu" in text


def test_pathology_verdict_compares_reads_only():
    rates = {"openslide": 300.0, "tiffslide": 200.0, "read": 900.0, "pipeline": 350.0, "pipeline_all": 600.0}
    results = {
        224: {"tiles": 41, "candidates": 117, "cores": 2, "rates": rates},
        112: {"tiles": 158, "candidates": 494, "cores": 2, "rates": {**rates, "read": 150.0}},
    }
    text = pathology.markdown(results, pathology.SLIDE, 0.5, 3, "cmd", "cpu")
    assert "| 224 @ 0.5 | 41 of 117 | 300 | 200 | 900 | 350 | 600 (2 threads) | 3.00x | 1.71x |" in text
    assert "- 224 px tiles: c/a = 3.00x: **met**" in text and "- 112 px tiles: c/a = 0.50x: **not met**" in text


def result(cuda: bool, engine: float, plain: float, busy: float) -> dict:
    return {
        "machine": "cpu",
        "device": "H100 (CUDA 12)" if cuda else "CPU, 2 torch threads",
        "cuda": cuda,
        "settings": vars(training.Settings()),
        "pool": "pool",
        "cache_seconds": (10.0, 1.0),
        "data_path": {"x": 5.0},
        "rows": [{"network": "resnet18", "engine": engine, "plain": plain, "engine_busy": busy, "plain_busy": 0.5}],
    }


def test_training_verdicts_only_where_the_targets_apply():
    on_cpu = training.markdown(result(False, 2.0, 1.7, 0.98), "cmd")
    assert "not assessed: this run had no CUDA device" in on_cpu and "**met**" not in on_cpu
    on_gpu = training.markdown(result(True, 16_000.0, 4_000.0, 0.85), "cmd")
    assert "(a) 16,000 images/s: **met**" in on_gpu and "a/b 4.00: **met**" in on_gpu
    assert "GPU busy 85%: **not met**" in on_gpu


def test_demo_section_and_config(tmp_path):
    from benchmarks import demo
    from medtriage.config import to_plain_dict

    config = to_plain_dict(demo.demo_config(tmp_path))
    assert all(str(tmp_path) in config[k][v] for k, v in (("data", "pool_dir"), ("paths", "output_dir"), ("export", "models_dir")))
    result = {
        "seconds": {"site exports": 30.0, "training": 250.0},
        "test_auc": 0.99,
        "sites": {"b": 0.98, "a": 0.97},
        "epochs": 3,
        "network": "resnet18",
    }
    text = demo.markdown(result, "python -m benchmarks.demo", "cpu")
    assert "| **total** | **280** |" in text and "per site a 0.970, b 0.980" in text and "- 4.7 min: **met**" in text


def test_distributed_efficiency_and_verdicts():
    from benchmarks import distributed

    rows = [
        {"processes": 1, "batch": 32, "images_s": 100.0, "epoch": 2, "command": "torchrun ..."},
        {"processes": 2, "batch": 16, "images_s": 170.0, "epoch": 2, "command": "torchrun ..."},
    ]
    assert "| 2 | 16 | 170 | 85% |" in distributed.markdown(rows, False, "cmd", "cpu")
    assert "not assessed" in distributed.markdown(rows, False, "cmd", "cpu")
    assert "- 2 processes: **not met**" in distributed.markdown(rows, True, "cmd", "gpu")


def test_training_targets_are_not_assessed_at_another_image_size():
    small = result(True, 16_000.0, 4_000.0, 0.95)
    small["settings"] = {**small["settings"], "size": 32}
    assert "not assessed: this run used 32x32 images" in training.markdown(small, "cmd")


def test_stain_comparison_summary_follows_the_table():
    from benchmarks import pathology_stains as stains

    by_site = {
        "a": {"raw": [0.8, 0.9], "macenko": [0.85, 0.86], "stain_augment": [0.7, 0.7]},
        "b": {"raw": [0.6, 0.6], "macenko": [0.7, 0.72], "stain_augment": [0.65, 0.6]},
    }
    table = {title: by_site for title in stains.METRICS}
    text = stains.markdown(table, 1, 2, "python -m benchmarks.pathology_stains", "cpu", (1.0, 0.5), "2026-01-01")
    assert "- date: 2026-01-01; 1.0 min wall, 0.5 min CPU for the 18 runs (1 epochs, 2 seeds)" in text
    assert (
        "highest mean over held-out sites with **macenko**; ahead of raw at 2 of 2 sites for macenko, 1 of 2 sites for stain_augment"
        in text
    )
    assert "largest seed-to-seed range at one site raw 0.100, macenko 0.020, stain_augment 0.050" in text


def test_training_precision_table_states_the_speed_over_fp32_and_whether_bf16_is_native():
    timed = result(False, 2.0, 1.7, 0.98)
    timed["native_bf16"] = True
    timed["precision"] = {
        "fp32, NCHW": {"first_step_s": 1.0, "images_per_s": 4.0, "busy": 1.0},
        "bf16, channels_last": {"first_step_s": 0.8, "images_per_s": 7.0, "busy": 1.0},
    }
    text = training.markdown(timed, "cmd")
    assert "this CPU has native bf16: yes" in text
    assert "| fp32, NCHW | 1.0 | 4.0 | 1.00x | 100% |" in text and "| bf16, channels_last | 0.8 | 7.0 | 1.75x | 100% |" in text
    assert "Training-step precision" not in training.markdown(result(False, 2.0, 1.7, 0.98), "cmd")


def test_a_training_run_cut_short_says_what_it_had_not_timed():
    settings = training.Settings(networks=("resnet18", "densenet121"), precision=True)
    assert training._pending(settings, 1) == ["densenet121", "precision"]
    assert training._pending(training.Settings(networks=("resnet18",)), 1) == []
    cut = training.markdown({**result(True, 10_000.0, 200.0, 0.98), "pending": ["densenet121", "precision"]}, "cmd")
    assert "- written before densenet121, precision had been timed" in cut
    assert "(a) 10,000 images/s: **not met**" in cut  # what was timed is still judged
    assert "written before" not in training.markdown({**result(True, 10_000.0, 200.0, 0.98), "pending": []}, "cmd")
