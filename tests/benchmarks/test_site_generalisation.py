"""The leave-one-site-out benchmark's jobs and section (the runs themselves are `python -m benchmarks.site_generalisation`)."""

import pytest

from benchmarks import site_generalisation as bench
from tests.benchmarks.test_docs_figures import check_section, written_sections


def seed_result(seed, site_aucs, pooled_auc):
    per_site = dict(zip(("north", "south"), site_aucs))
    return {
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
VARIANTS = {
    "fixed": [seed_result(0, (0.90, 0.80), 0.90), seed_result(1, (0.92, 0.84), 0.92)],
    "per_image": [seed_result(0, (0.91, 0.88), 0.89), seed_result(1, (0.93, 0.90), 0.90)],
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


def test_verdict_follows_the_mean_gap_per_variant():
    lines = bench.verdict_lines(VARIANTS)
    assert lines[1] == "- fixed intensity normalisation: gap +0.090: **not met**"
    assert lines[2] == "- per-image intensity harmonisation: gap +0.005: **met**"
    # a held-out site that beats the pooled model is within the target too
    better = {"fixed": [seed_result(0, (0.95, 0.93), 0.91)]}
    assert bench.verdict_lines(better)[1].endswith("gap -0.020: **met**")


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
    # south held out: 0.80 / 0.84; full pooled on south: 0.89 / 0.91; size-matched pooled on south: 0.85 / 0.87
    runs = [
        with_size_matched(VARIANTS["fixed"][0], {"north": 0.90, "south": 0.85}),
        with_size_matched(VARIANTS["fixed"][1], {"north": 0.92, "south": 0.87}),
    ]
    lines = bench.size_matched_lines({bench.SIZE_MATCHED: runs})
    assert "| south | 1775 | 0.820 ± 0.028 | 0.860 ± 0.014 | 0.900 ± 0.014 | +0.040 ± 0.000 | +0.040 ± 0.014 |" in lines
    assert (
        lines[-1]
        == "Worst held-out site, south: +0.040 of its shortfall comes from the smaller training set and +0.040 from never having seen the site (50% volume)."
    )
    assert bench.size_matched_lines(VARIANTS) == []  # variants without the diagnostic add nothing
