"""Every relative link and #anchor in the repository's Markdown files resolves.

A link ``[text](target)`` or image ``![alt](target)`` whose target is neither a URL (any
``scheme:``) nor a bare ``#anchor`` must name an existing file or folder, relative to the
Markdown file (or to the repository root when it starts with ``/``), after its ``#fragment``
and ``?query`` are stripped. An ``#anchor`` on its own, or after a Markdown file, must be the
GitHub-style slug of one of that file's headings. Code (fenced blocks and inline spans) is
not read for links.
"""

from __future__ import annotations

import os
import re
import subprocess
import unicodedata
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# [text](target) and ![alt](target), with an optional title; text may hold one level of [...]
INLINE_LINK = re.compile(
    r"\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]"
    r"\(\s*(?P<target><[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
    r"(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^()\n]*\)))?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[(?P<text>[^\]]+)\]:\s*(?P<target><[^>]*>|\S+)")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[str]:
    """The repository's Markdown files: tracked ones, and new ones git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.md"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return []  # not a git checkout: nothing to parametrise over, the tests skip
    names = {name for name in listed.split("\0") if name}
    return sorted(
        name
        for name in names
        if not any(part.startswith(".venv") for part in Path(name).parts)
        and (ROOT / name).is_file()  # a tracked file deleted in the working tree
    )


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, its newlines kept (so offsets and lines stay put)."""
    return re.sub(r"[^\n]", " ", match.group(0))


@cache
def prose_lines(path: Path) -> tuple[str, ...]:
    """The file's lines with fenced code emptied and code spans and comments blanked."""
    text = HTML_COMMENT.sub(_blank, path.read_text(encoding="utf-8"))
    lines = []
    fence = None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            lines.append("")
        elif fence is not None:
            closing = line.strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                fence = None
            lines.append("")
        else:
            lines.append(CODE_SPAN.sub(_blank, line))
    return tuple(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but - and _ removed,
    each space a hyphen."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    kept = (
        char
        for char in text.strip().lower()
        if char in "-_ " or unicodedata.category(char)[0] in "LNM"
    )
    return "".join(kept).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor a link may name in a Markdown file: its headings' slugs (the second of
    two equal ones with -1, and so on) and explicit <a name/id> anchors."""
    raw_lines = path.read_text(encoding="utf-8").split("\n")
    lines = prose_lines(path)
    found: set[str] = set()
    seen: dict[str, int] = {}

    def add(heading: str) -> None:
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")

    for number, line in enumerate(lines):
        found.update(HTML_ANCHOR.findall(raw_lines[number]))
        if not line.strip():
            continue
        atx = ATX_HEADING.match(line)
        if atx:
            # headings are read from the raw line: code spans count as text there
            add(ATX_HEADING.match(raw_lines[number]).group("text") or "")
        elif (
            SETEXT_UNDERLINE.match(line)
            and number > 0
            and lines[number - 1].strip()
            and not ATX_HEADING.match(lines[number - 1])
            and not lines[number - 1].lstrip().startswith(("|", "-", "*", ">"))
        ):
            add(raw_lines[number - 1].strip())
    return frozenset(found)


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line number, text, target) of every inline link, image and reference definition."""
    lines = prose_lines(path)
    text = "\n".join(lines)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    found = []
    for match in INLINE_LINK.finditer(text):
        line_number = next(i for i, start in enumerate(starts) if start > match.start())
        found.append((line_number, match.group("text"), match.group("target")))
    for number, line in enumerate(lines, start=1):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group("text"), definition.group("target")))
    return found


def problem(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a link target from ``source`` does not resolve, or None when it does."""
    target = target.strip("<>")
    if not target or SCHEME.match(target):
        return None  # an empty target, or a URL (http:, https:, mailto:, ...)
    path_part, _, fragment = target.partition("#")
    path_part = path_part.partition("?")[0]
    if path_part:
        path_part = unquote(path_part)
        base = root if path_part.startswith("/") else source.parent
        resolved = (base / path_part.lstrip("/")).resolve()
        if not resolved.exists():
            return f"no such file or folder: {os.path.relpath(resolved, root)}"
        if root not in resolved.parents and resolved != root:
            return "points outside the repository"
    else:
        resolved = source
    if fragment and resolved.is_file() and resolved.suffix.lower() == ".md":
        if unquote(fragment) not in anchors(resolved):
            shown = os.path.relpath(resolved, root)
            return f"no heading in {shown} has the anchor #{fragment}"
    return None


FILES = markdown_files()


def test_the_readme_is_among_the_files_checked():
    if not FILES:
        pytest.skip("not a git checkout: no list of Markdown files")
    assert "README.md" in FILES


@pytest.mark.parametrize("name", FILES)
def test_links_resolve(name):
    source = ROOT / name
    broken = [
        f"{name}:{line}: [{text}]({target}): {reason}"
        for line, text, target in links(source)
        if (reason := problem(source, target)) is not None
    ]
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Set up and run", "set-up-and-run"),
        ("`threetowers serve`", "threetowers-serve"),
        ("Steps and the time budget", "steps-and-the-time-budget"),
        ("Scaling: does 3T gain more than LiT?", "scaling-does-3t-gain-more-than-lit"),
        ("Data: image→text, R@1 (α = 0.5)", "data-imagetext-r1-α--05"),
        ("snake_case and kebab-case", "snake_case-and-kebab-case"),
        ("[a link](other.md) in a heading", "a-link-in-a-heading"),
    ],
)
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_broken_links_and_anchors_are_found(tmp_path):
    tmp_path = tmp_path.resolve()
    (tmp_path / "there.md").write_text("# A heading\n\ntext\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[fine](there.md) [fine too](there.md#a-heading) [self](#page)\n"
        "```\n[in code](missing.md)\n```\n"
        "`[in a span](missing.md)` and [a URL](https://example.org/x) [mail](mailto:a@b.c)\n"
        "[gone](missing.md#x)\n"
        "![no image](img/none.png)\n"
        "[bad anchor](there.md#no-such-heading) [bad self](#nowhere)\n"
    )
    found = {
        (line, target): reason
        for line, _, target in links(page)
        if (reason := problem(page, target, root=tmp_path)) is not None
    }
    assert set(found) == {
        (7, "missing.md#x"),
        (8, "img/none.png"),
        (9, "there.md#no-such-heading"),
        (9, "#nowhere"),
    }
    assert "no such file" in found[(7, "missing.md#x")]
    assert "#no-such-heading" in found[(9, "there.md#no-such-heading")]
