"""The leave-one-site-out benchmark's jobs and section (the runs themselves are `python -m benchmarks.site_generalisation`)."""

import pytest

from benchmarks import site_generalisation as bench
from tests.benchmarks.test_docs_figures import check_section, written_sections


@pytest.fixture(autouse=True)
def few_resamples(monkeypatch):
    monkeypatch.setattr(bench, "BOOTSTRAP_RESAMPLES", 100)


def site_images(missed: int, rows=tuple(range(20))) -> dict:
    """A site's 20 test rows: the pooled model ranks them perfectly, the held-out one puts a positive below `missed`
    of the 10 negatives, so its AUC is 1 - missed / 100 and the same-images gap missed / 100."""
    held_out = [float(i) for i in range(20)]
    held_out[10] = 9.5 - missed
    return {
        "rows": list(rows),
        "labels": [0] * 10 + [1] * 10,
        "held_out": held_out,
        "pooled": [float(i) for i in range(20)],
        "held_out_auc": 1 - missed / 100,
        "pooled_auc": 1.0,
    }


def seed_result(seed, site_aucs, pooled_auc, missed=(1, 2)):
    per_site = dict(zip(("north", "south"), site_aucs))
    return {
        "same_images": {site: site_images(m) for site, m in zip(("north", "south"), missed)},
        "seed": seed,
        "per_site": per_site,
        "worst": min(site_aucs),
        "seconds": [10.0, 12.0],
        "parent_run_id": f"{seed}" * 32,
        "command": f"python scripts/train.py -m experiment=loso_pneumonia_sites trainer.seed={seed}",
        "pooled": {
            "run_id": f"p{seed}" * 16,
            "auc": pooled_auc,
            "per_site": {"north": pooled_auc + 0.01, "south": pooled_auc - 0.01},
            "n_test": 900,
            "seconds": 20.0,
            "command": f"python scripts/train.py experiment=loso_pneumonia_sites trainer.seed={seed}",
        },
    }


# fixed: worst 0.80 / 0.84, pooled 0.90 / 0.92 -> gap 0.10 / 0.08; per-image: worst 0.88 / 0.90, pooled 0.89 / 0.90 -> gap 0.01 / 0.00
# same images: fixed south gap 0.03 / 0.05 (north 0.01); per-image north 0 / 0, south 0.01 / 0
VARIANTS = {
    "fixed": [seed_result(0, (0.90, 0.80), 0.90, (1, 3)), seed_result(1, (0.92, 0.84), 0.92, (1, 5))],
    "per_image": [seed_result(0, (0.91, 0.88), 0.89, (0, 1)), seed_result(1, (0.93, 0.90), 0.90, (0, 0))],
}


def result(variants=VARIANTS, quick=False):
    return {
        "variants": variants,
        "wall_s": 120.0,
        "quick": quick,
        "uri": "sqlite:///x.db",
        "sites_dir": "pool",
        "device": "CPU",
        "machine": "cpu",
    }


def test_table_sets_sites_worst_pooled_and_gap_side_by_side():
    lines = bench.table_lines(VARIANTS)
    assert "| south held out | 0.820 ± 0.028 | 0.890 ± 0.014 |" in lines
    assert "| **worst held-out site** | **0.820 ± 0.028** | **0.890 ± 0.014** |" in lines
    assert "| **pooled model** (all sites train; pool's test split) | **0.910 ± 0.014** | **0.895 ± 0.007** |" in lines
    assert lines[-1] == "| **gap: pooled − worst** | **+0.090 ± 0.014** | **+0.005 ± 0.007** |"


def test_verdict_follows_the_worst_sites_gap_on_the_same_images_per_variant():
    lines = bench.verdict_lines(VARIANTS)
    assert lines[1] == (
        "- fixed intensity normalisation: same images, worst site south +0.040: **not met** (lowest held-out site on its "
        "test rows 0.960 against the pooled model's 0.910 on the whole test split: -0.050; first table's gap +0.090: **not met**)"
    )
    assert lines[2].startswith("- per-image intensity harmonisation: same images, worst site south +0.005: **met**")
    assert lines[2].endswith("first table's gap +0.005: **met**)")
    # a held-out site that beats the pooled model on its images is within the target too
    better = {"fixed": [{**seed_result(0, (0.95, 0.93), 0.91), "same_images": {"north": {**site_images(0), "pooled_auc": 0.98}}}]}
    assert "same images, worst site north -0.020: **met**" in bench.verdict_lines(better)[1]


