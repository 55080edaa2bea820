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


def site_test_aucs(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """{held-out site: test AUC} of the parent's finished child runs."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    found = {}
    for child in children:
        site = child.data.params.get("data.holdout_site")
        if site and site != "None" and "test/auc" in child.data.metrics:
            found[site] = child.data.metrics["test/auc"]
    return found


def log_worst_site(client: MlflowClient, parent_run_id: str) -> dict[str, float]:
    """Log `loso/<site>/test_auc` per site and `loso/worst_site_test_auc` on the parent run."""
    per_site = site_test_aucs(client, parent_run_id)
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
    return per_site


class LeaveOneSiteOutParentRun(MultirunParentRun):
    """The multirun parent run, plus the per-site and worst-site test AUC when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent is not None:
            log_worst_site(MlflowClient(config.tracking.uri), parent)
        super().on_multirun_end(config, **kwargs)
