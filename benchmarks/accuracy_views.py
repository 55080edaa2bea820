"""More test-time views for the default recipe, judged on its folds; writes `## Accuracy: test-time views`.

    python -m benchmarks.accuracy_views [--folds 3] [--quick]

The default recipe serves the mean over one-pixel shifts (`export.tta: shift`), which beat no views on its folds
(`benchmarks.accuracy_selection`). VIEW_SETS goes on from there, each set adding views to the one before: the default
recipe's fold models (kept by that benchmark: run it first; they are not retrained) are scored again on their held-out
images with each set, and a set is served only if its fold log-loss after a cross-fitted temperature beats the views
served so far by more than one standard error of the paired fold differences (`accuracy_selection.chosen_views`).
Test is not scored here: a set that won would be exported with the recipe's seeds by the selection benchmark, once the
recipe's config serves it. Each set's served latency is measured on the recipe's network through ONNX Runtime.
"""

from __future__ import annotations

import json

from benchmarks.accuracy_selection import (
    INCUMBENT,
    check_refolded,
    chosen_views,
    compared,
    gain_text,
    kept_default_folds,
    scored_folds,
    served_line,
    views_latency,
    views_rows,
)
from benchmarks.common import ROOT, command_line, header, machine, verdict, write_section

SECTION = "## Accuracy: test-time views"
# Each set adds views to the one before it, all inside the training augmentation (translations of 5% of the side,
# turns of 10 degrees, zooms of 10%) and none mirrored (the heart is on one side): one-pixel shifts (what the recipe
# serves), then small turns and zooms as well.
VIEW_SETS = ("shift", "affine")


def main(argv: list[str] | None = None) -> int:
    import mlflow

    args, cfg, key, trial, out_dir = kept_default_folds(argv, __doc__)

    def scored(views: str) -> dict:  # one stage per set: a set added later leaves the others' scores kept
        return scored_folds(trial, key, cfg.trainer.weights, (views,), out_dir=out_dir, folds=args.folds)

    scores = check_refolded(scored("none"), mlflow.MlflowClient(), trial["run_id"])
    for views in VIEW_SETS:
        scores |= scored(views)
    served, judged = chosen_views(scores, VIEW_SETS)
    print(f"fold scores: {json.dumps(scores)}\nserved with: {served} ({json.dumps(judged)})", flush=True)
    latency = views_latency(cfg.model, *VIEW_SETS)
    doc = args.doc or ROOT / ("outputs/benchmark_accuracy_views_quick.md" if args.quick else "docs/benchmarks.md")
    write_section(section(scores, served, judged, latency, cfg.export.tta, trial, args, command_line()), doc)
    print(f"written to {doc}")
    return 0


def section(scores: dict, served: str, judged: dict, latency: dict, configured: str, trial: dict, args, command: str) -> str:
    from medtriage.model.averaging import ROTATION_DEG, ZOOMS

    gains = {views: f"{gain_text(judgement[:2])} (over {judgement[2]})" for views, judgement in judged.items()}
    beyond = [views for views in VIEW_SETS[1:] if compared(*judged[views][:2]) == "better"]
    lines = [
        SECTION,
        "",
        *header(
            command,
            f"{machine()}; CPU",
            "; smoke run (--quick): tiny data, one epoch, figures meaningless" if args.quick else "",
        ),
        f"- folds: the default recipe's cross-validation kept by `python -m benchmarks.accuracy_selection` ({INCUMBENT}, "
        f"{args.folds} folds, MLflow trial run `{trial['run_id'][:8]}`); its fold models (last EMA weights), not retrained, "
        "scored again on their held-out images with each set of views (without views they reproduce the trial's logged fold "
        "log-losses, or the run stops)",
        f"- views, each set adding to the one before: shift: the image moved by one source pixel each way (edges replicated); "
        f"affine: those, and the image turned by ±{ROTATION_DEG:g}° and zoomed by {' and '.join(f'{z:g}' for z in ZOOMS)} "
        "(bilinear, edges replicated); all inside the training augmentation, none mirrored (the heart is on one side)",
        "- rule: as `## Accuracy: selection`: a set is served only if its held-out log-loss after a cross-fitted temperature "
        "beats the views served so far by more than one standard error of the paired fold differences. The sets beyond "
        "shift were judged after the default recipe's test figures had been seen, on the folds alone; test is not scored here",
        "- latency: the recipe's network (untrained) exported through the real export path with each set, one 28 px image "
        "per call through ONNX Runtime, median of interleaved rounds",
        "",
        "| views (count) | fold log-loss after temperature | gain ± SE over the views before (better: served with them) "
        "| as trained | fold AUC | served latency (ms) |",
        "|---|---|---|---|---|---|",
        *views_rows(scores, gains, latency),
        "",
        served_line(served, configured),
        "",
        "Target: a set of views beyond shift better on the folds.",
        f"- {', '.join(beyond) if beyond else 'none of ' + ', '.join(VIEW_SETS[1:])}: {verdict(bool(beyond))}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
