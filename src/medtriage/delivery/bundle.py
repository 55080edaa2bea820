"""The offline bundle: everything a hospital machine without internet needs to install and run MedTriage.

    <out>/wheels/        MedTriage's wheel + every base dependency for one Python and platform
    <out>/models/<name>/ the model packages (verified before they are copied)
    <out>/install.sh     checks SHA256SUMS, then `pip install --no-index --find-links wheels`
    <out>/systemd/, config/, README.md, sbom.cdx.json, bundle.json, SHA256SUMS

The bundle is built in a hidden sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import medtriage
from medtriage.delivery.sbom import write_sbom
from medtriage.delivery.wheelhouse import (
    DEFAULT_PLATFORM,
    build_medtriage_wheel,
    check_target,
    default_python,
    download_dependencies,
    source_root,
    wheel_name_version,
)
from medtriage.errors import ConfigError, PackageError, printable
from medtriage.format import sha256_file

CHECKSUMS, MANIFEST, SBOM = "SHA256SUMS", "bundle.json", "sbom.cdx.json"
UNITS = ("medtriage-serve@.service", "medtriage-listen@.service")
CONFIG_EXAMPLES = ("serve.env.example", "listen.env.example")
MODEL_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a systemd instance name and a SHA256SUMS path as is


@dataclass
class Bundle:
    directory: Path
    wheels: list[Path]
    models: list[str]


def build_bundle(
    packages: list[str | Path],
    out: str | Path,
    python: str | None = None,
    platform: str = DEFAULT_PLATFORM,
    wheel: str | Path | None = None,
) -> Bundle:
    """Write the bundle of `packages` for CPython `python` (default: this one) on `platform` into `out`.
    `wheel`: a built medtriage wheel to ship instead of building one from the source checkout."""
    out, python = Path(out).resolve(), python or default_python()  # resolved: `--out .` has no name to build beside
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path is a file, not a folder", where=out, hint="choose a new --out folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("the output folder exists and is not empty", where=out, hint="choose a new --out folder or remove it")
    if os.path.ismount(out):  # the bundle is built beside it and renamed into place: a mount point cannot be replaced
        raise ConfigError(
            "the output folder is a mount point (a USB drive or network share, for example)",
            where=out,
            hint=f"name a new folder on it, e.g. --out {out / 'medtriage-bundle'}",
        )
    check_target(python, platform)  # before the wheel is built and anything downloaded
    staging = _new_staging(out)
    try:
        models = _model_folders(packages)
        wheels = _fill(staging, models, python, platform, wheel)
        _sync_tree(staging)  # on disk before the bundle takes its name and the build reports success
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
        sync_folder(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build (no network, pip error) leaves no half bundle
        raise
    return Bundle(out, [out / "wheels" / w.name for w in wheels], list(models))


def _new_staging(out: Path) -> Path:
    """The empty hidden sibling the bundle is built in, made before any long step: a parent that cannot hold
    the bundle (missing permission, a file, a read-only file system) is reported up front."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the bundle folder here: {err.strerror}",
            where=out,
            hint="choose an --out inside a folder you can write to",
        ) from err
    return staging


def _fill(staging: Path, models: dict[str, Path], python: str, platform: str, wheel: str | Path | None) -> list[Path]:
    """Write everything of the bundle into `staging`; returns its wheels."""
    wheels_dir = staging / "wheels"
    own = _own_wheel(wheel, wheels_dir)
    wheels = download_dependencies(own, wheels_dir, python, platform)
    _step(f"copying and verifying {len(models)} model package(s)")
    for name, source in models.items():
        shutil.copytree(source, staging / "models" / name, ignore=shutil.ignore_patterns(".*"))
    # The copies are what ships: verified again, as the sources may have changed during the download.
    models = {name: _verified_copy(staging / "models" / name, source) for name, source in models.items()}
    root = source_root()
    _step("writing the SBOM (cyclonedx-py) and SHA256SUMS")
    unlicensed = write_sbom(wheels, staging / SBOM, root / "pyproject.toml" if root else None)
    write_templates(staging, template_values(python, platform, wheels, list(models), unlicensed))
    (staging / MANIFEST).write_text(json.dumps(_manifest(python, platform, wheels, models, unlicensed), indent=2) + "\n")
    write_checksums(staging)
    return wheels


def _model_folders(packages: list[str | Path]) -> dict[str, Path]:
    """Folder name -> package folder, each loaded (schema and sha256 checked) before anything is built."""
    from medtriage.serve.package import load_package

    if not packages:
        raise ConfigError("no model package given", hint="name one or more package folders, e.g. models/pneumonia-r18")
    folders: dict[str, Path] = {}
    for raw in packages:
        package = load_package(raw)
        name = package.directory.resolve().name
        if not MODEL_FOLDER_NAME.fullmatch(name):
            raise ConfigError(
                f"the package folder name {name!r} cannot name a model in the bundle",
                where=raw,
                hint="it becomes a systemd instance name and a SHA256SUMS path: rename the folder to letters, digits, '.', '_' and '-'",
            )
        if name in folders:
            raise ConfigError(
                f"two packages share the folder name '{name}'",
                where=raw,
                hint="the bundle keeps models/<folder name>: rename one of the folders",
            )
        _check_shipped_files(package.directory)
        folders[name] = package.directory
    return folders


