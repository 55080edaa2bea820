"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and the checker really catches a broken one."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert tool, "lint-imports is missing: pip install -e '.[dev]'"
    return subprocess.run([tool, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_import_contract_is_kept():
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_broken_contract_fails_the_check(tmp_path):
    """serve does import format; a contract forbidding it must be reported broken (the checker is not a no-op)."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["medtriage"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "serve without format"\ntype = "forbidden"\n'
        'source_modules = ["medtriage.serve"]\nforbidden_modules = ["medtriage.format"]\n'
    )
    done = lint_imports("--config", str(config))
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout[-2000:]
