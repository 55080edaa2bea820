"""Print a few source DICOM paths of one split: `python scripts/pick_files.py data/pool/pneumonia_sites [--split test]`."""

import sys

from medtriage.cli.data import pick_files_main as main

if __name__ == "__main__":
    sys.exit(main())
