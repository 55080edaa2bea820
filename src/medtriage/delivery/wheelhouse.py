"""A wheelhouse of the torch-free install for a named Python and platform: MedTriage's own wheel plus
every base dependency as binary wheels (`pip download --only-binary=:all:`)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

import medtriage
from medtriage.errors import ConfigError, MedTriageError

if TYPE_CHECKING:
    from packaging.requirements import Requirement

PYTHONS = ("3.10", "3.11", "3.12")
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # glibc 2.28: RHEL/Rocky 8+, Debian 10+, Ubuntu 20.04+; onnxruntime needs it
_LEGACY_MANYLINUX = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
_SOURCE_FILES = ("pyproject.toml", "README.md")  # with src/: what `pip wheel` needs to build medtriage
ZIP_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry holds
_DISK_ERROR = re.compile(rf"\[Errno ({errno.ENOSPC}|{errno.EDQUOT}|{errno.EROFS})\]")  # pip reports an OSError as a traceback
METADATA_MAX = 16 * 1024 * 1024  # bytes of a wheel's METADATA (a long description included); more is not a wheel's


class BuildError(MedTriageError):
    """A step of building the bundle failed (pip, the wheel build or the SBOM generator)."""


def default_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_target(python: str, platform: str) -> list[str]:
    """Refuse a target no wheelhouse can be made for (before any build or download); returns the platform's tags."""
    if python not in PYTHONS:
        raise ConfigError(f"unsupported Python '{python}'", where="--python", hint=f"use one of {', '.join(PYTHONS)}")
    return platform_tags(platform)


def platform_tags(platform: str) -> list[str]:
    """`manylinux_2_28_x86_64` -> itself and every older manylinux tag of the arch, newest first: pip does not
    expand a `--platform`, and many wheels are tagged only manylinux2014 / manylinux_2_17."""
    match = re.fullmatch(r"manylinux_(2)_(\d+)_(\w+)", platform) or re.fullmatch(r"(manylinux\d+)_(\w+)", platform)
    # manylinux_2_5 (= manylinux1) is the oldest tag: below it no tag would remain and pip would fetch this machine's wheels
    if not match or (match.group(1) not in _LEGACY_MANYLINUX if len(match.groups()) == 2 else int(match.group(2)) < 5):
        raise ConfigError(
            f"unsupported platform '{platform}'",
            where="--platform",
            hint=f"name a manylinux tag (glibc 2.5 or later) such as {DEFAULT_PLATFORM} or manylinux2014_x86_64",
        )
    if len(match.groups()) == 2:
        (major, minor), arch = _LEGACY_MANYLINUX[match.group(1)], match.group(2)
    else:
        major, minor, arch = int(match.group(1)), int(match.group(2)), match.group(3)
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    tags += [f"{legacy}_{arch}" for legacy, (ma, mi) in _LEGACY_MANYLINUX.items() if (ma, mi) <= (major, minor)]
    return tags