def test_same_images_table_gives_each_sites_paired_gap_with_its_interval():
    lines = bench.same_images_lines(VARIANTS)
    assert "| north held out, on its 20 test rows | 0.990 ± 0.000 | 1.000 ± 0.000 |" in lines
    south = next(line for line in lines if line.startswith("| south: pooled − held out |"))
    fixed, per_image = south.split(" | ")[1:3]
    assert fixed.startswith("+0.040 ± 0.014 [") and per_image.startswith("+0.005 ± 0.007 [")
    low, high = (float(v) for v in fixed[fixed.index("[") + 1 : -1].split(", "))
    assert 0 <= low < 0.04 < high  # a paired interval around the mean gap
    assert "| **worst site: pooled − held out** | **south +0.040 ± 0.014" in next(line for line in lines if "worst site" in line)
    assert "fixed intensity normalisation: south 0.820 on all its images, 0.960 on its test rows" in lines[-1]


def test_seeds_that_scored_different_rows_get_no_paired_interval():
    runs = [seed_result(0, (0.9, 0.8), 0.9), {**seed_result(1, (0.9, 0.8), 0.9)}]
    runs[1]["same_images"] = {site: site_images(1, rows=tuple(range(1, 21))) for site in ("north", "south")}
    assert bench.paired_interval(runs, "north") is None
    assert bench._gap_cell(runs, "north") == "+0.010 ± 0.000"


def test_a_checkpoint_that_does_not_reproduce_its_logged_auc_stops_the_run():
    bench.check_reproduced(0.9912345, 0.9912345, "x")
    with pytest.raises(RuntimeError, match="no longer belong to the kept comparison"):
        bench.check_reproduced(0.991, 0.992, "per_image seed 0, north")


def test_section_carries_command_machine_date_runs_and_verdicts():
    text = bench.section(result(), "python -m benchmarks.site_generalisation --seeds 0 1")
    assert text.startswith(bench.SECTION + "\n")
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "12 trainings, median 12 s each, 2.8 training-minutes in all; this run 2.0 min" in text
    assert "pooled `p0p0p0p0`, `p1p1p1p1`" in text and "parents `00000000`, `11111111`" in text
    assert "fixed intensity normalisation: north 0.920 ± 0.014, south 0.900 ± 0.014" in text
    assert "smoke run" not in text and "smoke run" in bench.section(result(quick=True), "cmd")


def test_one_seed_shows_no_spread():
    lines = bench.table_lines({"fixed": VARIANTS["fixed"][:1]})
    assert lines[-1] == "| **gap: pooled − worst** | **+0.100** |"


@pytest.mark.parametrize("variant", list(bench.LOSO_VARIANTS))
def test_every_job_of_the_comparison_composes_fully(tmp_path, variant):
    from medtriage.config import to_plain_dict

    extra = [*bench.LOSO_VARIANTS[variant], *bench.QUICK]
    sites = bench.loso_sites()
    assert len(sites) >= 2
    for site in sites:
        config = to_plain_dict(bench.loso_job_config(site, extra, tmp_path))
        assert config["data"]["holdout_site"] == site and config["paths"]["output_dir"] == str(tmp_path / site)
        assert config["model"]["preprocess"]["intensity"] == ("fixed" if variant == "fixed" else "per_image")
    pooled = to_plain_dict(bench.pooled_job_config(extra, tmp_path, "pooled-run"))
    assert pooled["data"]["holdout_site"] is None and pooled["tracking"]["run_name"] == "pooled-run"
    assert pooled["paths"]["output_dir"] == str(tmp_path / "pooled")
    assert pooled["name"] == config["name"] and pooled["model"] == config["model"] and pooled["trainer"] == config["trainer"]


def with_size_matched(run: dict, matched: dict[str, float]) -> dict:
    return {
        **run,
        "size_matched": {
            site: {"n_train": 1775, "site_auc": auc, "auc": 0.9, "run_id": "m" * 32, "seconds": 30.0} for site, auc in matched.items()
        },
    }


def test_the_worst_sites_shortfall_is_split_into_training_volume_and_the_unseen_site():
    # on south's test rows: held out 0.96 / 0.94, size-matched pooled 0.97 / 0.97, full pooled 0.99 / 0.99
    runs = []
    for seed, missed in ((0, 4), (1, 6)):
        run = seed_result(seed, (0.90, 0.80), 0.90, (1, missed))
        run["pooled"]["per_site"] = {"north": 0.99, "south": 0.99}
        runs.append(with_size_matched(run, {"north": 0.99, "south": 0.97}))
    lines = bench.size_matched_lines({bench.SIZE_MATCHED: runs})
    assert "| south | 1775 | 0.950 ± 0.014 | 0.970 ± 0.000 | 0.990 ± 0.000 | +0.020 ± 0.000 | +0.020 ± 0.014 |" in lines
    assert (
        lines[-1]
        == "Worst held-out site, south: +0.020 of its shortfall comes from the smaller training set and +0.020 from never having seen the site (50% volume)."
    )
    assert bench.size_matched_lines(VARIANTS) == []  # variants without the diagnostic add nothing
