"""`medtriage make-sites | build-pool | audit` and `pick-files`: the data steps before training (torch-free)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medtriage.arguments import fraction, non_negative_int, path, positive_int, refuse_file_as_folder, refuse_folder_as_file, whole_number
from medtriage.cli import report_errors, write_output
from medtriage.data.audit import HASH_BITS, MAX_DISTANCE, audit_manifest
from medtriage.data.manifest import load_manifest
from medtriage.data.pool import DEFAULT_POOL, DEFAULT_SITES, build_sites_pool, split_files
from medtriage.data.simulate.sites import DEFAULT_NPZ, DEFAULT_OUT, make_sites, summary_table
from medtriage.data.splits import check_fractions
from medtriage.io.header_warnings import say_header_warnings
from medtriage.project import project_path


def register(subparsers) -> None:
    parser = subparsers.add_parser("make-sites", help="write the simulated 3-site DICOM pool from a MedMNIST npz")
    add_make_sites_arguments(parser)
    parser.set_defaults(func=run_make_sites)
    parser = subparsers.add_parser("build-pool", help="decode site folders into the pooled manifest with patient-level splits")
    add_build_pool_arguments(parser)
    parser.set_defaults(func=run_build_pool)
    parser = subparsers.add_parser(
        "audit", help="leakage audit of a pooled manifest (patients, duplicates, each class at each site in each split)"
    )
    add_audit_arguments(parser)
    parser.set_defaults(func=run_audit)


def add_make_sites_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--npz", type=path, default=project_path(DEFAULT_NPZ), help="MedMNIST-layout npz (default: %(default)s)")
    parser.add_argument("--out", type=path, default=project_path(DEFAULT_OUT), help="folder for the site folders (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="write only this many images, for quick tries (default: all)")


def run_make_sites(args: argparse.Namespace) -> int:
    refuse_file_as_folder(args.out, "--out")
    results = make_sites(args.npz, args.out, seed=args.seed, limit=args.limit)
    print(summary_table(results))
    print(f"site folders written under {Path(args.out).resolve()}; next: python scripts/ingest_sites.py (de-identify into the pool)")
    return 0


def add_build_pool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        type=path,
        default=project_path(DEFAULT_SITES),
        help="de-identified site folders, as scripts/ingest_sites.py writes them (default: %(default)s)",
    )
    parser.add_argument("--pool", type=path, default=project_path(DEFAULT_POOL), help="pool folder to write (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument("--val-fraction", type=fraction, default=0.15, help="patients in validation (default: %(default)s)")
    parser.add_argument("--test-fraction", type=fraction, default=0.2, help="patients in test (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: all cores)")


def run_build_pool(args: argparse.Namespace) -> int:
    refuse_file_as_folder(args.pool, "--pool")
    say_header_warnings()  # pydicom's, once per file and naming it
    check_fractions(args.val_fraction, args.test_fraction, where="--val-fraction/--test-fraction")  # before any decoding
    build_sites_pool(
        args.sites, args.pool, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction, workers=args.workers
    )
    return 0


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", metavar="POOL", type=path, help="pool folder with manifest.csv (from the pool builder)")
    parser.add_argument("--json", metavar="FILE", type=path, help="also write the result as JSON to this file (default: none)")
    parser.add_argument(
        "--max-distance",
        type=whole_number(0, HASH_BITS),
        default=MAX_DISTANCE,
        help=f"images whose perceptual hashes differ in at most this many bits (0 to {HASH_BITS}) count as near duplicates "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-images", action="store_true", help="skip the pixel checks (table checks only)")


def run_audit(args: argparse.Namespace) -> int:
    refuse_folder_as_file(args.json, "--json", "audit.json")
    result = audit_manifest(load_manifest(args.pool), check_images=not args.no_images, max_distance=args.max_distance)
    print(result.summary())
    if args.json:
        write_output(args.json, json.dumps(result.to_dict(), indent=2, default=str).encode(), "--json")
    return 0 if result.ok else 1


def make_sites_main(argv: list[str] | None = None) -> int:
    """`python scripts/make_sites.py [--out data/sites] [--seed 0] [--limit N]`."""
    parser = argparse.ArgumentParser(description="Write the simulated 3-site DICOM pool.")
    add_make_sites_arguments(parser)
    return report_errors(run_make_sites, parser.parse_args(argv))


def build_pool_main(argv: list[str] | None = None) -> int:
    """`python scripts/build_pool.py [--sites data/pool/ingested] [--pool data/pool/pneumonia_sites]`."""
    parser = argparse.ArgumentParser(description="Build the pooled manifest from site folders.")
    add_build_pool_arguments(parser)
    return report_errors(run_build_pool, parser.parse_args(argv))


def pick_files_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=pick_files_main.__doc__)
    parser.add_argument("pool", type=path, help="pool folder built by scripts/build_pool.py or by training")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to pick from (default: %(default)s)")
    parser.add_argument("--per-label", type=positive_int, default=1, help="files of each label at each site (default: %(default)s)")
    return parser


def pick_files_main(argv: list[str] | None = None) -> int:
    """Print a few source DICOM paths of one split, each label at each site, e.g. to score held-out test files:
    `medtriage score models/pneumonia-sites-r18 $(medtriage-pick-files data/pool/pneumonia_sites)`."""
    args = pick_files_parser().parse_args(argv)
    return report_errors(lambda: print("\n".join(str(path) for path in split_files(args.pool, args.split, args.per_label))))


if __name__ == "__main__":
    sys.exit(pick_files_main())