def source_root() -> Path | None:
    """The source checkout this medtriage runs from (None when it was installed from a wheel)."""
    root = Path(medtriage.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "medtriage"' in pyproject.read_text() else None


def build_medtriage_wheel(out_dir: Path, source: Path | None = None) -> Path:
    """Build MedTriage's own wheel into `out_dir` from a copy of the source (building in the tree would
    leave build/ and *.egg-info behind)."""
    source = source or source_root()
    if source is None:
        raise ConfigError(
            "no MedTriage source checkout to build the wheel from",
            where="--wheel",
            hint="run from a checkout, or pass a built medtriage wheel with --wheel FILE",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "source"
        shutil.copytree(source / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        for name in _SOURCE_FILES:
            shutil.copy(source / name, copy / name)
        # Every entry gets one fixed time (unless the caller sets its own): the same source gives the same wheel,
        # so its sha256 in the SBOM and SHA256SUMS is the same in every build of it.
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(copy), "-w", str(out_dir)],
            "building the medtriage wheel",
            env={**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", ZIP_EPOCH)},
        )
    wheels = sorted(out_dir.glob(f"medtriage-{medtriage.__version__}-*.whl"))
    if not wheels:
        raise BuildError(f"pip built no medtriage {medtriage.__version__} wheel", where=out_dir)
    return wheels[-1]


def download_dependencies(wheel: Path, out_dir: Path, python: str, platform: str) -> list[Path]:
    """Every wheel the torch-free install of `wheel` needs on `python`/`platform`, downloaded into `out_dir`
    (the user's pip configuration picks the index); shows a progress line per wheel. Returns the wheels.

    pip evaluates environment markers for the interpreter it runs in, not the target one, so the
    wheelhouse is then checked against the target's markers and what is missing is downloaded too."""
    tags = check_target(python, platform)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [str(wheel)]
    for _ in range(5):
        _pip_download(wanted, out_dir, python, tags)
        wanted = missing_requirements(sorted(out_dir.glob("*.whl")), target_environment(python, platform))
        if not wanted:
            return sorted(out_dir.glob("*.whl"))
    raise BuildError(f"the wheelhouse still lacks {', '.join(wanted)} for Python {python} on {platform}", where=out_dir)


def target_environment(python: str, platform: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython `python` on a Linux `platform`."""
    arch = platform_tags(platform)[0].split("_", 3)[-1]
    full = _full_version(python)
    return {
        "python_version": ".".join(full.split(".")[:2]),
        "python_full_version": full,
        "implementation_name": "cpython",
        "implementation_version": full,
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": arch,
        "extra": "",
    }


def _full_version(python: str) -> str:
    """`python` as three parts, zeros added: "3.11" is 3.11.0. `pip download --python-version 3.11` pads it the same
    way and judges each wheel's Requires-Python by 3.11.0, so the markers here judge the wheelhouse as pip chose it
    (`python_full_version >= "3.11.1"` is false for it, as pip would refuse a wheel that requires 3.11.1)."""
    parts = python.split(".")[:3]
    return ".".join(parts + ["0"] * (3 - len(parts)))


def missing_requirements(wheels: list[Path], environment: dict[str, str]) -> list[str]:
    """Requirements of `wheels` (their markers evaluated in `environment`, with the extras other requirements ask
    of each wheel) that no wheel of the list satisfies."""
    from packaging.utils import canonicalize_name

    have: dict[str, list[str]] = {}
    for w in wheels:
        name, version = wheel_name_version(w)
        have.setdefault(canonicalize_name(name), []).append(version)
    requires = {w: _requirements(w) for w in wheels}
    extras = _requested_extras(requires, environment)
    missing = []
    for w, requirements in requires.items():
        for req in requirements:
            if not _applies(req, environment, extras.get(canonicalize_name(wheel_name_version(w)[0]), set())):
                continue
            versions = have.get(canonicalize_name(req.name), [])
            if not any(req.specifier.contains(v, prereleases=True) for v in versions):
                wanted = f"[{','.join(sorted(req.extras))}]" if req.extras else ""  # pip then fetches what the extras need
                missing.append(f"{req.name}{wanted}{req.specifier}")
    return sorted(set(missing))


def _requested_extras(requires: dict[Path, list[Requirement]], environment: dict[str, str]) -> dict[str, set[str]]:
    """Canonical name -> the extras that applicable requirements ask of it (`foo[bar]`), to a fixed point: an extra's
    own requirements may ask for more. pip judged these by this interpreter's markers, not the target's."""
    from packaging.utils import canonicalize_name

    extras: dict[str, set[str]] = {}
    while True:
        before = sum(map(len, extras.values()))
        for w, requirements in requires.items():
            asked = extras.get(canonicalize_name(wheel_name_version(w)[0]), set())
            for req in requirements:
                if req.extras and _applies(req, environment, asked):
                    extras.setdefault(canonicalize_name(req.name), set()).update(canonicalize_name(e) for e in req.extras)
        if sum(map(len, extras.values())) == before:
            return extras


def _applies(req: Requirement, environment: dict[str, str], extras: set[str]) -> bool:
    """Whether a requirement holds on the target for the wheel installed plain or with any of `extras`."""
    return req.marker is None or any(req.marker.evaluate({**environment, "extra": extra}) for extra in ("", *sorted(extras)))


def _requirements(wheel: Path) -> list[Requirement]:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return [Requirement(line) for line in _requires_dist(wheel)]
    except InvalidRequirement as err:
        raise BuildError(
            f"the wheel's metadata holds a requirement that cannot be read: {err}",
            where=wheel,
            hint="pin a release of that project whose wheel has valid metadata, or download the wheel again",
        ) from err


def _requires_dist(wheel: Path) -> list[str]:
    return wheel_metadata(wheel).get_all("Requires-Dist") or []


def wheel_metadata(wheel: Path) -> Message:
    """The core metadata (`*.dist-info/METADATA`) of a wheel file."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_metadata_entry(archive, wheel)) as entry:
            # A bounded read: the size _metadata_entry checks is the header's word, and the stream may hold more.
            data = entry.read(METADATA_MAX)
        return HeaderParser().parsestr(data.decode("utf-8"))
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as err:  # a damaged download: zlib's own error too
        raise BuildError(f"the wheel cannot be read: {err}", where=wheel, hint="download or build the wheel again") from err


def _metadata_entry(archive: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    info = next((i for i in archive.infolist() if i.filename.endswith(".dist-info/METADATA") and i.filename.count("/") == 1), None)
    if info is None:
        raise BuildError("the wheel has no *.dist-info/METADATA", where=wheel, hint="download or build the wheel again")
    if info.file_size > METADATA_MAX:  # the size the archive claims, checked before anything is unpacked
        raise BuildError(f"the wheel's METADATA claims {info.file_size} bytes, more than {METADATA_MAX}", where=wheel)
    if info.flag_bits & 0x1:  # zipfile would ask for a password (a RuntimeError); no wheel tool encrypts
        raise BuildError("the wheel's METADATA is encrypted", where=wheel, hint="download or build the wheel again")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # zipfile bounds no other method's output
        raise BuildError(
            f"the wheel's METADATA uses zip compression method {info.compress_type}, not stored or deflate",
            where=wheel,
            hint="wheels use deflate: download or build the wheel again",
        )
    return info


def _pip_download(requirements: list[str], out_dir: Path, python: str, tags: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(out_dir),
        *requirements,
    ]
    for tag in tags:
        command += ["--platform", tag]
    log: list[str] = []
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip,
        tqdm(desc=f"wheels for cp{python.replace('.', '')} {tags[0]}", unit=" wheel", file=sys.stderr) as bar,
    ):
        for line in pip.stdout:
            log.append(line)
            step = re.match(r"(Collecting|Processing|Downloading) (\S+)", line.strip())
            if step:  # pip names each requirement as it resolves it, then each file as it fetches it
                bar.set_postfix_str(Path(step.group(2)).name[:50], refresh=step.group(1) == "Downloading")
                bar.update(step.group(1) != "Downloading")
    if pip.returncode != 0:
        disk = next((line.strip() for line in log if _DISK_ERROR.search(line)), None)  # the last line of pip's traceback
        if disk:
            raise BuildError(
                f"pip could not write the wheels for Python {python} on {tags[0]}: {disk}",
                where=out_dir,
                hint="free space on that disk, or choose an --out on a writable disk with more room, then build the bundle again",
            )
        errors = [line.strip() for line in log if line.startswith("ERROR")] or log[-5:]
        raise BuildError(
            f"pip could not download every dependency for Python {python} on {tags[0]}: {' '.join(errors)[-600:]}",
            where=f"pip download of {_listed(requirements)} into {out_dir}",
            hint="check --python and --platform against the target machines (a dependency may have no binary wheel for "
            "them); pip takes its index from its configuration: a machine without internet access needs a local index "
            "or wheel folder (PIP_INDEX_URL, PIP_FIND_LINKS, or index-url / find-links in pip.conf)",
        )


def _listed(requirements: list[str], shown: int = 5) -> str:
    """The first `shown` requirements, and how many more: an error stays readable."""
    more = f" and {len(requirements) - shown} more" if len(requirements) > shown else ""
    return ", ".join(requirements[:shown]) + more


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """(name, version) from a wheel file name (PEP 427: name-version-...)."""
    name, version = wheel.name.split("-")[:2]
    return name, version


def _run(command: list[str], what: str, hint: str | None = None, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BuildError(f"{what} failed: {(done.stderr or done.stdout).strip()[-800:]}", hint=hint)
