"""The documentation names only commands, options and settings that exist.

Every ``fednnunet ...`` command line in a code span or block of the documents below is
walked through the typer app (command, sub-command, long options of the command), and
every ``FEDNNUNET_*`` variable must be a ``Settings`` field or be read by a script or
module of the repository; every repository file, ``python -m`` module (and its
sub-command) and script option they cite must exist. A renamed command, setting, file
or option then fails here, not in the hands of the next reader.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from fednnunet.cli.main import app
from fednnunet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "deploy/README.md", "docs/architecture.md")
# Documents whose cited files, modules and script options are checked (config comments too).
CITING = (*DOCUMENTS, "docs/privacy.md", "broker_config/rabbitmq.conf")
REPO_FOLDERS = (
    "fednnunet",
    "workers",
    "deploy",
    "scripts",
    "broker_config",
    "tests",
    "bench",
    "docs",
)
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(REPO_FOLDERS)})/[\w./-]*)")
MODULE = re.compile(r"python3? -m ([\w.]+)(?: ([a-z][\w-]*))?")
SCRIPT = re.compile(r"((?:deploy|broker_config|scripts|bench)/[\w/-]+\.(?:py|sh))([^|;&#]*)")
# Where FEDNNUNET_* variables outside Settings are read (scripts, provisioning, tests' helpers).
READER_DIRS = ("fednnunet", "workers", "deploy", "scripts", "broker_config", "tests/support")
READ_PATTERNS = (
    re.compile(r"""(?:environ(?:\.get)?\s*[\(\[]|getenv\()\s*["'](FEDNNUNET_\w+)"""),  # Python
    re.compile(r"\$\{?(FEDNNUNET_\w+)"),  # shell
)
VAR = re.compile(r"\bFEDNNUNET_[A-Z0-9_]*[A-Z0-9]")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


# ---------------------------------------------------------------- what the code has
def settings_variables() -> set[str]:
    return {f"FEDNNUNET_{name.upper()}" for name in Settings.model_fields}


def variables_read_by_code() -> set[str]:
    found: set[str] = set()
    for folder in READER_DIRS:
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".sh", ".yml"} and path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                for pattern in READ_PATTERNS:
                    found |= set(pattern.findall(text))
    return found


def click_root() -> click.Group:
    return typer.main.get_command(app)


# ---------------------------------------------------------------- what the docs say
def code_text(markdown: str) -> list[str]:
    """Lines of fenced blocks and inline code spans (prose is not checked)."""
    lines = [line for block in FENCE.findall(markdown) for line in block.splitlines()]
    prose = FENCE.sub("", markdown)
    return lines + SPAN.findall(prose)


def command_lines(markdown: str) -> list[str]:
    out = []
    for text in code_text(markdown):
        start = text.find("fednnunet ")
        while start != -1:
            before = text[start - 1] if start else " "
            if before in " ($`":
                out.append(text[start:])
                break
            start = text.find("fednnunet ", start + 1)
    return out


def _tokens(line: str) -> list[str]:
    line = line.split(" #", 1)[0]
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def command_problems(line: str, root: click.Group) -> list[str]:
    """What in ``line`` (``fednnunet ...``) the CLI does not have; [] if all exists."""
    problems: list[str] = []
    segments = line.split(" | ")
    tokens = _tokens(segments[0])[1:]
    group: click.Group = root
    command: click.Command | None = None
    words = [t for t in tokens if not t.startswith(("-", "[", "<", "$"))]
    for word in words:
        sub = group.get_command(click.Context(group), word)
        if sub is None:
            problems.append(f"no command {word!r} in `{group.name or 'fednnunet'}`")
            return problems
        command = sub
        if not isinstance(sub, click.Group):
            break
        group = sub
    if command is None:
        return [f"`{line}` names no command"]
    problems += _option_problems(command, tokens)
    # "status EXP | watch EXP | list": alternatives are sub-commands of the same group
    for alt in segments[1:]:
        alt_tokens = _tokens(alt)
        if alt_tokens and group.get_command(click.Context(group), alt_tokens[0]) is None:
            problems.append(f"no command {alt_tokens[0]!r} in `{group.name}`")
    return problems


def _option_problems(command: click.Command, tokens: list[str]) -> list[str]:
    if command.context_settings.get("ignore_unknown_options"):
        return []  # e.g. `run` passes nnUNetv2_train's own options through
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    known.add("--help")
    out = []
    for token in tokens:
        option = token.strip("[]").split("=", 1)[0]
        if option.startswith("--") and option not in known:
            out.append(f"`{command.name}` has no option {option}")
    return out


def documented(path: str) -> str:
    return (REPO / path).read_text(encoding="utf-8")


# ---------------------------------------------------------------- the checks
@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_commands_exist(document):
    root = click_root()
    lines = command_lines(documented(document))
    problems = [
        f"{document}: `{line}`: {p}" for line in lines for p in command_problems(line, root)
    ]
    assert not problems, "\n".join(problems)


def test_the_documents_do_show_commands():
    """Guard against a parser that silently finds nothing."""
    assert len(command_lines(documented("README.md"))) >= 10


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_settings_exist(document):
    known = settings_variables() | variables_read_by_code()
    names = set(VAR.findall(documented(document)))
    unknown = sorted(names - known)
    assert not unknown, f"{document} names settings nothing reads: {unknown}"


def test_every_settings_field_is_documented():
    """The other direction: an operator finds every setting in the README or architecture."""
    docs = "".join(documented(d) for d in DOCUMENTS)
    undocumented = sorted(v for v in settings_variables() if not re.search(rf"\b{v}\b", docs))
    assert not undocumented, f"settings missing from {DOCUMENTS}: {undocumented}"


def cited_problems(text: str) -> list[str]:
    """Files, ``python -m`` modules and script options that ``text`` cites and that do
    not exist. Generated files (a component starting with ".") and image names (no
    extension, no trailing "/") are not files of the repository."""
    problems = []
    for line in code_text(text):
        for match in PATH.finditer(line):
            path = match.group(1).rstrip(".,:;)")
            parts = path.rstrip("/").split("/")
            is_file_or_folder = path.endswith("/") or "." in parts[-1]
            if any(p.startswith(".") for p in parts) or not is_file_or_folder:
                continue
            if not (REPO / path).exists():
                problems.append(f"no file {path}")
        for match in MODULE.finditer(line):
            module, sub = match.group(1), match.group(2)
            if module.split(".")[0] not in REPO_FOLDERS:
                continue  # another tool's module (pytest, pip)
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                problems.append(f"no module {module}")
            elif sub and not re.search(
                rf"[\"']{re.escape(sub)}[\"']", Path(spec.origin).read_text()
            ):
                problems.append(f"`python -m {module}` has no sub-command {sub}")
        for match in SCRIPT.finditer(line):
            script = REPO / match.group(1)
            if not script.is_file():
                continue  # reported as a missing file above
            source = script.read_text(encoding="utf-8")
            for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", match.group(2)):
                if flag not in source:
                    problems.append(f"{match.group(1)} has no option {flag}")
    return problems


@pytest.mark.parametrize("document", CITING)
def test_cited_files_modules_and_script_options_exist(document):
    problems = cited_problems(documented(document))
    assert not problems, f"{document}: " + "; ".join(problems)


# ---------------------------------------------------------------- the checker can fail
@pytest.mark.parametrize(
    "text, expected",
    [
        ("see `fednnunet/nnunet/inline_pool.py`", "no file fednnunet/nnunet/inline_pool.py"),
        ("`python -m fednnunet.nosuch x`", "no module fednnunet.nosuch"),
        ("`python -m bench.run --quick`", None),
        ("`broker_config/provision.py --write-definitions`", "has no option --write-definitions"),
        ("`python -m tests.support.private_stack frobnicate`", "has no sub-command frobnicate"),
        ("`deploy/.generated/definitions.json`, `fednnunet/runtime`", None),
    ],
)
def test_checker_reports_missing_citations(text, expected):
    problems = cited_problems(text)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "line, expected",
    [
        ("fednnunet frobnicate", "no command 'frobnicate'"),
        ("fednnunet experiment frobnicate EXP", "no command 'frobnicate'"),
        ("fednnunet experiment status EXP --yaml", "has no option --yaml"),
        ("fednnunet experiment status EXP | frob EXP", "no command 'frob'"),
    ],
)
def test_checker_reports_missing_commands(line, expected):
    problems = command_problems(line, click_root())
    assert any(expected in p for p in problems), problems


def test_checker_accepts_real_commands():
    root = click_root()
    assert command_problems("fednnunet experiment status EXP [--json] | watch EXP", root) == []
    assert command_problems("fednnunet run train '901 902' 2d 0 -device cpu", root) == []
    assert command_problems("fednnunet worker --site a --dataset-id 901", root) == []


def test_unknown_variable_is_reported():
    known = settings_variables() | variables_read_by_code()
    assert "FEDNNUNET_BROKER_URL" in known and "FEDNNUNET_STACK_DIR" in known
    assert "FEDNNUNET_NO_SUCH_SETTING" not in known
