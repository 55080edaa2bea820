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

from medtriage.training.tracking import PARENT_RUN_ENV, PARENT_TAG, MultirunParentRun


def held_out_sites(client: MlflowClient, parent_run_id: str) -> dict[str, float | None]:
    """{held-out site: test AUC, or None where the run has none} of the parent's child runs. A site whose test
    images are of one class has no AUC (medtriage.evaluation.metrics leaves it out)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    found: dict[str, float | None] = {}
    for child in children:
        site = child.data.params.get("data.holdout_site")
        if site and site != "None":
            value = child.data.metrics.get("test/auc")
            if found.get(site) is None:
                found[site] = value
    return found


def site_test_aucs(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """{held-out site: test AUC} of the parent's child runs that have one."""
    return {site: value for site, value in held_out_sites(client, parent_run_id).items() if value is not None}


def log_worst_site(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """Log `loso/<site>/test_auc` per site and `loso/worst_site_test_auc` on the parent run; the held-out sites
    without a test AUC are tagged `loso.sites_without_test_auc`, as the worst is taken without them."""
    sites = held_out_sites(client, parent_run_id)
    per_site = {site: value for site, value in sites.items() if value is not None}
    for site, value in per_site.items():
        client.log_metric(parent_run_id, f"loso/{site}/test_auc", value)
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
    return per_site


class LeaveOneSiteOutParentRun(MultirunParentRun):
    """The multirun parent run, plus the per-site and worst-site test AUC when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent is not None:
            log_worst_site(MlflowClient(config.tracking.uri), parent)
        super().on_multirun_end(config, **kwargs)
