"""The bundle's CycloneDX SBOM: one component per wheel with its version, purl, sha256, dependencies and the
licence its own metadata declares.

The generator (cyclonedx-py) reads licences only in its environment mode, from the metadata of installed
distributions. importlib.metadata also finds the `*.dist-info` of a wheel file that is itself on the path,
so the generator runs with the wheels as the interpreter's whole path (`-S`: no site-packages). Nothing is
installed or imported, and wheels for another Python version are read the same way. The generator turns
License-Expression, an SPDX `License` value and the `License ::` classifiers into licences; a `License`
value that names a licence without being an SPDX id ("3-Clause BSD License") it drops, so that one is kept
here as a named licence. A wheel that declares nothing keeps no licence: none is invented.

Each model package the bundle ships, installed beside the wheels, is a component too (a machine-learning model with
its name and version), holding each of its files with its sha256.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from medtriage.delivery.wheelhouse import BuildError, wheel_metadata, wheel_name_version
from medtriage.format import sha256_file

SPEC_VERSION = "1.6"
_NAME_MAX = 100  # a longer `License` value is a licence text, not a licence name
_NOT_A_LICENCE = {"", "unknown", "none", "n/a"}
_GENERATOR_HINT = "install the generator: pip install cyclonedx-bom (part of medtriage[dev])"


def write_sbom(wheels: list[Path], out_file: Path, pyproject: Path | None, models: dict[Path, dict] | None = None) -> list[str]:
    """Write the SBOM of `wheels` and `models` (each model package folder, inside the bundle, with its identity:
    name, version) to `out_file` (`pyproject`: the root component, when building from a checkout); it is checked
    against the CycloneDX schema first. Returns the names of the wheels whose metadata declares no licence."""
    document = _generate(wheels, pyproject)
    by_key = {_key(*wheel_name_version(w)): w for w in wheels}  # by version too: a wheelhouse may hold two of one name
    root = document.get("metadata", {}).get("component")
    listed, unlicensed = set(), []
    for component in [*([root] if root else []), *document.get("components", [])]:
        key = _key(component["name"], component.get("version", ""))
        wheel = by_key.get(key)
        if wheel is None:
            raise BuildError(f"the SBOM generator listed '{' '.join(key)}', which is no wheel of the bundle", where=out_file)
        listed.add(key)
        component["hashes"] = [{"alg": "SHA-256", "content": sha256_file(wheel)}]
        if not component.get("licenses"):
            component["licenses"] = named_licences(wheel)
        if not component["licenses"]:
            del component["licenses"]
            unlicensed.append(wheel_name_version(wheel)[0])
    if set(by_key) - listed:
        raise BuildError(f"the SBOM generator missed {', '.join(' '.join(k) for k in sorted(set(by_key) - listed))}", where=out_file)
    document.setdefault("components", []).extend(_model_component(folder, identity) for folder, identity in (models or {}).items())
    text = json.dumps(document, indent=2) + "\n"
    validate(text)
    out_file.write_text(text)
    return sorted(unlicensed)


def _model_component(folder: Path, identity: dict) -> dict:
    """A model package as the bundle holds it: its files named from the bundle's root (models/<folder>/...)."""
    where = f"models/{folder.name}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "type": "machine-learning-model",
        "bom-ref": f"model:{where}",
        "name": identity["name"],
        "version": str(identity["version"]),
        "components": [_file_component(f"{where}/{p.relative_to(folder).as_posix()}", p) for p in files],
    }


def _file_component(name: str, path: Path) -> dict:
    return {"type": "file", "bom-ref": f"file:{name}", "name": name, "hashes": [{"alg": "SHA-256", "content": sha256_file(path)}]}


def _key(name: str, version: str) -> tuple[str, str]:
    """A distribution as both a wheel's file name and its metadata spell it."""
    from packaging.utils import canonicalize_name, canonicalize_version

    return canonicalize_name(name), canonicalize_version(version)


def named_licences(wheel: Path) -> list[dict]:
    """The wheel's `License` values that name a licence (one short line), as CycloneDX named licences."""
    values = {value.strip() for value in wheel_metadata(wheel).get_all("License") or []}
    return [
        {"license": {"name": value, "acknowledgement": "declared"}}
        for value in sorted(values)
        if value.lower() not in _NOT_A_LICENCE and len(value) <= _NAME_MAX and "\n" not in value
    ]


def validate(text: str) -> None:
    """Check an SBOM against the CycloneDX JSON schema (strict: no unknown properties)."""
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError as err:
        raise BuildError("cannot check the SBOM: cyclonedx-python-lib is missing", hint=_GENERATOR_HINT) from err
    error = JsonStrictValidator(SchemaVersion.from_version(SPEC_VERSION)).validate_str(text)
    if error is not None:
        raise BuildError(f"the SBOM does not match the CycloneDX {SPEC_VERSION} schema: {str(error)[:600]}")


def _generate(wheels: list[Path], pyproject: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, python = Path(tmp) / "sbom.cdx.json", Path(tmp) / "python"
        # The generator asks this interpreter for its path; only that question sees the wheels (the
        # generator itself must keep importing its own dependencies, not the bundle's).
        path = os.pathsep.join(str(w.resolve()) for w in wheels)
        python.write_text(f'#!/bin/sh\nPYTHONPATH={shlex.quote(path)} exec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
        command = [sys.executable, "-m", "cyclonedx_py", "environment", "-S", str(python)]
        command += ["--sv", SPEC_VERSION, "--of", "JSON", "--output-reproducible", "--no-validate", "-o", str(out)]  # checked below
        if pyproject is not None:
            command += ["--pyproject", str(pyproject)]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"writing the SBOM (cyclonedx-py) failed: {(done.stderr or done.stdout).strip()[-800:]}", hint=_GENERATOR_HINT)
        return json.loads(out.read_text())
