"""Package several trained models as one ONNX graph: `python scripts/export_ensemble.py --name NAME RUN_ID ... [--tta shift|affine|flip]`, or the fold models of one cross-validation: `--name NAME --cross-validation DIR` (calibrated on their out-of-fold predictions), or that recipe refitted on all its images: `--cross-validation DIR --refit RUN_DIR ...`."""

import sys

from medtriage.cli.export import ensemble_main as main

if __name__ == "__main__":
    sys.exit(main())
