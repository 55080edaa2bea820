"""Package several finished training runs as one ONNX graph (mean of member probabilities, optional flip TTA inside).

`python scripts/export_ensemble.py --name pneumoniamnist-ens3 RUN_ID RUN_ID RUN_ID [--flip-tta] [export.key=value ...]`

Flip TTA is off by default: chest X-rays are not left-right symmetric (heart side).
"""

import argparse
import sys

from medtriage.errors import MedTriageError
from medtriage.export.ensemble import export_ensemble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="+", help="MLflow run ids, then optional export.key=value overrides")
    parser.add_argument("--name", required=True, help="package and registered-model name")
    parser.add_argument("--flip-tta", action="store_true", help="also average over the left-right mirrored image")
    args = parser.parse_args()
    run_ids = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    import mlflow

    from medtriage.config import compose_train_config

    mlflow.set_tracking_uri(compose_train_config(["experiment=pneumoniamnist"]).tracking.uri)  # the project's store
    try:
        package, run_id, _ = export_ensemble(run_ids, args.name, flip_tta=args.flip_tta, overrides=overrides)
    except MedTriageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ensemble package {package} (MLflow run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
