"""Export a finished training run as a model package: `python scripts/export.py run_id=<mlflow run id> [export.key=value ...]`.

The package lands in `<export.models_dir>/<export.name>/`, is logged to the run and registered in MLflow.
"""

import sys

from medtriage.export.from_mlflow import main

if __name__ == "__main__":
    sys.exit(main())
