"""`systemd-analyze verify` of unit files offline, and the bundle's units as install.sh writes them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from medtriage.delivery.bundle import UNITS, write_templates

DEFAULT_PREFIX = "/opt/medtriage"


def verify(analyze: str, units: list[Path]) -> list[str]:
    """What `systemd-analyze verify` says about `units`: its lines naming one of them, or its exit status."""
    done = subprocess.run([analyze, "verify", "--man=no", *map(str, units)], capture_output=True, text=True, timeout=60, check=False)
    names = [u.name for u in units] + [u.name.replace("@.", "@i.") for u in units]  # a template is checked as instance "i"
    problems = [line for line in (done.stdout + done.stderr).splitlines() if any(name in line for name in names)]
    return problems or ([f"exit status {done.returncode}: {done.stderr.strip()[-500:]}"] if done.returncode else [])


def installed_units(tmp_path: Path) -> list[Path]:
    """The bundle's units rewritten for PREFIX=tmp_path/opt, whose venv/bin/medtriage is an executable."""
    write_templates(tmp_path / "bundle", {})
    prefix = tmp_path / "opt"
    executable = prefix / "venv" / "bin" / "medtriage"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    (prefix / "systemd").mkdir()
    units = []
    for name in UNITS:
        text = (tmp_path / "bundle" / "systemd" / name).read_text()
        assert f"ExecStart={DEFAULT_PREFIX}/venv/bin/medtriage " in text
        units.append(prefix / "systemd" / name)
        units[-1].write_text(text.replace(DEFAULT_PREFIX, str(prefix)))  # install.sh: sed s#/opt/medtriage#$PREFIX#g
    return units


def environment_file(path: Path) -> dict[str, str]:
    """The variables of a systemd EnvironmentFile of plain KEY=VALUE lines (as the bundle's examples write them)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def settings(unit: Path, key: str) -> list[str]:
    """The values of every `key=` line of a unit file, in order."""
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(f"{key}=")]


def exec_start(unit: Path, environment: dict[str, str], instance: str) -> list[str]:
    """The unit's ExecStart as systemd runs it: "${NAME}" one argument, "$NAME" split on white space (none if empty)."""
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    argv = []
    for word in line.removeprefix("ExecStart=").replace("%i", instance).split():
        if word.startswith("${"):
            argv.append(environment[word[2:-1]])
        elif word.startswith("$"):
            argv += environment[word[1:]].split()
        else:
            argv.append(word)
    return argv
