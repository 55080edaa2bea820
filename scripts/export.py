"""Export a finished training run as a model package: `python scripts/export.py run_id=<mlflow run id> [export.key=value ...]`."""

import sys

from medtriage.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
