"""install.sh puts a release into PREFIX all or nothing: models, units and config examples are staged beside their
places and verified, then renamed into place next to the switch of PREFIX/venv; a failure on the way (a full disk, a
copy that differs) leaves PREFIX as it was. The interpreter is a stand-in that makes a venv in milliseconds (the real
venv and pip run in test_bundle_build_and_install.py; the real one does install.sh's fsync); `cp`, `sed` and `mv` fail
where a test says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import medtriage
from medtriage.delivery.wheelhouse import default_python
from tests.delivery.test_bundle_offline import small_bundle

FAKE_PYTHON = f"""#!/bin/sh
case "$1 $2" in
    "-m venv") mkdir -p "$3/bin" && cat "$0" > "$3/bin/python" && chmod +x "$3/bin/python" &&
        printf '#!/bin/sh\\necho medtriage {medtriage.__version__}\\n' > "$3/bin/medtriage" && chmod +x "$3/bin/medtriage" ;;
    "-m pip") ;;
    *version_info*) echo {default_python()} ;;
    "-c "*os.fsync*) exec {sys.executable} "$@" ;;
    -c*) echo "model $3 verified and loaded by ONNX Runtime" ;;
esac
"""


def fake_python(folder: Path) -> Path:
    python = folder / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return python


def failing_command(folder: Path, command: str, arguments: str, then: str = "exit 1") -> Path:
    """A `command` on PATH that runs `then` when its arguments match the sh pattern `arguments` (the real one, $REAL,
    else)."""
    folder.mkdir(exist_ok=True)
    real = shutil.which(command)
    script = f'#!/bin/sh\nREAL={real}\ncase "$*" in {arguments}) echo "{command}: No space left on device" >&2; {then} ;; esac\nexec "$REAL" "$@"\n'
    (folder / command).write_text(script)
    (folder / command).chmod(0o755)
    return folder


def install(bundle: Path, prefix: Path, python: Path, bin_dir: Path | None = None) -> subprocess.CompletedProcess:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    env = {**os.environ, "PYTHON": str(python), "PATH": path}
    return subprocess.run([str(bundle / "install.sh"), str(prefix)], env=env, capture_output=True, text=True, timeout=60, check=False)


def earlier_install(prefix: Path) -> Path:
    """PREFIX as an earlier release left it: its venv, a model with a file the new one lacks, a unit and an example."""
    previous = prefix / "venvs" / "0.0.2-py3.0"
    (previous / "bin").mkdir(parents=True)
    (prefix / "venv").symlink_to(previous)
    (prefix / "models" / "model").mkdir(parents=True)
    (prefix / "models" / "model" / "stale.bin").write_text("a file of the model's earlier version")
    (prefix / "systemd").mkdir()
    (prefix / "systemd" / "medtriage-serve@.service").write_text("the earlier unit")
    (prefix / "config").mkdir()
    (prefix / "config" / "serve.env.example").write_text("the earlier example")
    return prefix


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder`, hidden ones included: a file's text, a link's target, or "folder"."""
    return {
        p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else p.read_text() if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


def _damaged_model_copy() -> tuple[str, str, str]:
    # cp copies the model folder and says it succeeded, but one file did not arrive whole (a failing disk).
    return "cp", r"-R\ models/*", 'eval "target=\\${$#}"; "$REAL" "$@" && printf x >> "$target/model.json"; exit 0'


@pytest.mark.parametrize(
    ("command", "arguments", "then", "said"),
    [
        ("cp", "*config*", "exit 1", "could not copy"),
        ("sed", r"*\ systemd/*", "exit 1", "could not copy"),
        ("mv", "*/venv", "exit 1", "could not switch"),
        ("mv", r"-T\ */config/.serve.env.example.new\ *", "exit 1", "could not switch"),
        (*_damaged_model_copy(), "does not match SHA256SUMS"),
    ],
    ids=["config copy", "unit rewrite", "venv switch", "switch of a later item", "damaged model copy"],
)
def test_a_failure_before_the_switch_leaves_prefix_as_it_was(tmp_path, command, arguments, then, said):
    """The models were replaced before the units, the config and the switch: any of those failing left the new
    models served by the old release."""
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing_command(tmp_path / "bin", command, arguments, then))
    assert done.returncode != 0, done.stdout
    assert said in done.stderr and f"Nothing was switched: {prefix} runs what it ran before" in done.stderr, done.stderr
    assert snapshot(prefix) == before  # no staged copy, no new release, nothing renamed


def test_an_install_leaves_no_staged_copies_and_replaces_each_part_whole(tmp_path):
    prefix = earlier_install(tmp_path / "opt")
    (prefix / "config" / "site.env").write_text("kept")  # not the bundle's: left alone
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    after = snapshot(prefix)
    assert not [p for p in after if any(part.startswith(".") for part in p.split("/"))]
    assert sorted(p.name for p in (prefix / "models" / "model").iterdir()) == ["model.json"]
    assert "ExecStart=" in after["systemd/medtriage-serve@.service"] and str(prefix) in after["systemd/medtriage-serve@.service"]
    assert after["config/serve.env.example"].startswith("# /etc/medtriage/serve-") and after["config/site.env"] == "kept"
    assert Path(os.readlink(prefix / "venv")).name.startswith(medtriage.__version__)


def test_an_install_under_a_strict_umask_is_readable_by_the_services_user(tmp_path):
    """Under a root umask of 077 (hardened machines) PREFIX, the venv and the models were root-only, and a model file
    the bundle holds as 0600 (exported under such a umask) stayed so whatever the umask: the units, which run as their
    own user, could not start."""
    bundle = small_bundle(tmp_path)
    (bundle / "models" / "model" / "model.json").chmod(0o600)
    prefix = tmp_path / "opt"
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path))}
    command = ["sh", "-c", 'umask 077 && exec "$0" "$@"', str(bundle / "install.sh"), str(prefix)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [p.relative_to(tmp_path).as_posix() for p in [prefix, *prefix.rglob("*")] if not _open_to_all(p)] == []
    assert (prefix / "venv" / "bin" / "medtriage").stat().st_mode & 0o005 == 0o005


def _open_to_all(path: Path) -> bool:
    """Whether any user may read a file, or list and enter a folder (a link: what it leads to is checked by itself)."""
    wanted = 0o005 if path.is_dir() else 0o004
    return path.is_symlink() or path.stat().st_mode & wanted == wanted
