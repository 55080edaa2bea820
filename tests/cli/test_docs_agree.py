"""The README and docs/ name commands, flags, config keys, files and links that exist under those names.

Checked statically or in-process (no command is run): every `medtriage <command> --flag`, every
`python scripts/<x>.py --flag` and `python -m benchmarks.<x> --flag`, every `make <target>`, every console
script, every config key, group choice and enum value of a Hydra override, and every relative link with its
anchor. `docs/benchmarks.md` is written by the benchmarks and left out. Error hints in src/ that name a
`medtriage` command's flags are checked the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from enum import Enum
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MEDTRIAGE = re.compile(r"(?<![\w./@-])medtriage ([a-z][a-z-]*)")
SCRIPT = re.compile(r"(?<![\w/])scripts/(\w+)\.py")
BENCHMARK = re.compile(r"python -m benchmarks\.(\w+)")
SECTIONS = ("data", "model", "trainer", "tracking", "export", "paths", "cv")
KEY = re.compile(r"(?<![\w./$-])((?:" + "|".join(SECTIONS) + r")(?:\.[a-z_][a-z0-9_]*)+)(?:=([^\s`,\]]+))?")
GROUP = re.compile(r"(?<![\w./-])(experiment|trainer|model|data|hparams_search)=([\w,-]+)")
FILE_SUFFIXES = (".json", ".onnx", ".md", ".yaml", ".py", ".png", ".csv")
HYDRA_FLAGS = {"--multirun", "--cfg", "--help", "--hydra-help", "--package", "--info", "--resolve", "--config-name", "--config-dir"}


def spans(text: str) -> list[str]:
    """What the text shows as code: each line of a fenced block (shell comments and `\\` continuations folded),
    and each inline `code` span (which may wrap across lines)."""
    found = []
    for block in FENCE.findall(text):
        found += [re.sub(r"\s#.*$", "", line) for line in block.replace("\\\n", " ").splitlines()]
    found += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
    return found


def doc_spans() -> list[tuple[str, str]]:
    return [(path.name, span) for path in DOCS for span in spans(path.read_text(encoding="utf-8"))]


def following(pattern: re.Pattern, text: str):
    """(match, the text after it up to the next match) for each match of `pattern`."""
    matches = list(pattern.finditer(text))
    for match, after in zip(matches, [*matches[1:], None]):
        yield match, text[match.end() : after.start() if after else len(text)]


@functools.cache
def subcommand_options() -> dict[str, set[str]]:
    from medtriage.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {o for a in sub._actions for o in a.option_strings} for name, sub in commands.choices.items()}


def medtriage_problems(named: list[tuple[str, str]], options: dict[str, set[str]]) -> list[str]:
    problems = []
    for where, span in named:
        for match, tail in following(MEDTRIAGE, span):
            command = match.group(1)
            if command not in options:
                problems.append(f"{where}: no command `medtriage {command}`")
                continue
            problems += [f"{where}: `medtriage {command}` has no {flag}" for flag in FLAG.findall(tail) if flag not in options[command]]
    return problems


def test_every_medtriage_command_and_flag_in_the_docs_exists():
    assert medtriage_problems(doc_spans(), subcommand_options()) == []


def test_the_command_check_finds_a_made_up_flag_and_command():
    options = subcommand_options()
    named = [
        ("x.md", span) for span in spans("Run `medtriage serve PKG --port 1 --no-such-flag`.\n\n```bash\nmedtriage frobnicate x\n```\n")
    ]
    assert medtriage_problems(named, options) == [
        "x.md: no command `medtriage frobnicate`",
        "x.md: `medtriage serve` has no --no-such-flag",
    ]


def test_hints_in_the_source_name_existing_flags():
    """An error hint such as '(medtriage serve --max-decoded-bytes)' names a flag the command takes."""
    options = subcommand_options()
    pattern = re.compile(r"(?<![\w./@-])medtriage (" + "|".join(map(re.escape, options)) + r")\b([^\"'`)\n]*)")
    named = [
        (str(path.relative_to(ROOT)), match.group(0))
        for path in sorted((ROOT / "src" / "medtriage").rglob("*.py"))
        for match in pattern.finditer(path.read_text(encoding="utf-8"))
    ]
    assert any("--max-decoded-bytes" in span for _, span in named)
    assert medtriage_problems(named, options) == []


def declared_options(module_file: Path) -> set[str]:
    """Options added with add_argument in a module and in the medtriage or benchmarks modules it imports from."""
    files = [module_file]
    for name in re.findall(r"^from ((?:medtriage|benchmarks)[\w.]*) import", module_file.read_text(encoding="utf-8"), re.M):
        candidate = (ROOT / "src" if name.startswith("medtriage") else ROOT) / Path(*name.split("."))
        files += [f for f in (candidate.with_suffix(".py"), candidate / "__init__.py") if f.is_file()]
    pattern = re.compile(r"add_argument\(\s*(?:\"-\w\",\s*)?\"(--[a-z][a-z0-9-]*)\"")
    return {option for f in files for option in pattern.findall(f.read_text(encoding="utf-8"))} | {"--help"}


def script_options(name: str) -> set[str]:
    source = (ROOT / "scripts" / f"{name}.py").read_text(encoding="utf-8")
    (module,) = re.findall(r"^from (medtriage\.cli\.\w+) import", source, re.M)
    if "@hydra.main" in (ROOT / "src" / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8"):
        return HYDRA_FLAGS
    return declared_options((ROOT / "src" / Path(*module.split("."))).with_suffix(".py"))


def test_every_script_and_benchmark_in_the_docs_exists_with_its_flags():
    problems = []
    for where, span in doc_spans():
        for match, tail in following(SCRIPT, span):
            if not (ROOT / "scripts" / f"{match.group(1)}.py").is_file():
                problems.append(f"{where}: no scripts/{match.group(1)}.py")
                continue
            options = script_options(match.group(1))
            problems += [f"{where}: scripts/{match.group(1)}.py has no {f}" for f in FLAG.findall(tail) if f not in options]
        for match, tail in following(BENCHMARK, span):
            module = ROOT / "benchmarks" / f"{match.group(1)}.py"
            if not module.is_file():
                problems.append(f"{where}: no module benchmarks.{match.group(1)}")
                continue
            options = declared_options(module)
            problems += [f"{where}: benchmarks.{match.group(1)} has no {f}" for f in FLAG.findall(tail) if f not in options]
    assert problems == []


def test_make_targets_and_console_scripts_in_the_docs_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"])
    problems = []
    for where, span in doc_spans():
        problems += [f"{where}: no make target {t}" for t in re.findall(r"^make ([\w-]+)", span.strip()) if t not in targets]
        command = re.match(r"medtriage-[a-z-]+", span.strip())  # a console script where a command starts
        if command and command.group(0) not in scripts:
            problems.append(f"{where}: no console script {command.group(0)}")
    assert problems == []


def schema_leaf(key: str):
    """The default value of a dotted key of the training config, or KeyError."""
    pytest.importorskip("hydra")
    from medtriage.config.schema import TrainConfig

    node = TrainConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(key)
        node = getattr(node, part)
    return node


def config_problems(named: list[tuple[str, str]]) -> list[str]:
    problems = []
    for where, span in named:
        for key, value in KEY.findall(span):
            if key.endswith(FILE_SUFFIXES):
                continue
            try:
                default = schema_leaf(key)
            except KeyError:
                problems.append(f"{where}: no config key {key}")
                continue
            if value and isinstance(default, Enum) and value not in {m.value for m in type(default)}:
                problems.append(f"{where}: {key}={value} is not one of {[m.value for m in type(default)]}")
            if value and isinstance(default, bool) and value not in ("true", "false"):
                problems.append(f"{where}: {key}={value} is not true or false")
        for group, choices in GROUP.findall(span):
            problems += [
                f"{where}: no configs/{group}/{choice}.yaml"
                for choice in choices.split(",")
                if not (ROOT / "configs" / group / f"{choice}.yaml").is_file()
            ]
    return problems


def test_every_config_key_and_override_in_the_docs_exists():
    assert config_problems(doc_spans()) == []


def test_the_config_check_finds_a_made_up_key_value_and_group():
    named = [("x.md", "python scripts/train.py trainer.resum=true trainer.imbalance=balanced experiment=nope model.json")]
    problems = config_problems(named)
    assert [p.split(" is not one of ")[0] for p in problems] == [
        "x.md: no config key trainer.resum",
        "x.md: trainer.imbalance=balanced",
        "x.md: no configs/experiment/nope.yaml",
    ]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for path in [*DOCS, ROOT / "docs" / "benchmarks.md"]:
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", link):
                continue
            target, _, fragment = link.partition("#")
            target_path = (path.parent / target) if target else path
            if not target_path.exists():
                problems.append(f"{path.name}: {link} does not exist")
            elif fragment and fragment not in {anchor(h) for h in re.findall(r"^#+ (.*)$", target_path.read_text(encoding="utf-8"), re.M)}:
                problems.append(f"{path.name}: {link} names no heading there")
    assert problems == []


SERVING_COMMANDS = ("score", "serve", "listen", "bundle", "quantize")  # what a hospital runs, reading the docs


def unnamed_options(text: str, options: set[str]) -> list[str]:
    """The long options that `text` never names (a longer option that starts alike does not count)."""
    return sorted(o for o in options if o.startswith("--") and o != "--help" and not re.search(re.escape(o) + r"(?![\w-])", text))


def test_every_option_of_the_serving_commands_is_documented():
    """Each option of score, serve, listen, bundle and quantize is named in the docs; each of listen's in docs/pacs.md,
    whose option table says `medtriage listen --help` prints the same."""
    options = subcommand_options()
    everything = "\n".join(path.read_text(encoding="utf-8") for path in DOCS)
    problems = [f"no doc names `medtriage {c}` {o}" for c in SERVING_COMMANDS for o in unnamed_options(everything, options[c])]
    pacs = (ROOT / "docs" / "pacs.md").read_text(encoding="utf-8")
    problems += [f"pacs.md does not name `medtriage listen` {o}" for o in unnamed_options(pacs, options["listen"])]
    assert problems == []


def test_the_option_check_tells_an_option_from_a_longer_one():
    assert unnamed_options("`--max-frames-x` and `--max-bytes N`", {"--max-frames", "--max-bytes", "--help", "-h"}) == ["--max-frames"]
