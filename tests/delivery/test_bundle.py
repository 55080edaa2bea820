"""The offline bundle: built once per session from the real index, installed into a fresh virtualenv with
`--no-index` by its own install.sh, scoring a real DICOM file; tampered or extra files stop the installer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medtriage.delivery.bundle import CHECKSUMS, SBOM, build_bundle, template_values, write_templates
from medtriage.delivery.sbom import write_sbom
from medtriage.delivery.wheelhouse import (
    missing_requirements,
    platform_tags,
    target_environment,
)
from medtriage.errors import ConfigError
from medtriage.format import sha256_file
from tests.delivery.units import verify
from tests.export.tiny_package import shared_tiny_package


def run(*command, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """A bundle of the session's tiny package for this interpreter (read-only: tests copy it to change it)."""
    tmp = tmp_path_factory.mktemp("bundle")
    probe = run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "tqdm", "-d", tmp / "probe", timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the package index is unreachable: {probe.stderr.strip()[-200:]}")
    package_dir = shared_tiny_package(tmp_path_factory)[0].package_dir
    return build_bundle([package_dir], tmp / "bundle")


def tampered_copy(bundle, tmp_path: Path, relative: str) -> Path:
    """A copy of the bundle (hard links, except the file at `relative`, which gets its own bytes)."""
    copy = Path(shutil.copytree(bundle.directory, tmp_path / "bundle", copy_function=os.link))
    target = copy / relative
    if target.exists():
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.unlink()
        target.write_bytes(bytes(data))
    else:
        shutil.copy(bundle.wheels[-1], target)  # a wheel SHA256SUMS does not list
    return copy


