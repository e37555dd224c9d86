"""The table of subcommands (glmkit.cli.COMMANDS) and the parser built from it agree, and help shows all of it."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import glmkit.cli
from glmkit.cli import COMMANDS, Command, build_parser, main


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name (argparse keeps them in its one _SubParsersAction)."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def leaves(commands: dict[str, Command], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Command]]:
    """Every runnable row with the words that reach it: ('chat',), ('data', 'build'), ..."""
    rows = []
    for name, command in commands.items():
        rows += leaves(command.subcommands, (*path, name)) if command.subcommands else [((*path, name), command)]
    return rows


LEAVES = leaves(COMMANDS)


def test_every_row_is_a_subcommand_that_runs_its_function():
    def check(parser: argparse.ArgumentParser, commands: dict[str, Command]) -> None:
        parsers = subparsers(parser)
        assert list(parsers) == list(commands)  # same names, in the table's order
        for name, command in commands.items():
            assert command.name == name
            if command.subcommands:
                assert command.run is None and command.add_arguments is None
                check(parsers[name], command.subcommands)
            else:
                assert parsers[name].get_default("func") is command.run

    check(build_parser(), COMMANDS)
    assert len({command.run for _, command in LEAVES}) == len(LEAVES)  # one function per command


def test_a_parsed_command_line_carries_the_tables_function():
    args = build_parser().parse_args(["data", "build", "--out", "x"])
    assert args.func is COMMANDS["data"].subcommands["build"].run
    assert (args.command, args.data_command) == ("data", "build")


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "glmkit", "--help"], capture_output=True, text=True, timeout=60,
                            check=True)
    listed = set(re.findall(r"^    (\S+)", result.stdout, flags=re.MULTILINE))
    assert listed == set(COMMANDS)
    unwrapped = "".join(result.stdout.split())  # argparse wraps the help texts (at hyphens too)
    assert all("".join(command.help.split()) in unwrapped for command in COMMANDS.values())


@pytest.mark.parametrize("path", [path for path, _ in LEAVES], ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*path, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: glmkit {' '.join(path)}")


def test_groups_list_their_actions(capsys):
    for name, command in COMMANDS.items():
        if command.subcommands:
            with pytest.raises(SystemExit):
                main([name, "--help"])
            out = capsys.readouterr().out
            assert all(action in out for action in command.subcommands)


def test_the_docstring_shows_every_command():
    for path, _ in LEAVES:
        assert re.search(rf"^    glmkit {re.escape(' '.join(path))}\s", glmkit.cli.__doc__, flags=re.MULTILINE), path


def test_a_user_mistake_is_one_line_and_exit_code_2(capsys):
    assert main(["merge", "--output", "out"]) == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert err == "glmkit: error: merge needs --adapter DIR (the adapter to fold into --model)\n"
