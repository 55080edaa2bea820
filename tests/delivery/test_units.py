"""The bundle's systemd units pass `systemd-analyze verify` as install.sh writes them for a prefix.

No running systemd is needed: `verify` loads unit files offline. It checks that ExecStart names an
executable, so the units are rewritten for a prefix holding one, as install.sh does. Unknown keys and
bad values are only warnings (exit status 0), so any line about our units counts as a problem."""

from __future__ import annotations

import re

import pytest

from medtriage.delivery.bundle import write_templates
from tests.delivery.units import environment_file, exec_start, installed_units, settings, verify


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


@pytest.mark.parametrize(
    ("service", "wrong"),
    [("serve", {"MEDTRIAGE_HOST": "0.0.0.0"}), ("listen", {"MEDTRIAGE_AET": "NOT\\AN AE TITLE"})],
    ids=["serve without a token on the network", "listen with a bad AE title"],
)
def test_a_configuration_error_leaves_the_unit_failed_instead_of_restarting_it(tmp_path, monkeypatch, capsys, service, wrong):
    """Restart=on-failure started a unit whose options were wrong again every 5 s, for ever, burying its message in
    the journal under the same lines each time."""
    from medtriage.cli import main

    write_templates(tmp_path, {})
    unit = tmp_path / "systemd" / f"medtriage-{service}@.service"
    environment = {**environment_file(tmp_path / "config" / f"{service}.env.example"), **wrong}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    status = main(exec_start(unit, environment, "pneumonia")[1:])
    assert status != 0 and "error: " in capsys.readouterr().err
    assert settings(unit, "Restart") == ["on-failure"]
    assert str(status) in " ".join(settings(unit, "RestartPreventExitStatus")).split()


def test_serve_can_open_the_state_folder_the_node_writes(tmp_path):
    """Each unit ran as a dynamic user of its own: the node's state folder was its user's alone, and `medtriage serve
    --state` on it could neither read the node's studies nor record its own uploads there."""
    write_templates(tmp_path, {})
    serve, listen = (tmp_path / "systemd" / f"medtriage-{service}@.service" for service in ("serve", "listen"))
    argv = exec_start(listen, environment_file(tmp_path / "config" / "listen.env.example"), "pneumonia")
    node_state = argv[argv.index("--state") + 1]
    assert settings(serve, "User") == settings(listen, "User") != []  # one user: the folder is theirs alike
    assert settings(serve, "DynamicUser") == settings(listen, "DynamicUser") == ["yes"]
    for unit in (serve, listen):  # under ProtectSystem=strict a unit may write only the state folders it names
        assert node_state in [f"/var/lib/{d.replace('%i', 'pneumonia')}" for line in settings(unit, "StateDirectory") for d in line.split()]
    example = (tmp_path / "config" / "serve.env.example").read_text()
    assert f"--state {node_state.replace('pneumonia', '<model>')}" in example


@pytest.mark.parametrize("service", ["serve", "listen"])
def test_a_root_only_tls_key_reaches_the_service_as_a_credential(tmp_path, service):
    """A key kept root-only (0600) could not be read by the unit's dynamic user: systemd copies it for the service
    (LoadCredential=), and the TLS options the example gives read that copy."""
    write_templates(tmp_path, {})
    unit = tmp_path / "systemd" / f"medtriage-{service}@.service"
    loaded = dict(value.split(":", 1) for value in settings(unit, "LoadCredential"))
    defaults = {value.split(":", 1)[0] for value in settings(unit, "SetCredential")}
    example = (tmp_path / "config" / f"{service}.env.example").read_text()
    options = re.search(r"--tls-cert (\S+) --tls-key (\S+)", example)
    assert options, example
    for path, suffix in zip(options.groups(), ("crt", "key"), strict=True):
        folder, _, credential = path.rpartition("/")
        assert folder == f"/run/credentials/medtriage-{service}@<model>.service"  # $CREDENTIALS_DIRECTORY
        assert loaded[credential] == f"/etc/medtriage/{service}-%i.{suffix}"
        assert f"/etc/medtriage/{service}-<model>.{suffix}" in example
        assert credential in defaults  # without the file (no TLS) the unit still starts
