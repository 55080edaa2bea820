"""`medtriage bundle`: the offline install bundle for a hospital machine (see medtriage.delivery.bundle)."""

from __future__ import annotations

import argparse
import sys

from medtriage.arguments import path
from medtriage.delivery.wheelhouse import DEFAULT_PLATFORM, PYTHONS, default_python


def register(subparsers) -> None:
    bundle = subparsers.add_parser(
        "bundle",
        help="write an offline install bundle: wheels, model packages, installer, systemd units, SBOM",
        description="Write a folder that installs MedTriage and the given model packages on a machine without "
        "internet: copy it over and run `sh install.sh` in it (it checks SHA256SUMS first).",
    )
    bundle.add_argument(
        "packages", nargs="+", metavar="PACKAGE", type=path, help="model package folders to ship, e.g. models/pneumonia-sites-r18"
    )
    bundle.add_argument("--out", required=True, metavar="DIR", type=path, help="the bundle folder to create (must not exist or be empty)")
    bundle.add_argument(
        "--python",
        choices=PYTHONS,
        default=default_python(),
        help="CPython version of the target machine (default: %(default)s, this interpreter)",
    )
    bundle.add_argument(
        "--platform",
        default=DEFAULT_PLATFORM,
        help="manylinux tag of the target machine; older manylinux wheels are accepted too (default: %(default)s)",
    )
    bundle.add_argument(
        "--wheel",
        metavar="FILE",
        type=path,
        default=None,
        help="a built medtriage wheel to ship (default: build it from this source checkout)",
    )
    bundle.set_defaults(func=run_bundle)


def run_bundle(args: argparse.Namespace) -> int:
    from medtriage.delivery.bundle import build_bundle

    result = build_bundle(args.packages, args.out, args.python, args.platform, args.wheel)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"bundle written to {result.directory}: {len(result.wheels)} wheels for CPython {args.python} on {args.platform}, "
        f"models {', '.join(result.models)}; copy the folder and run `sh install.sh` in it (see README.md)",
        file=sys.stderr,
    )
    return 0
