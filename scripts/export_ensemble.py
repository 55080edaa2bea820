"""Package several finished training runs as one ONNX graph: `python scripts/export_ensemble.py --name NAME RUN_ID ... [--tta shift|flip]`."""

import sys

from medtriage.cli.export import ensemble_main as main

if __name__ == "__main__":
    sys.exit(main())