def _check_shipped_files(package: Path) -> None:
    """Refuse, before the long steps, a file of the package the bundle cannot ship: a link that leads nowhere (the
    copy would fail at the end of the build) or a name SHA256SUMS cannot hold on one line (a line break would make
    install.sh call the whole bundle damaged; a byte that is no UTF-8 cannot be written into it)."""
    for path in _shipped_files(package):
        relative = path.relative_to(package).as_posix()
        if not relative.isprintable():
            raise PackageError(
                f"the package holds a file whose name cannot be listed in SHA256SUMS: '{printable(relative)}'",
                where=package,
                hint="rename or remove that file: the bundle lists every file by name, one per line",
            )
        if not path.exists():
            raise PackageError("a link in the package leads nowhere", where=path, hint="remove the link or restore the file it points to")


def _shipped_files(folder: Path):
    """What the copy into the bundle takes from `folder`: everything below it but hidden names, links followed."""
    for path in sorted(folder.iterdir()):
        if not path.name.startswith("."):  # the copy's ignore pattern
            yield path
            if path.is_dir():
                yield from _shipped_files(path)


def _verified_copy(copy: Path, source: Path) -> Path:
    from medtriage.serve.package import load_package

    try:
        load_package(copy)
    except PackageError as err:
        raise PackageError(
            f"the copy of this package in the bundle fails its check: {err.reason}",
            where=source,
            hint="the package changed while the bundle was built; build the bundle again once it is complete",
        ) from err
    return copy


def _own_wheel(wheel: str | Path | None, wheels_dir: Path) -> Path:
    if wheel is None:
        _step("building the medtriage wheel from the source checkout")
        return build_medtriage_wheel(wheels_dir)
    wheel = Path(wheel)
    if not (wheel.is_file() and zipfile.is_zipfile(wheel)) or _name_version(wheel) != ("medtriage", medtriage.__version__):
        raise ConfigError(
            f"not a medtriage {medtriage.__version__} wheel",
            where=wheel,
            hint="build it with `pip wheel --no-deps .` from this version's source, or leave --wheel out",
        )
    wheels_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(wheel, wheels_dir))


def _name_version(wheel: Path) -> tuple[str, str] | None:
    """(name, version) of a file named like a wheel; None for any other name."""
    parts = wheel.name.split("-")
    return (parts[0], parts[1]) if wheel.suffix == ".whl" and len(parts) >= 5 else None


def template_values(python: str, platform: str, wheels: list[Path], models: list[str], unlicensed: list[str]) -> dict[str, str]:
    return {
        "@VERSION@": medtriage.__version__,
        "@PYTHON@": python,
        "@PLATFORM@": platform,
        "@DATE@": dt.date.today().isoformat(),
        "@WHEELS@": str(len(wheels)),
        "@MODELS@": ", ".join(f"`{m}`" for m in models),
        "@FIRST_MODEL@": models[0],
        "@UNLICENSED@": _licence_gaps(unlicensed),
    }


def _licence_gaps(unlicensed: list[str]) -> str:
    if not unlicensed:
        return "Every wheel declares one."
    names = ", ".join(f"`{name}`" for name in unlicensed)
    return f"These wheels declare none, so the SBOM gives them none: {names}. Check their projects' licences before redistributing this bundle."


def write_templates(folder: Path, values: dict[str, str]) -> None:
    """install.sh, README.md, the systemd units and the config examples, with `values` filled in."""
    targets = {
        "install.sh": "install.sh",
        "README.md": "README.md",
        **{u: f"systemd/{u}" for u in UNITS},
        **{c: f"config/{c}" for c in CONFIG_EXAMPLES},
    }
    templates = resources.files("medtriage.delivery") / "templates"
    for template, target in targets.items():
        text = (templates / template).read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        path = folder / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "install.sh").chmod(0o755)


def _manifest(python: str, platform: str, wheels: list[Path], models: dict[str, Path], unlicensed: list[str]) -> dict:
    from medtriage.serve.package import load_package

    return {
        "medtriage_version": medtriage.__version__,
        "python": python,
        "platform": platform,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "built_with": f"Python {sys.version.split()[0]}",
        "wheels": [{"file": w.name, "name": wheel_name_version(w)[0], "version": wheel_name_version(w)[1]} for w in wheels],
        "models": [{"folder": name, **load_package(path).identity()} for name, path in models.items()],
        "wheels_without_licence": unlicensed,  # their metadata declares none; the SBOM gives them none
    }


def write_checksums(folder: Path) -> None:
    """`SHA256SUMS` (sha256sum's format) of every file under `folder` but itself, sorted by path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUMS).write_text("".join(lines))


def _step(text: str) -> None:
    """One line on stderr per step of the build: the steps other than the download show no progress of their own."""
    print(f"bundle: {text}", file=sys.stderr, flush=True)


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder itself last."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
