"""The documentation holds together: every ``docs/...md`` page that code, tests, scripts or the
build cite exists (and so does the section named after it, when one is), and every relative link
in README.md and docs/*.md reaches a file, and a heading when it names one (docs/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CITING = ("src", "tests", "scripts", "envoy", "config")
CITING_FILES = ("Makefile", "pyproject.toml", "Dockerfile", "docker-compose.yaml")
CITING_SUFFIXES = {".py", ".yaml", ".yml", ".lua", ".toml", ".cfg", ".sh"}

# `docs/page.md`, optionally followed by ` (Section)` or `#anchor`.
CITATION = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+)| \(([^()\n]+)\))?")
# [text](target): inline Markdown links; code spans and fenced blocks are removed first.
LINK = re.compile(r"\[[^\]\n]*\]\(([^()\s]+)\)")
FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
# Pages written on other branches: linked from the maps already, checked once they exist.
PENDING = {"algorithms.md", "compatibility.md", "console.md", "deployment.md"}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than ``-`` and ``_``
    dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [title for _, title in HEADING.findall(text)]


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for title in headings(page):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def citing_files() -> list[Path]:
    files = [ROOT / name for name in CITING_FILES if (ROOT / name).exists()]
    for top in CITING:
        for path in sorted((ROOT / top).rglob("*")):
            if "__pycache__" in path.parts or "pb" in path.relative_to(ROOT).parts[2:3]:
                continue
            if path.is_file() and path.suffix in CITING_SUFFIXES and path != Path(__file__):
                files.append(path)
    return files


def citations() -> list[tuple[str, str, str | None]]:
    """(where, page, section title or anchor) for every docs page cited outside docs/."""
    found = []
    for path in citing_files():
        # A citation may be wrapped across comment lines: join them first.
        text = re.sub(r"\n\s*(#|--|//)?\s*", " ", path.read_text(encoding="utf-8"))
        for m in CITATION.finditer(text):
            found.append((str(path.relative_to(ROOT)), m.group(1), m.group(2) or m.group(3)))
    return found


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def section_matches(page: Path, section: str) -> bool:
    """A cited section is a heading's text (``(Wildcards)``) or its anchor (``#wildcards``);
    ``(A, B)`` cites two sections."""
    titles = {t.strip("`").lower() for t in headings(page)} | {slug(t) for t in headings(page)}
    wanted = [part.strip().strip("`").lower() for part in section.split(",")]
    return all(w in titles or slug(w) in anchors(page) for w in wanted)


def test_the_docs_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert {"README.md", "architecture.md", "configuration.md"} <= {
        p.name for p in DOCS.glob("*.md")
    }


def test_code_cites_docs_pages() -> None:
    # The check below must have something to check.
    assert len(citations()) >= 20


@pytest.mark.parametrize(
    ("where", "page", "section"), citations(), ids=lambda v: str(v) if v else "-"
)
def test_cited_page_and_section_exist(where: str, page: str, section: str | None) -> None:
    target = DOCS / page
    if page in PENDING and not target.exists():
        pytest.skip(f"docs/{page} is written on another branch")
    assert target.is_file(), f"{where} cites docs/{page}, which does not exist"
    if section is not None:
        assert section_matches(target, section), (
            f"{where} cites docs/{page} ({section}); its headings are {headings(target)}"
        )


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            if destination.parent == DOCS and destination.name in PENDING:
                continue
            broken.append(f"{target}: no such file")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_catches_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n\n[ok](#a-section) [bad](#nope) [gone](missing.md)\n")
    assert anchors(page) == {"title", "a-section"}
    assert links(page) == ["#a-section", "#nope", "missing.md"]
    assert not (tmp_path / "missing.md").exists()
    assert "nope" not in anchors(page)


def test_slugs_follow_github() -> None:
    assert slug("`/healthcheck` (any method)") == "healthcheck-any-method"
    assert slug("detailed_metric and value_to_metric") == "detailed_metric-and-value_to_metric"
    assert slug("One request, socket to Redis and back") == "one-request-socket-to-redis-and-back"


def _tree_modules(text: str) -> set[str]:
    """The modules docs/architecture.md's tree names, as paths below src/ratelimit_svc/."""
    block = text.split("```\nsrc/ratelimit_svc/\n", 1)[1].split("```", 1)[0]
    found: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, folder) of the folders still open
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name:
            continue
        indent = len(line) - len(line.lstrip())
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = "/".join([folder for _, folder in parents] + [name.rstrip("/")])
        if name.endswith("/"):
            parents.append((indent, name.rstrip("/")))
        found.add(path)
    return found


def test_the_architecture_tree_names_every_module() -> None:
    package = ROOT / "src" / "ratelimit_svc"
    listed = _tree_modules((DOCS / "architecture.md").read_text())
    missing = []
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package)
        if relative.parts[0] == "pb" or relative.name == "__init__.py":
            continue  # generated code; a package's __init__ is named by its folder
        folders = ["/".join(relative.parts[:i]) for i in range(1, len(relative.parts))]
        if relative.as_posix() not in listed and not any(f in listed for f in folders[1:]):
            missing.append(relative.as_posix())
    assert not missing, f"docs/architecture.md's tree does not name {missing}"


def test_the_tree_reader_sees_nesting() -> None:
    text = "```\nsrc/ratelimit_svc/\n  a.py  x\n  b/\n    c.py  y\n    d/\n  e.py\n```\n"
    assert _tree_modules(text) == {"a.py", "b", "b/c.py", "b/d", "e.py"}
