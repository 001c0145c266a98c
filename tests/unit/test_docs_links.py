"""Every relative link of the documentation (README.md, docs/, the roles' and bench's
READMEs) reaches a file of the repository, and its #anchor a heading of that file (the
anchors GitHub makes), so moving or renaming a page or a section cannot leave a dead link."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted(
    {
        REPO / "README.md",
        REPO / "bench/README.md",
        *REPO.glob("docs/**/*.md"),
        *REPO.glob("roles/*/README.md"),
    }
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to
    hyphens; a repeated heading gets -1, -2, ...) and its explicit <a id="...">."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    found = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        words = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
        slug = re.sub(r"[^\w\- ]", "", words).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_every_relative_link_reaches_a_file_and_a_heading() -> None:
    assert len(PAGES) > 20
    dead = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:, file:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} -> {target}"
            if not linked.exists():
                dead.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                dead.append(f"{where}: no such heading")
    assert dead == [], "\n".join(dead)
