import subprocess
import sys


def test_help_works_from_the_console_script():
    out = subprocess.run([sys.executable, "-m", "medtriage.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: medtriage" in out.stdout
