"""Package several trained models as one ONNX graph: `python scripts/export_ensemble.py --name NAME RUN_ID ... [--tta shift|flip]`, or the fold models of one cross-validation: `--name NAME --cross-validation DIR` (calibrated on their out-of-fold predictions)."""

import sys

from medtriage.cli.export import ensemble_main as main

if __name__ == "__main__":
    sys.exit(main())
