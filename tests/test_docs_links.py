"""The README and docs/ pages stay true: their relative links resolve (files and heading anchors), the
``python <script> --flag`` and ``factnet <command> --flag`` lines they show name scripts, commands and
flags that exist, and the README's Python blocks run on a tiny model."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted({ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("**/README.md")})

_FENCE = re.compile(r"^ *(```|~~~)(\w*)[^\n]*\n(.*?)^ *\1[ \t]*$", re.S | re.M)
_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


# ---------------------------------------------------------------- markdown parsing (pure functions)

def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]


def code_spans(text: str) -> list[str]:
    """The inline code spans outside fenced blocks."""
    return [m.group(2) for m in _SPAN.finditer(_FENCE.sub("", text))]


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (where links and headings live)."""
    return _SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (not ``-`` or ``_``), spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, duplicates numbered as GitHub does (``x``, ``x-1``, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("", text)):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(text: str, page: Path) -> list[str]:
    """The relative links of ``text`` (a page at ``page``) whose file or ``#anchor`` does not exist."""
    problems = []
    for target in _LINK.findall(prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            problems.append(f"{page.name}: {target} (no file {file})")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    return problems


def shown_commands(text: str, program: str) -> list[str]:
    """Command lines of ``program`` (``python`` or ``factnet``) shown in code: inline spans that are one,
    and lines of shell blocks (continuations joined) that start with one."""
    found = [span for span in code_spans(text) if span.startswith(program + " ")]
    for language, body in code_blocks(text):
        if language not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith(program + " "):
                found.append(line.split(" #")[0])
    return found


def script_problems(command: str, root: Path = ROOT) -> list[str]:
    """For ``python path/to/script.py --flag ...``: the script must exist and define every flag."""
    words = command.split()
    if len(words) < 2 or words[1].startswith("-"):  # python -m ..., python -c ...
        return []
    script = root / words[1]
    if not script.is_file():
        return [f"{command}: no script {words[1]}"]
    source = script.read_text(encoding="utf-8")
    return [f"{command}: {script.name} has no {flag}" for flag in _FLAG.findall(" ".join(words[2:]))
            if flag != "--help" and f'"{flag}"' not in source and f"'{flag}'" not in source]


def cli_commands() -> dict[str, set[str]]:
    """``{subcommand: its option strings}`` from factnet's own parser (plus ``""``: the top level's)."""
    from factnet.app.cli import build_parser

    parser = build_parser()
    out = {"": set(parser._option_string_actions)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = set(sub._option_string_actions)
    return out


def cli_problems(command: str, commands: dict[str, set[str]]) -> list[str]:
    """For ``factnet <subcommand> --flag ...``: the subcommand and each flag must exist."""
    words = command.split()
    if len(words) < 2 or words[1].startswith("-"):
        flags = _FLAG.findall(" ".join(words[1:]))
        return [f"{command}: factnet has no {flag}" for flag in flags if flag not in commands[""]]
    name = words[1]
    if name not in commands:
        return [f"{command}: no subcommand {name!r} (there are {sorted(c for c in commands if c)})"]
    return [f"{command}: factnet {name} has no {flag}" for flag in _FLAG.findall(" ".join(words[2:]))
            if flag not in commands[name]]


# ---------------------------------------------------------------- the checkers can fail

def test_checker_flags_a_missing_file_and_anchor(tmp_path):
    (tmp_path / "there.md").write_text("# Real heading\n\n## Low-bit files: `save(bits=b)`\n")
    page = tmp_path / "page.md"
    text = ("[ok](there.md) [ok](there.md#real-heading) [ok](there.md#low-bit-files-savebitsb) "
            "[web](https://example.com/x) `[not a link](gone.md)`\n"
            "[gone](missing.md) [bad anchor](there.md#no-such-heading) ![img](figs/none.png)\n"
            "```\n[in code](also-gone.md)\n```\n")
    problems = broken_links(text, page)
    assert len(problems) == 3, problems
    assert "missing.md" in problems[0] and "no-such-heading" in problems[1] and "none.png" in problems[2]


def test_slugs_follow_github():
    assert slug("The miniature Table 1: `factnet bench-table`") == "the-miniature-table-1-factnet-bench-table"
    assert slug("Several processes (DDP, FSDP2)") == "several-processes-ddp-fsdp2"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_command_checkers_flag_unknown_scripts_commands_and_flags(tmp_path):
    (tmp_path / "tool.py").write_text('parser.add_argument("--reps", type=int)\n')
    assert script_problems("python tool.py --reps 3", tmp_path) == []
    assert script_problems("python tool.py --repz 3", tmp_path) == ["python tool.py --repz 3: tool.py has no --repz"]
    assert script_problems("python gone.py", tmp_path)
    assert script_problems("python -m pytest -q", tmp_path) == []
    commands = {"": {"--version"}, "train": {"--data", "--out"}}
    assert cli_problems("factnet train --data d --out o", commands) == []
    assert cli_problems("factnet train --epochz 3", commands)
    assert cli_problems("factnet trian", commands)


# ---------------------------------------------------------------- the pages

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page.read_text(encoding="utf-8"), page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_scripts_and_flags_exist(page):
    commands = shown_commands(page.read_text(encoding="utf-8"), "python")
    assert [problem for command in commands for problem in script_problems(command)] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_factnet_commands_and_flags_exist(page):
    known = cli_commands()
    commands = shown_commands(page.read_text(encoding="utf-8"), "factnet")
    assert [problem for command in commands for problem in cli_problems(command, known)] == []


def test_pages_are_found():
    """The checks above see what they should: the README shows commands and a Python block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert any(c.startswith("factnet train --data") for c in shown_commands(readme, "factnet"))
    assert any(language == "python" for language, _ in code_blocks(readme))
    assert len(readme) <= 12_000


def test_readme_test_command_is_what_ci_runs():
    """``.ci/run`` runs the README's test command; the README must still show it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = re.search(r"^python -m pytest -q\b", ci, re.M)
    assert command and any(line.strip().startswith(command.group(0))
                           for _, body in code_blocks(readme) for line in body.splitlines())


def test_readme_python_blocks_run(tmp_path):
    timm = pytest.importorskip("timm")
    del timm
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [body for language, body in code_blocks(readme) if language == "python"]
    assert blocks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for body in blocks:
        result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README block failed:\n{body}\n{result.stderr[-3000:]}"
