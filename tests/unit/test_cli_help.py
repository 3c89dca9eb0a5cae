"""Every `--help` lists each option's choices and default: the `tessera` command and every subcommand (found
from the parser, so a new one is covered without touching this file), `python -m tessera.demo`, and each
benchmark in perf/ (every module there with a `main` builds its parser in `build_parser()`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera import cli, demo

ROOT = Path(__file__).resolve().parents[2]  # perf/ is a package at the repository root
PERF_MODULES = sorted(p.stem for p in (ROOT / "perf").glob("*.py") if "\ndef main(" in p.read_text())


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(argv prefix, parser) for `parser` and every subcommand below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


CLI_COMMANDS = {" ".join(path) or "tessera": (path, p) for path, p in _subcommands(cli.build_parser())}


def _help_text(entry: Callable[[list[str]], object], argv: list[str]) -> str:
    """What `entry(argv + ["--help"])` prints; it must exit 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        entry([*argv, "--help"])
    assert exited.value.code in (0, None), f"{argv} --help exited {exited.value.code}"
    return out.getvalue()


def _blocks(text: str) -> dict[str, str]:
    """Help entries by invocation ("--kind {unet,dit}", "dir"): an entry starts on a line indented by exactly
    two spaces and goes on over the lines indented deeper; whitespace is collapsed (wrapped text joins)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            invocation, _, rest = line.strip().partition("  ")
            current = blocks.setdefault(invocation, [rest])
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in blocks.items()}


def _entry_of(action: argparse.Action, blocks: dict[str, str]) -> tuple[str, str]:
    for invocation, body in blocks.items():
        if action.option_strings:
            names = [part.split(" ")[0] for part in invocation.split(", ")]
            if set(names) & set(action.option_strings):
                return invocation, body
        elif invocation == (action.metavar or action.dest):
            return invocation, body
    raise AssertionError(f"{action.option_strings or action.dest}: not listed in --help")


def _check(parser: argparse.ArgumentParser, text: str, where: str) -> None:
    blocks = _blocks(text)
    for action in parser._actions:
        skipped = isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        if skipped or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{where} {name}: no help= string (--help would not show its default)"
        invocation, body = _entry_of(action, blocks)
        if action.choices is not None:
            listed = "{" + ",".join(str(c) for c in action.choices) + "}"
            assert listed in invocation, f"{where} {name}: choices {listed} not shown in {invocation!r}"
        if action.default is not None and action.default is not argparse.SUPPRESS:
            assert "(default:" in body, f"{where} {name}: default {action.default!r} not shown in {body!r}"


@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_tessera_help_lists_choices_and_defaults(command):
    path, parser = CLI_COMMANDS[command]
    _check(parser, _help_text(cli.main, list(path)), command)


def test_every_subcommand_is_covered():
    top = CLI_COMMANDS["tessera"][1]
    (subs,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    assert subs.choices and set(subs.choices) <= set(CLI_COMMANDS)
    assert "export" in CLI_COMMANDS  # discovery found the real subcommands
    help_text = _help_text(cli.main, [])
    for name in subs.choices:
        assert name in help_text


def test_demo_help_lists_choices_and_defaults():
    _check(demo.build_parser(), _help_text(demo.main, []), "tessera.demo")


@pytest.mark.parametrize("name", PERF_MODULES)
def test_perf_help_lists_choices_and_defaults(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"perf.{name}")
    assert hasattr(module, "build_parser"), f"perf.{name}: make its parser in build_parser() (tested here)"
    _check(module.build_parser(), _help_text(module.main, []), f"perf.{name}")
