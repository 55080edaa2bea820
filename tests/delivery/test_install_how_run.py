"""How install.sh is started on a fresh hospital machine: through `sh` (a USB drive or /tmp mounted noexec refuses
`./install.sh`), from a folder whose path holds spaces, and run again at once. Runs against a small bundle of fake
packages and the stand-in interpreter of test_install_all_or_nothing.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from medtriage.delivery import bundle as bundle_module
from tests.delivery.test_bundle_offline import small_bundle
from tests.delivery.test_install_all_or_nothing import fake_python, snapshot

# `./install.sh` as a command shown to be run: a line of its own (a code block, install.sh's usage comment), or after
# a PYTHON= setting; not the text that says why it fails.
RUN_AS_A_PROGRAM = re.compile(r"^[#\s]*(PYTHON=\S+\s+)?\./install\.sh|PYTHON=\S+\s+\./install\.sh", re.MULTILINE)


def run_sh(script: str, prefix: Path, python: Path, cwd: Path, bin_dir: Path | None = None) -> subprocess.CompletedProcess:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    env = {**os.environ, "PYTHON": str(python), "PATH": path}
    return subprocess.run(["sh", script, str(prefix)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_every_command_shown_runs_install_sh_through_sh(tmp_path, monkeypatch, capsys):
    """README.md said `./install.sh`, which a noexec mount refuses with "Permission denied" before the script starts."""
    from medtriage.cli import main

    bundle = small_bundle(tmp_path)
    readme, script = (bundle / "README.md").read_text(), (bundle / "install.sh").read_text()
    assert not RUN_AS_A_PROGRAM.search(readme) and not RUN_AS_A_PROGRAM.search(script)
    assert "       sh install.sh                 # installs into /opt/medtriage" in readme
    assert "PYTHON=/usr/bin/python" in readme and re.search(r"PYTHON=/usr/bin/python\S+ sh install\.sh", readme)
    two = subprocess.run(["sh", "install.sh", "/opt/a", "/opt/b"], cwd=bundle, capture_output=True, text=True, check=False)
    assert two.returncode != 0 and "Run sh install.sh [PREFIX]." in two.stderr, two.stderr

    def fill(staging, models, python, platform, wheel):
        (staging / "bundle.json").write_text("{}")
        return []

    monkeypatch.setattr(bundle_module, "_model_folders", lambda packages: {"model": Path("unused")})
    monkeypatch.setattr(bundle_module, "_fill", fill)
    assert main(["bundle", "pkg", "--out", str(tmp_path / "out")]) == 0
    assert "run `sh install.sh` in it (see README.md)" in capsys.readouterr().err


def test_sh_installs_a_bundle_whose_install_sh_may_not_be_executed_from_a_path_with_spaces(tmp_path):
    """As on a noexec USB drive: the script without its execute bit, in a folder named as a desktop names one."""
    bundle = small_bundle(tmp_path / "USB stick" / "MedTriage bundle")
    (bundle / "install.sh").chmod(0o644)
    python, prefix = fake_python(tmp_path), tmp_path / "opt"
    done = run_sh("install.sh", prefix, python, cwd=bundle)
    assert done.returncode == 0, done.stderr
    assert f"next steps: {bundle}/README.md" in done.stdout and (prefix / "models" / "model" / "model.json").is_file()
    again = run_sh(str(bundle.relative_to(tmp_path) / "install.sh"), prefix, python, cwd=tmp_path)  # from another folder
    assert again.returncode == 0, again.stderr


def test_an_install_run_again_within_the_same_second_gets_a_release_of_its_own(tmp_path):
    """The release folder is named by the second: the second run found the first's name taken and stopped, saying that
    "another install started this second", though the lock it held said there was none."""
    same_second = tmp_path / "bin"
    same_second.mkdir()
    (same_second / "date").write_text("#!/bin/sh\necho 20261205T061921Z\n")
    (same_second / "date").chmod(0o755)
    bundle, python, prefix = small_bundle(tmp_path), fake_python(tmp_path), tmp_path / "opt"
    first = run_sh("install.sh", prefix, python, cwd=bundle, bin_dir=same_second)
    assert first.returncode == 0, first.stderr
    running = Path(os.readlink(prefix / "venv"))
    second = run_sh("install.sh", prefix, python, cwd=bundle, bin_dir=same_second)
    assert second.returncode == 0, second.stderr
    assert Path(os.readlink(prefix / "venv")) == running.with_name(f"{running.name}-2")
    assert sorted(p.name for p in (prefix / "venvs").iterdir()) == [running.name, f"{running.name}-2"]
    assert f"the previous release stays in {running}" in second.stdout
    assert not [p for p in snapshot(prefix) if p.rsplit("/", 1)[-1].startswith(".")]  # nothing staged or aside left
