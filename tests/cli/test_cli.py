import subprocess
import sys


def test_help_works_from_the_console_script():
    out = subprocess.run([sys.executable, "-m", "medtriage.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: medtriage" in out.stdout


def test_every_console_script_points_at_a_callable():
    import importlib
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"medtriage", "medtriage-train", "medtriage-export"} <= set(scripts)
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
