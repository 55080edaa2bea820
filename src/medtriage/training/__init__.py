"""Training: config -> data -> network -> loop -> checkpoints, tracked in MLflow. Never exports.

`run(cfg) -> RunResult` trains one model as the config says (see medtriage.training.job);
medtriage.workflows.train_and_export adds the export step.
"""

from medtriage.training.job import RunResult, run

__all__ = ["RunResult", "run"]
