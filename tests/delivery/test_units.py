"""The bundle's systemd units pass `systemd-analyze verify` as install.sh writes them for a prefix.

No running systemd is needed: `verify` loads unit files offline. It checks that ExecStart names an
executable, so the units are rewritten for a prefix holding one, as install.sh does. Unknown keys and
bad values are only warnings (exit status 0), so any line about our units counts as a problem."""

from __future__ import annotations

import pytest

from medtriage.delivery.bundle import write_templates
from tests.delivery.units import environment_file, exec_start, installed_units, verify


@pytest.fixture(scope="module")
def analyze(need_tool) -> str:
    return need_tool("systemd-analyze", "apt-get install systemd")


def test_the_serve_and_listen_units_pass_systemd_analyze_verify(analyze, tmp_path):
    units = installed_units(tmp_path)
    assert [u.name for u in units] == ["medtriage-serve@.service", "medtriage-listen@.service"]
    assert verify(analyze, units) == []


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        (("Restart=on-failure", "Restart=sometimes"), "restart specifier"),
        (("ProtectHome=yes", "ProtectHomes=yes"), "Unknown key"),
        (("/venv/bin/medtriage serve", "/venv/bin/medtriage-missing serve"), "is not executable"),
    ],
    ids=["bad value", "misspelt key", "missing executable"],
)
def test_verify_reports_a_broken_unit(analyze, tmp_path, change, reported):
    serve, listen = installed_units(tmp_path)
    text = serve.read_text()
    assert change[0] in text
    serve.write_text(text.replace(change[0], change[1]))
    problems = verify(analyze, [serve, listen])
    assert problems and any(reported in line and serve.name.split("@")[0] in line for line in problems), problems


def test_the_serve_example_as_shipped_does_not_open_the_service_to_the_network_with_a_known_token(tmp_path, monkeypatch, capsys):
    """It held a placeholder token, the same in every bundle: a service moved to a network address before the token was
    set answered anyone who sent it."""
    from medtriage.cli import main

    write_templates(tmp_path, {})
    environment = {**environment_file(tmp_path / "config" / "serve.env.example"), "MEDTRIAGE_HOST": "0.0.0.0"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)  # systemd passes the file's variables to the process too
    argv = exec_start(tmp_path / "systemd" / "medtriage-serve@.service", environment, "pneumonia")
    assert argv[:2] == ["/opt/medtriage/venv/bin/medtriage", "serve"]
    assert main(argv[1:]) == 2
    assert "refusing to serve on 0.0.0.0 without a token" in capsys.readouterr().err
