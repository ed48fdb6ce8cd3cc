"""Every shell command in README.md and docs/ is one this checkout can run as written: its program
exists, every flag it passes is one that program takes, every module, script, path and install
extra it names is there. The README's own walk-through also runs for real against servers
(test/server/test_newcomer.py); what needs a GPU, a registry or a cluster (docker, podman,
kubectl, huggingface-cli) is checked where it can be: the Dockerfile is built and run by
tools/image_check.py, the manifests are validated by test_kubernetes.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvembed_triton.corpus.cli import parser as corpus_parser
from nvembed_triton.launcher.serve import parser as serve_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ELSEWHERE = ("docker", "podman", "kubectl", "huggingface-cli", "curl")  # see the module docstring
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@dataclass(frozen=True)
class Command:
    page: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}: {shlex.join(self.argv)}"


def documented_commands() -> list[Command]:
    """Each command of every bash block (fenced at any indentation), continuation lines joined,
    comments, variable assignments, redirections and what follows a pipe dropped."""
    commands = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for _indent, block in re.findall(r"^( *)```(?:bash|sh)\n(.*?)^\1```", text, re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, "#"
                argv, after_pipe = [], False
                for token in [*lexer, ";"]:
                    if token in ("&&", "||", ";", "|", ">", ">>", "<"):
                        if argv and not after_pipe:
                            commands.append(Command(page.name, tuple(argv)))
                        argv, after_pipe = [], token in ("|", ">", ">>", "<")
                    elif not (not argv and re.match(r"^[A-Z_]+=", token)):
                        argv.append(token)
    return commands


COMMANDS = documented_commands()


def flags(argv: tuple[str, ...]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def parser_flags(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def check(command: Command) -> None:
    program, *args = command.argv
    program = program.removeprefix(".venv/bin/")
    if program in ("./serve.sh", "nvembed-triton-serve", "./demo.sh"):
        unknown = set(flags(command.argv)) - parser_flags(serve_parser())
        assert not unknown, f"{command}: serve.sh takes no {sorted(unknown)}"
    elif program == "nvembed-triton-embed-corpus":
        unknown = set(flags(command.argv)) - parser_flags(corpus_parser())
        assert not unknown, f"{command}: the corpus command takes no {sorted(unknown)}"
    elif program in ("./test.sh", "./setup.sh"):
        for path in (a for a in args if not a.startswith("-") and not a.isdigit()):
            assert (ROOT / path).exists(), f"{command}: no {path}"
    elif program in ("python", "python3"):
        if args[0] == "-m":
            try:
                found = importlib.util.find_spec(args[1]) is not None
            except ModuleNotFoundError:  # its package is not there either
                found = False
            assert found, f"{command}: no module {args[1]}"
        elif args[0] != "-c":
            script = ROOT / args[0]
            assert script.is_file(), f"{command}: no {args[0]}"
            source = script.read_text(encoding="utf-8")
            missing = [flag for flag in flags(command.argv[2:]) if f'"{flag}"' not in source]
            assert not missing, f"{command}: {args[0]} takes no {missing}"
    elif program == "pip":
        for spec in (a for a in args[1:] if not a.startswith("-")):
            extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert extras, f"{command}: install from the checkout ('.[extra]'), not {spec!r}"
            unknown = set((extras.group(1) or "").split(",")) - EXTRAS - {""}
            assert not unknown, f"{command}: no extra {sorted(unknown)} in pyproject.toml"
    else:
        assert program in ELSEWHERE, f"{command}: a program this test does not know; check it here"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_the_documented_command_runs_as_written(command):
    check(command)


def test_the_commands_are_found_in_every_page_with_a_block():
    pages = {command.page for command in COMMANDS}
    assert {"README.md", "deployment.md", "development.md", "benchmarks.md", "corpus.md"} <= pages
    assert any(command.argv[:2] == ("pip", "install") for command in COMMANDS)  # the indented README blocks too


@pytest.mark.parametrize(
    "line",
    [
        "./serve.sh --model-dir /m --gpu-count 2",  # a flag serve.sh does not take
        "nvembed-triton-embed-corpus in.jsonl out --url h:1 --text-column text",
        ".venv/bin/python bench/bench_latency.py --sideways 3",
        ".venv/bin/python -m nvembed_triton.serving.serve",  # the package before it was renamed
        "pip install 'nvembed-triton[corpus]'",  # not on any index
        "pip install '.[everything]'",
        "./test.sh test/units",
        "helm install nvembed .",
    ],
)
def test_a_stale_command_is_caught(line):
    with pytest.raises(AssertionError):
        check(Command("page", tuple(shlex.split(line))))
