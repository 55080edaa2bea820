"""Print a few source DICOM paths of one split, e.g. to score held-out test files:
`medtriage score models/pneumonia-sites-r18 $(python scripts/pick_files.py data/pool/pneumonia_sites)`."""

import argparse

from medtriage.data.pool import split_files

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("pool", help="pool folder built by scripts/build_pool.py or by training")
parser.add_argument("--split", default="test", choices=["train", "val", "test"])
parser.add_argument("--per-site", type=int, default=2)
args = parser.parse_args()
print("\n".join(str(path) for path in split_files(args.pool, args.split, args.per_site)))
