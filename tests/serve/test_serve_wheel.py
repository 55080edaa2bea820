"""What a hospital installs: the wheel without extras, in a fresh virtualenv, scoring a DICOM file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[2]


def run(*command, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.slow
def test_wheel_without_extras_scores_a_dicom_file(package_dir, tmp_path):
    source = tmp_path / "source"  # a copy: building in the shared tree would leave build/ folders behind
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", source, "-w", tmp_path / "dist")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("medtriage-*.whl")
    assert run(sys.executable, "-m", "venv", tmp_path / "venv").returncode == 0
    python = tmp_path / "venv" / "bin" / "python"
    probe = run(python, "-m", "pip", "download", "-q", "--no-deps", "tqdm", "-d", tmp_path / "probe", timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the package index is unreachable: {probe.stderr.strip()[-200:]}")
    installed = run(python, "-m", "pip", "install", "-q", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]

    heavy = run(python, "-c", "import importlib.util as u; print([m for m in ('torch', 'monai', 'mlflow', 'hydra') if u.find_spec(m)])")
    assert heavy.stdout.strip() == "[]"  # the base install brings none of the training stack
    scored = run(tmp_path / "venv" / "bin" / "medtriage", "score", package_dir, get_testdata_file("CT_small.dcm"), "--json", timeout=120)
    assert scored.returncode == 0, scored.stderr
    (result,) = json.loads(scored.stdout)["results"]
    assert result["file"].endswith("CT_small.dcm") and 0 <= result["probability"] <= 1