@pytest.mark.slow
def test_bundle_installs_offline_and_scores_a_dicom_file(bundle, tmp_path):
    prefix = tmp_path / "opt"
    installed = run(bundle.directory / "install.sh", prefix, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "tiny-pneumonia v1" in installed.stdout and "verified" in installed.stdout
    python = prefix / "venv" / "bin" / "python"
    heavy = run(python, "-c", "import importlib.util as u; print([m for m in ('torch', 'monai', 'mlflow', 'hydra') if u.find_spec(m)])")
    assert heavy.stdout.strip() == "[]"  # the base install brings none of the training stack
    scored = run(
        prefix / "venv" / "bin" / "medtriage",
        "score",
        prefix / "models" / "tiny-pneumonia",
        get_testdata_file("CT_small.dcm"),
        "--json",
        "--allow-out-of-scope",
        timeout=120,
    )  # a CT, not a chest X-ray
    assert scored.returncode == 0, scored.stderr
    (result,) = json.loads(scored.stdout)["results"]
    assert result["file"].endswith("CT_small.dcm") and 0 <= result["probability"] <= 1
    unit = (prefix / "systemd" / "medtriage-serve@.service").read_text()
    assert f"ExecStart={prefix}/venv/bin/medtriage serve {prefix}/models/%i" in unit and "TOKEN" not in unit.split("ExecStart")[1]
    assert "systemd-analyze verify found" not in installed.stderr
    analyze = shutil.which("systemd-analyze")  # test_units.py requires it; here the installed units are checked too
    if analyze:
        assert verify(analyze, sorted((prefix / "systemd").glob("*.service"))) == []


def sbom_components(sbom: dict) -> dict[str, dict]:
    """Normalised name -> component of a wheel, the root component (MedTriage itself) included."""
    root = [sbom["metadata"]["component"]] if "component" in sbom.get("metadata", {}) else []
    wheels = [c for c in sbom["components"] if c["type"] != "machine-learning-model"]
    return {c["name"].lower().replace("_", "-"): c for c in root + wheels}


def assert_valid_cyclonedx(text: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    assert json.loads(text)["specVersion"] == "1.6"
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, str(error)[:2000]


@pytest.mark.slow
def test_sums_and_sbom_cover_every_file_and_wheel(bundle):
    listed = dict(reversed(line.split("  ", 1)) for line in (bundle.directory / CHECKSUMS).read_text().splitlines())
    files = {p.relative_to(bundle.directory).as_posix() for p in bundle.directory.rglob("*") if p.is_file()} - {CHECKSUMS}
    assert set(listed) == files
    assert all(sha256_file(bundle.directory / name) == digest for name, digest in listed.items())
    sbom = json.loads((bundle.directory / SBOM).read_text())
    components = sbom_components(sbom)
    assert len(components) == len(bundle.wheels)
    (model,) = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    files = {c["name"]: c["hashes"][0]["content"] for c in model["components"]}
    assert files == {name: digest for name, digest in listed.items() if name.startswith("models/")}
    for wheel in bundle.wheels:
        (digest,) = components[wheel.name.split("-")[0].lower().replace("_", "-")]["hashes"]
        assert digest == {"alg": "SHA-256", "content": sha256_file(wheel)}, wheel.name
    assert {"medtriage", "onnxruntime", "pydicom", "numpy"} <= set(components)


@pytest.mark.slow
def test_the_sbom_gives_every_wheel_its_declared_licence_and_follows_the_schema(bundle):
    text = (bundle.directory / SBOM).read_text()
    assert_valid_cyclonedx(text)
    components = sbom_components(json.loads(text))
    numpy, onnxruntime = components["numpy"]["licenses"], components["onnxruntime"]["licenses"]
    assert "BSD-3-Clause" in json.dumps(numpy)  # numpy: License-Expression
    assert {"license": {"acknowledgement": "declared", "id": "MIT"}} in onnxruntime  # onnxruntime: classifier
    assert components["medtriage"]["licenses"][0]["license"]["id"] == "Apache-2.0"
    unlicensed = json.loads((bundle.directory / "bundle.json").read_text())["wheels_without_licence"]
    for wheel in bundle.wheels:
        name = wheel.name.split("-")[0].lower().replace("_", "-")
        assert ("licenses" in components[name]) == (wheel.name.split("-")[0] not in unlicensed), wheel.name
    readme = (bundle.directory / "README.md").read_text()
    assert f"gives them none: {', '.join(f'`{n}`' for n in unlicensed)}." in readme if unlicensed else "Every wheel declares one." in readme


def test_each_wheel_gets_the_licence_its_metadata_declares_and_none_is_invented(tmp_path):
    wheels = [
        _wheel(tmp_path, "alpha", "1.0", ["beta>=1"], ["License-Expression: MIT OR Apache-2.0", "License: not read: an expression wins"]),
        _wheel(tmp_path, "beta", "2.0", [], ["Classifier: License :: OSI Approved :: MIT License"]),
        _wheel(tmp_path, "gamma", "3.0", [], ["License: 3-Clause BSD License"]),  # a name, not an SPDX id
        _wheel(tmp_path, "delta", "4.0", [], ["License: UNKNOWN"]),
        _wheel(tmp_path, "epsilon", "5.0", [], []),
    ]
    out = tmp_path / "sbom.cdx.json"
    unlicensed = write_sbom(wheels, out, None)
    assert unlicensed == ["delta", "epsilon"]
    write_templates(tmp_path / "bundle", template_values("3.11", "manylinux_2_28_x86_64", wheels, ["model"], unlicensed))
    assert "gives them none: `delta`, `epsilon`." in (tmp_path / "bundle" / "README.md").read_text()
    assert_valid_cyclonedx(out.read_text())
    sbom = json.loads(out.read_text())
    components = sbom_components(sbom)
    declared = {"acknowledgement": "declared"}
    assert components["alpha"]["licenses"] == [{**declared, "expression": "MIT OR Apache-2.0"}]
    assert components["beta"]["licenses"] == [{"license": {**declared, "id": "MIT"}}]
    assert components["gamma"]["licenses"] == [{"license": {**declared, "name": "3-Clause BSD License"}}]
    assert "licenses" not in components["delta"] and "licenses" not in components["epsilon"]
    assert components["gamma"]["purl"] == "pkg:pypi/gamma@3.0"
    assert components["epsilon"]["hashes"] == [{"alg": "SHA-256", "content": sha256_file(wheels[-1])}]
    (alpha,) = [d for d in sbom["dependencies"] if d["ref"] == components["alpha"]["bom-ref"]]
    assert alpha["dependsOn"] == [components["beta"]["bom-ref"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "relative",
    ["wheels/{wheel}", "models/tiny-pneumonia/model.onnx", "wheels/extra-1.0-py3-none-any.whl"],
    ids=["changed wheel", "changed model", "unlisted wheel"],
)
def test_installer_refuses_a_tampered_bundle(bundle, tmp_path, relative):
    relative = relative.format(wheel=bundle.wheels[0].name)
    copy = tampered_copy(bundle, tmp_path, relative)
    prefix = tmp_path / "opt"
    refused = run(copy / "install.sh", prefix)
    assert refused.returncode != 0
    assert relative in refused.stdout + refused.stderr and "Nothing was installed" in refused.stderr
    assert not prefix.exists()


def test_platform_tags_reach_down_to_manylinux2014():
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_31_x86_64" not in tags
    assert platform_tags("manylinux2014_aarch64")[0] == "manylinux_2_17_aarch64"
    with pytest.raises(ConfigError, match="unsupported platform"):
        platform_tags("win_amd64")


def _wheel(folder: Path, name: str, version: str, requires: list[str], headers: list[str] = ()) -> Path:
    """A wheel file holding only its METADATA: `requires` as Requires-Dist, then the `headers` lines."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        metadata = "".join(f"Requires-Dist: {r}\n" for r in requires) + "".join(f"{h}\n" for h in headers)
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n{metadata}")
    return path


def test_requirements_are_judged_by_the_target_python_not_this_one(tmp_path):
    wheels = [
        _wheel(tmp_path, "anyio", "4.0", ['exceptiongroup>=1.0.2; python_version < "3.11"', "idna>=2.8", 'trio>=0.3; extra == "trio"']),
        _wheel(tmp_path, "idna", "3.4", []),
    ]
    assert missing_requirements(wheels, target_environment("3.10", "manylinux_2_28_x86_64")) == ["exceptiongroup>=1.0.2"]
    assert missing_requirements(wheels, target_environment("3.12", "manylinux_2_28_x86_64")) == []
    old_idna = [wheels[0], _wheel(tmp_path, "idna", "2.0", [])]
    assert missing_requirements(old_idna, target_environment("3.12", "manylinux_2_28_x86_64")) == ["idna>=2.8"]


def test_bundle_command_refuses_a_folder_in_use(tmp_path, capsys):
    from medtriage.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    assert main(["bundle", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
