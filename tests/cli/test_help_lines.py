"""Every option of the data and tile commands says in its --help line what it is and, where it has one, its default.

Before, `medtriage audit --help` gave no default for --max-distance, and most options of scripts/make_tiles.py
(--tile-size, --tiles-per-slide, --seed, --holdout-site, ...) had no help line at all."""

from __future__ import annotations

import argparse

import pytest


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def parsers() -> dict[str, argparse.ArgumentParser]:
    from medtriage.cli import build_parser
    from medtriage.cli.data import pick_files_parser

    medtriage = subparsers_of(build_parser())
    found = {f"medtriage {name}": medtriage[name] for name in ("make-sites", "build-pool", "audit")}
    found["medtriage-pick-files"] = pick_files_parser()
    try:
        from medtriage.cli.make_tiles import build_parser as make_tiles_parser
    except ImportError:  # the [train] extra is not installed
        return found
    return {**found, **{f"make_tiles {name}": sub for name, sub in subparsers_of(make_tiles_parser()).items()}}


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip():
            problems.append(f"{name}: no help line")
        elif action.option_strings and action.default is not None and action.default is not False and "default" not in text:
            problems.append(f"{name}: default {action.default!r} not given")
    return problems


@pytest.mark.parametrize("command", sorted(parsers()))
def test_every_option_has_a_help_line_naming_its_default(command):
    assert help_problems(parsers()[command]) == []


def test_the_check_finds_an_option_without_help_or_default():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=3, help="side in pixels")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--label", type=int, default=0, help="0 or 1")
    assert help_problems(parser) == ["--size: default 3 not given", "--seed: no help line", "--label: default 0 not given"]
