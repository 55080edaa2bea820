"""The offline bundle: everything a hospital machine without internet needs to install and run MedTriage.

    <out>/wheels/        MedTriage's wheel + every base dependency for one Python and platform
    <out>/models/<name>/ the model packages (verified before they are copied)
    <out>/install.sh     checks SHA256SUMS, then `pip install --no-index --find-links wheels`
    <out>/systemd/, config/, README.md, sbom.cdx.json, bundle.json, SHA256SUMS

The bundle is built in a hidden sibling folder, locked while one build writes it, and renamed into place when complete.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shlex
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import medtriage
from medtriage.delivery.sbom import write_sbom
from medtriage.delivery.wheelhouse import (
    DEFAULT_PLATFORM,
    BuildError,
    build_medtriage_wheel,
    check_target,
    default_python,
    download_dependencies,
    source_root,
    wheel_name_version,
)
from medtriage.errors import ConfigError, PackageError, printable
from medtriage.format import sha256_file
from medtriage.io.safe_output import sync_folder, try_lock

CHECKSUMS, MANIFEST, SBOM = "SHA256SUMS", "bundle.json", "sbom.cdx.json"
UNITS = ("medtriage-serve@.service", "medtriage-listen@.service")
CONFIG_EXAMPLES = ("serve.env.example", "listen.env.example")
MODEL_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a systemd instance name and a SHA256SUMS path as is


@dataclass
class Bundle:
    directory: Path
    wheels: list[Path]
    models: list[str]
    warnings: list[str] = field(default_factory=list)  # about a bundle that was written whole


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
    _check_out(out)
    check_target(python, platform)  # before the wheel is built and anything downloaded
    staging, lock = _new_staging(out)
    try:
        models = _model_folders(packages)
        _refuse_out_inside_a_package(out, models)
        wheels = _fill(staging, models, python, platform, wheel)
        _sync_tree(staging)  # on disk before the bundle takes its name and the build reports success
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException as err:
        _remove_partial(staging)  # a failed build (no network, pip error, a full disk) leaves no half bundle
        if isinstance(err, OSError):
            raise _disk_error(err, staging, out) from err
        raise
    finally:
        os.close(lock)
    unsynced = _sync_name(out, staging)  # the bundle is whole under its name from here on: no error can undo that
    return Bundle(out, [out / "wheels" / w.name for w in wheels], list(models), [unsynced] if unsynced else [])


def _check_out(out: Path) -> None:
    """Refuse an `out` the bundle cannot be built as: a file, a folder that holds something, a mount point, or one
    below a folder this user may not enter (pathlib raises the error of looking, not a message)."""
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError("the output path is a file, not a folder", where=out, hint="choose a new --out folder")
        if out.exists() and any(out.iterdir()):
            raise ConfigError("the output folder exists and is not empty", where=out, hint="choose a new --out folder or remove it")
    except OSError as err:
        raise ConfigError(
            f"cannot look into the output folder or a folder above it: {err.strerror}",
            where=out,
            hint="choose an --out inside a folder you may enter and write to",
        ) from err
    if os.path.ismount(out):  # the bundle is built beside it and renamed into place: a mount point cannot be replaced
        raise ConfigError(
            "the output folder is a mount point (a USB drive or network share, for example)",
            where=out,
            hint=f"name a new folder on it, e.g. --out {out / 'medtriage-bundle'}",
        )


def _sync_name(out: Path, staging: Path) -> str | None:
    """The rename on disk, or a warning saying what a failure to put it there means for the finished bundle."""
    try:
        sync_folder(out.parent)
    except OSError as err:
        return (
            f"the bundle {out} is complete, but its disk reported an error while storing its name ({out.parent}: "
            f"{err.strerror or err}): after a power loss it may be missing, or found as {staging.name} beside it. "
            "Check that disk (dmesg), and before copying the bundle run `sha256sum --check SHA256SUMS` in it"
        )
    return None


_DISK_HINTS = {  # for a file of the bundle, or a write that names none
    errno.ENOSPC: "free space on that disk, or choose an --out on a disk with more room",
    errno.EDQUOT: "free space within your quota there, or choose an --out on another disk",
    errno.EROFS: "that disk is read-only: choose an --out on a writable one",
    errno.EACCES: "choose an --out in a folder you may write to",
    errno.EPERM: "choose an --out in a folder you may write to",
}


def _disk_error(err: OSError, staging: Path, out: Path) -> BuildError:
    """An OSError of the build (a full disk, a read-only or unwritable folder) as a message: the file, what failed
    and what to do. A file of the bundle is named as the bundle holds it: the folder it was written in is gone."""
    files, reason = [err.filename2, err.filename], err.strerror or str(err)  # sendfile's: the target, the source
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        source, target, reason = err.args[0][0]  # copytree's: (source, target, message) of each file it could not copy
        files = [target, source]
    files = [Path(os.fspath(f)) for f in files if isinstance(f, (str, os.PathLike))]
    inside = next((f for f in files if f.is_relative_to(staging)), None)
    if files and inside is None:  # a file outside the bundle: a model package read, a temporary folder
        hint = "free space on that disk (TMPDIR moves temporary files)" if err.errno == errno.ENOSPC else "check that file and its disk"
        return BuildError(
            f"building the bundle {out} failed on this file: {reason}", where=files[0], hint=f"{hint}, then build the bundle again"
        )
    hint = f"{_DISK_HINTS.get(err.errno, 'check that disk, whose errors dmesg shows')}, then build the bundle again"
    what = f"{inside.relative_to(staging).as_posix()} of the bundle" if inside and inside != staging else "the bundle"
    return BuildError(f"cannot write {what}: {reason}", where=out, hint=hint)


def _new_staging(out: Path) -> tuple[Path, int]:
    """The empty hidden sibling the bundle is built in, made before any long step (a parent that cannot hold the
    bundle: missing permission, a file, a read-only file system, is reported up front), and a descriptor that holds
    its lock while the build runs: one left by a stopped build is removed, one a running build holds is not."""
    staging = out.with_name(f".{out.name}.partial")
    try:
        if staging.is_dir():
            os.close(_lock(staging, out))  # free: left by a stopped build
        _remove_partial(staging)
        _refuse_a_partial_left_behind(staging, out)
        staging.mkdir(parents=True)
        return staging, _lock(staging, out)
    except OSError as err:
        raise ConfigError(
            f"cannot create the bundle folder here: {err.strerror}",
            where=out,
            hint="choose an --out inside a folder you can write to",
        ) from err


def _remove_partial(staging: Path) -> None:
    """Remove the hidden folder of a failed or stopped build, as far as this user can. A copy of a read-only package
    holds folders copytree made read-only (mode 0555) before the copy failed, whose files no user but root may
    remove: each folder is made writable by its owner first."""
    if not staging.is_dir() or staging.is_symlink():
        return  # nothing, or not a folder a build made: _refuse_a_partial_left_behind names it
    _open_to_owner(staging)
    for folder, subfolders, _ in os.walk(staging):  # top-down: each subfolder is opened before the walk lists it
        for name in subfolders:
            _open_to_owner(Path(folder, name))
    shutil.rmtree(staging, ignore_errors=True)


def _open_to_owner(folder: Path) -> None:
    """Let the owner list, enter and empty `folder`; a link is left alone (chmod would change what it leads to)."""
    try:
        if not folder.is_symlink():
            folder.chmod(stat.S_IMODE(folder.stat().st_mode) | stat.S_IRWXU)
    except OSError:
        pass  # another user's folder: the removal leaves it, and the next build names it


def _refuse_a_partial_left_behind(staging: Path, out: Path) -> None:
    """A staging path that could not be removed would fail the mkdir with a bare "File exists"."""
    if staging.exists() or staging.is_symlink():
        quoted = shlex.quote(str(staging))
        raise ConfigError(
            f"{staging}, where the bundle is built before it takes its name, is left from an earlier build (or was put "
            "there by something else) and cannot be removed",
            where=out,
            hint=f"remove it (chmod -R u+w {quoted} && rm -rf {quoted}, as its owner or root), then build the bundle again",
        )


def _lock(staging: Path, out: Path) -> int:
    """A descriptor of `staging` holding flock's lock on it (gone when it is closed). On a file system without such
    locks (some network shares) the folder counts as free."""
    fd = os.open(staging, os.O_RDONLY)
    if try_lock(fd) is False:
        os.close(fd)
        raise ConfigError(
            f"another `medtriage bundle` is writing this bundle (in {staging})",
            where=out,
            hint="let it finish, or choose another --out",
        )
    return fd


def _fill(staging: Path, models: dict[str, Path], python: str, platform: str, wheel: str | Path | None) -> list[Path]:
    """Write everything of the bundle into `staging`; returns its wheels."""
    wheels_dir = staging / "wheels"
    own = _own_wheel(wheel, wheels_dir)
    wheels = download_dependencies(own, wheels_dir, python, platform)
    _step(f"copying and verifying {len(models)} model package(s)")
    for name, source in models.items():
        try:
            shutil.copytree(source, staging / "models" / name, ignore=shutil.ignore_patterns(".*"), copy_function=_copy_file)
        except _CopyFailed as failed:
            raise failed.__cause__ from None
        _owner_writable(staging / "models" / name)
    # The copies are what ships: verified again, as the sources may have changed during the download.
    models = {name: _verified_copy(staging / "models" / name, source) for name, source in models.items()}
    root = source_root()
    _step("writing the SBOM (cyclonedx-py) and SHA256SUMS")
    identities = {copy: _identity(copy) for copy in models.values()}
    unlicensed = write_sbom(wheels, staging / SBOM, root / "pyproject.toml" if root else None, identities)
    write_templates(staging, template_values(python, platform, wheels, list(models), unlicensed))
    (staging / MANIFEST).write_text(json.dumps(_manifest(python, platform, wheels, models, unlicensed), indent=2) + "\n")
    write_checksums(staging)
    return wheels


class _CopyFailed(Exception):
    """A file copytree could not copy, out of it at once: copytree would note the OSError and copy on (onto a full
    disk), then raise a shutil.Error whose text has lost the error's number."""


