"""Every option of the ingest, scoring, serving and delivery commands names its default in its --help line.

Before, `medtriage ingest --help` did not say which patient characteristics --retain keeps, `score`, `serve` and
`listen` did not say that --provider is cpu, and `quantize --help` gave no default for --exclude."""

from __future__ import annotations

import pytest

from tests.cli.test_help_lines import help_problems, subparsers_of

COMMANDS = ["ingest", "score", "serve", "listen", "bundle", "quantize"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_the_command_names_its_default(command):
    from medtriage.cli import build_parser

    assert help_problems(subparsers_of(build_parser())[command]) == []


def test_every_option_of_ingest_sites_names_its_default():
    from medtriage.cli.ingest_sites import build_parser

    assert help_problems(build_parser()) == []


def test_the_retain_help_lists_what_is_kept():
    from medtriage.cli import build_parser

    (retain,) = [a for a in subparsers_of(build_parser())["ingest"]._actions if "--retain" in a.option_strings]
    assert "PatientSex,PatientAge" in retain.help % {"default": retain.default}
