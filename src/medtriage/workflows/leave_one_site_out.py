"""Leave-one-site-out sweeps: one Hydra multirun job per held-out site (data.holdout_site), and a
parent MLflow run that records each site's test AUC and the worst of them.

`configs/experiment/loso_pneumonia_sites.yaml` sweeps the three sites and installs
`LeaveOneSiteOutParentRun` in place of the plain parent-run callback.
"""

from __future__ import annotations

import os
from typing import Any

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from medtriage.training.tracking import PARENT_RUN_ENV, PARENT_TAG, MultirunParentRun, safe_key


def held_out_sites(client: MlflowClient, parent_run_id: str) -> dict[str, float | None]:
    """{held-out site: test AUC, or None where the run has none} of the parent's finished child runs. A site whose test
    images are of one class has no AUC (medtriage.evaluation.metrics leaves it out)."""
    return _held_out(client, parent_run_id)[0]


def _held_out(client: MlflowClient, parent_run_id: str) -> tuple[dict[str, float | None], dict[str, str]]:
    """`held_out_sites`, and {held-out site: status} of the sites none of whose child runs finished (a run stopped by
    trainer.stop_after_epochs ends KILLED, with no test AUC: not a site of one class)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    found: dict[str, float | None] = {}
    unfinished: dict[str, str] = {}
    for child in children:
        site = child.data.params.get("data.holdout_site")
        if not site or site == "None":
            continue
        if child.info.status != "FINISHED":
            unfinished[site] = child.info.status
        elif found.get(site) is None:
            found[site] = child.data.metrics.get("test/auc")
    return found, {site: status for site, status in unfinished.items() if site not in found}


def site_test_aucs(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """{held-out site: test AUC} of the parent's child runs that have one."""
    return {site: value for site, value in held_out_sites(client, parent_run_id).items() if value is not None}


def log_worst_site(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """Log `loso/<site>/test_auc` per site and `loso/worst_site_test_auc` on the parent run; the held-out sites
    without a test AUC are tagged `loso.sites_without_test_auc`, and those whose runs did not finish
    `loso.unfinished_sites`, as the worst is taken without them. `<site>` is kept to the characters MLflow allows in a
    key, as in the child runs' per-site keys (the tags hold the names as they are)."""
    sites, unfinished = _held_out(client, parent_run_id)
    per_site = {site: value for site, value in sites.items() if value is not None}
    for site, value in per_site.items():
        client.log_metric(parent_run_id, f"loso/{safe_key(site)}/test_auc", value)
    if per_site:
        worst = min(per_site, key=per_site.get)
        client.log_metric(parent_run_id, "loso/worst_site_test_auc", per_site[worst])
        client.set_tag(parent_run_id, "loso.worst_site", worst)
        print(
            f"leave-one-site-out test AUC: {', '.join(f'{s} {v:.4f}' for s, v in sorted(per_site.items()))}; "
            f"worst {worst} {per_site[worst]:.4f} (parent MLflow run {parent_run_id})"
        )
    if without := sorted(set(sites) - set(per_site)):
        client.set_tag(parent_run_id, "loso.sites_without_test_auc", ",".join(without))
        print(
            f"leave-one-site-out: no test AUC for held-out site(s) {', '.join(without)}, so the worst site leaves them out; "
            "a site whose test images are all of one class has none: add the other class's images to that site"
        )
    if unfinished:
        client.set_tag(parent_run_id, "loso.unfinished_sites", ",".join(sorted(unfinished)))
        print(
            "leave-one-site-out: the run(s) holding out "
            + ", ".join(f"{site} ({status})" for site, status in sorted(unfinished.items()))
            + " did not finish (trainer.stop_after_epochs stops a run before its test), so the worst site leaves them out; "
            "run the sweep again without trainer.stop_after_epochs"
        )
    return per_site


class LeaveOneSiteOutParentRun(MultirunParentRun):
    """The multirun parent run, plus the per-site and worst-site test AUC when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent is not None:
            log_worst_site(MlflowClient(config.tracking.uri), parent)
        super().on_multirun_end(config, **kwargs)