def _owner_writable(folder: Path) -> None:
    """copytree gives each folder the mode of its source: the copy of a read-only package (a frozen release, a disc)
    would be a folder its owner cannot empty, neither the partial folder of a failed build, which then refused every
    later build into the same --out, nor the finished bundle."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _copy_file(source: str, target: str) -> None:
    try:
        shutil.copy2(source, target)
    except OSError as err:
        raise _CopyFailed from err


def _model_folders(packages: list[str | Path]) -> dict[str, Path]:
    """Folder name -> package folder, each loaded (schema and sha256 checked) and opened by ONNX Runtime before anything
    is built: a graph it cannot read would otherwise ship, and fail only in the hospital's install."""
    from medtriage.serve.package import load_package

    if not packages:
        raise ConfigError("no model package given", hint="name one or more package folders, e.g. models/pneumonia-sites-r18")
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
        _opens_in_onnx_runtime(package)
        folders[name] = package.directory
    return folders


def _refuse_out_inside_a_package(out: Path, models: dict[str, Path]) -> None:
    """The bundle would stay in the package folder, and every later bundle of that package would ship it."""
    for folder in models.values():
        if out.is_relative_to(folder.resolve()):
            raise ConfigError(
                f"the output folder is inside the model package {folder}, which the bundle ships",
                where=out,
                hint="choose an --out outside every package folder",
            )


