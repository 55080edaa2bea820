"""install.sh's clean-up of PREFIX/venvs keeps a release a running process still uses: a service that was not
restarted across two upgrades runs from the release before the previous one."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.delivery.test_bundle_offline import small_bundle
from tests.delivery.test_install_all_or_nothing import fake_python, install


@pytest.mark.parametrize("through_link", [False, True], ids=["prefix", "prefix reached through a link"])
def test_a_release_a_running_process_uses_is_kept_and_named(tmp_path, through_link):
    """It was removed under the running service: the next module it imported, or a restart of a worker, failed."""
    prefix = tmp_path / "opt"
    unused, running, previous = (prefix / "venvs" / name for name in ("0.0.0-py3.0", "0.0.1-py3.0", "0.0.2-py3.0"))
    for release in (unused, running, previous):
        (release / "bin").mkdir(parents=True)
    (prefix / "venv").symlink_to(previous)  # what the units run since the last install
    program = running / "bin" / "sleep"  # as a service's interpreter maps its libraries from its release
    shutil.copy(shutil.which("sleep"), program)
    if through_link:  # the processes' maps name the folder the link leads to
        (tmp_path / "link").symlink_to(prefix)
    service = subprocess.Popen([str(program), "600"])
    try:
        done = install(small_bundle(tmp_path), tmp_path / "link" if through_link else prefix, fake_python(tmp_path))
    finally:
        service.kill()
        service.wait()
    assert done.returncode == 0, done.stderr
    assert running.is_dir() and previous.is_dir() and not unused.exists()
    said = " ".join(done.stderr.split())
    assert f"{service.pid} (sleep)" in said and "still run" in said and running.name in said, said
