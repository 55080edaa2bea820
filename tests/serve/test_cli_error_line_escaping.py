"""An error the CLI prints stays one line as written: control characters in what it names (a file name, a header
value) are shown as escapes, never sent to the terminal."""

from medtriage.cli import main
from medtriage.errors import printable

HOSTILE = "scan\x1b[2J\nerror: all fine\x07\x9b é 漢"


def test_printable_escapes_control_characters_and_keeps_letters():
    assert printable(HOSTILE) == "scan\\x1b[2J\\nerror: all fine\\x07\\x9b é 漢"
    assert printable("plain é 漢.npz") == "plain é 漢.npz"


def test_an_error_naming_a_file_with_control_characters_is_one_escaped_line(package_dir, tmp_path, capsys):
    assert main(["score", str(package_dir), "--npz", str(tmp_path / f"{HOSTILE}.npz")]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("error: ") and "scan\\x1b[2J\\nerror: all fine\\x07\\x9b é 漢.npz: npz file not found" in line
    assert "\x1b" not in err and "\x07" not in err