def _opens_in_onnx_runtime(package) -> None:
    from medtriage.serve.predictor import create_session

    create_session(package)


def _check_shipped_files(package: Path) -> None:
    """Refuse, before the long steps, a file of the package the bundle cannot ship: a link that leads nowhere (the
    copy would fail at the end of the build), one that leads round in a loop or back to a folder that holds it (the
    copy follows links: it would never end), something that is neither a file nor a folder (a named pipe or a device
    the copy would wait on or read without end) or a name SHA256SUMS cannot hold on one line (a line break would make
    install.sh call the whole bundle damaged; a byte that is no UTF-8 cannot be written into it)."""
    for path, walked in _shipped_files(package):  # each is checked before the walk goes into it
        relative = path.relative_to(package).as_posix()
        if not relative.isprintable():
            raise PackageError(
                f"the package holds a file whose name cannot be listed in SHA256SUMS: '{printable(relative)}'",
                where=package,
                hint="rename or remove that file: the bundle lists every file by name, one per line",
            )
        if path.is_symlink():
            _check_link(path, walked)
        if not (path.is_file() or path.is_dir()):
            raise PackageError(
                f"the package holds {_kind(path)}, which the bundle cannot ship: only files and folders",
                where=path,
                hint="remove it from the package folder, or the link that leads to it",
            )


def _check_link(link: Path, walked: tuple[str, ...]) -> None:
    """`walked`: the real paths of the folders the walk to `link` went through, the package's first."""
    try:
        os.stat(link)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PackageError(
                "links in the package lead round in a loop",
                where=link,
                hint="remove the link, or point it at a file or folder instead of another link of the loop",
            ) from None
        raise PackageError(
            "a link in the package leads nowhere", where=link, hint="remove the link or restore the file it points to"
        ) from None
    target = os.path.realpath(link)
    if link.is_dir() and any(folder == target or folder.startswith(target.rstrip("/") + "/") for folder in walked):
        raise PackageError(
            f"a link in the package leads back to {printable(target)}, a folder that holds it: the copy, which follows "
            "links, would never end",
            where=link,
            hint="remove the link, or replace it with a copy of the files it should give",
        )


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _shipped_files(folder: Path, walked: tuple[str, ...] = ()):
    """What the copy into the bundle takes from `folder`: everything below it but hidden names, links followed; each
    path with the real paths of the folders the walk went through to reach it. A folder is walked only when the
    caller asks for the next path after it: a check that raises on it stops the walk before it goes in."""
    walked = (*walked, os.path.realpath(folder))
    for path in sorted(folder.iterdir()):
        if not path.name.startswith("."):  # the copy's ignore pattern
            yield path, walked
            if path.is_dir():
                yield from _shipped_files(path, walked)


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


def _identity(package: Path) -> dict:
    from medtriage.serve.package import load_package

    return load_package(package).identity()


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
