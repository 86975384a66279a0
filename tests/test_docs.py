"""The front page stays a front page, and its links lead somewhere (the guide itself is checked by
`mkdocs build --strict` in `make test`)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150


def test_every_readme_link_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    assert local, "the README links to the guide"
    missing = [link for link in local if not (REPO / link.split("#")[0]).exists()]
    assert missing == []


def test_every_guide_page_is_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md"))
    assert [page for page in pages if page not in nav] == []


def test_the_design_pages_rooms_name_every_module_of_the_package():
    """docs/design.md's repository layout is kept in step with the package: a new module gets its line."""
    rooms = (REPO / "docs" / "design.md").read_text().split("## Repository layout")[1].split("## ")[0]
    named = set(re.findall(r"\b(\w+)\.py\b", rooms))
    modules = {p.stem for p in (REPO / "vqar").rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert sorted(modules - named) == []
