"""Every relative link of README.md and docs/*.md, and every docs/ link in a code comment, leads to a
file that exists and, with a #fragment, to a heading of that file (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CODE_LINK = re.compile(r"\b(docs/[\w-]+\.md)(?:#([\w-]+))?")  # docs/page.md#anchor in a comment
FENCE = re.compile(r"^\s*```")


def outside_fences(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            kept.append(line)
    return kept


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where links are links."""
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in outside_fences(text))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (but `-` and `_`), spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(path.read_text()):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            base = github_anchor(heading.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken(source: Path, target: str) -> str | None:
    """Why a link from `source` to `target` (`file`, `file#anchor` or `#anchor`) leads nowhere."""
    file, _, fragment = target.partition("#")
    path = (source.parent / file).resolve() if file else source
    if not path.exists():
        return f"{source.relative_to(ROOT)}: {target}: no file {file}"
    if fragment and path.suffix == ".md" and fragment not in anchors(path):
        return f"{source.relative_to(ROOT)}: {target}: no heading #{fragment} in {path.relative_to(ROOT)}"
    return None


def test_github_anchors_drop_punctuation_and_keep_hyphens_and_underscores():
    assert github_anchor("Decoding on the GPU: `--data_on_gpu`") == "decoding-on-the-gpu---data_on_gpu"
    assert github_anchor("The run's own config") == "the-runs-own-config"
    assert github_anchor("What a run leaves in OUTPUT_DIR") == "what-a-run-leaves-in-output_dir"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    links = [
        (doc, target)
        for doc in DOCS
        for target in LINK.findall(prose(doc.read_text()))
        if not re.match(r"[a-z]+:", target)
    ]  # http:, https:, mailto: are not ours to check
    assert len(links) > 50, "the link pattern found too few links: is it still matching?"
    problems = [problem for doc, target in links if (problem := broken(doc, target))]
    assert not problems, "\n".join(problems)


def test_every_docs_link_in_the_code_resolves():
    sources = [*(ROOT / "launcher").rglob("*.py"), *(ROOT / "scripts").rglob("*"), ROOT / "Makefile"]
    problems = []
    for source in (path for path in sources if path.is_file()):
        for page, fragment in CODE_LINK.findall(source.read_text(errors="replace")):
            problem = broken(ROOT / "README.md", f"{page}#{fragment}" if fragment else page)
            if problem:
                problems.append(f"{source.relative_to(ROOT)} -> {problem.split(': ', 1)[1]}")
    assert not problems, "\n".join(problems)
