"""Every relative link in README.md and docs/*.md resolves.

A link (``[text](target)``, an image ``![alt](target)``, a reference definition ``[ref]: target``,
or an HTML ``src=``/``href=`` attribute) whose target has no URL scheme must name a file that
exists, relative to the page that holds it; a ``#anchor`` into a markdown page (or into the page
itself) must name one of that page's headings under GitHub's slug rules. External links
(``http:``, ``https:``, ``mailto:``, ...) are not checked: nothing here reaches the network.
Links inside fenced code blocks and inline code are not links and are skipped. Reads text only
(no torch, no nnsight).
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
                          r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
_HTML_ATTR = re.compile(r"""<[a-zA-Z][^>]*?\s(?:src|href)\s*=\s*["']([^"']*)["']""")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)


def strip_code(text: str) -> str:
    """The markdown text without fenced code blocks and inline code spans (which hold no links
    and no headings)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def extract_links(text: str) -> list[str]:
    """Every link target in a markdown text, in order: inline links and images, reference
    definitions, HTML src/href attributes; code is skipped."""
    text = strip_code(text)
    found = []
    for pattern in (_INLINE_LINK, _REF_DEF, _HTML_ATTR):
        for match in pattern.finditer(text):
            target = match.group(1).strip()
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((match.start(), target))
    return [target for _, target in sorted(found)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: link text kept, markup and punctuation dropped
    (letters, digits, '_', '-' and spaces stay), lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)                         # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown text's headings; a repeated slug gets -1, -2, ... as on
    GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for match in _HEADING.finditer(strip_code_blocks_only(text)):
        slug = github_slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def strip_code_blocks_only(text: str) -> str:
    """The text without fenced code blocks (a '#' comment there is not a heading); inline code
    in a heading stays, since its text is part of the anchor."""
    return _FENCE.sub("", text)


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """The relative links of one markdown page that do not resolve, each as 'target: why'."""
    page = page.resolve()
    text = page.read_text(encoding="utf-8") if text is None else text
    broken = []
    for target in extract_links(text):
        if not target or _SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.suffix.lower() == ".md":
            dest_text = text if dest == page else dest.read_text(encoding="utf-8")
            if unquote(anchor).lower() not in anchors(dest_text):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


def test_extractor_finds_links_and_skips_code():
    text = (
        "See [the spec](docs/a.md#two-words) and ![fig](img/x+y.png \"title\").\n"
        "[ref]: other.md\n"
        '<img src="pic.png" width="3">\n'
        "`[not](a-link.md)` and [web](https://example.org/x)\n"
        "```bash\n[also not](code.md)\n# not a heading\n```\n"
    )
    assert extract_links(text) == ["docs/a.md#two-words", "img/x+y.png", "other.md", "pic.png",
                                   "https://example.org/x"]


def test_slugs_follow_github_rules():
    assert github_slug("Remote runs on NDIF") == "remote-runs-on-ndif"
    assert github_slug("Conventions this toolkit adds to the spec") == \
        "conventions-this-toolkit-adds-to-the-spec"
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
    assert github_slug("`results.jsonl` fields") == "resultsjsonl-fields"
    assert github_slug("In a notebook, inside your own trace") == "in-a-notebook-inside-your-own-trace"
    assert github_slug("AF1 on [your](x.md) task") == "af1-on-your-task"
    assert anchors("# A\n## Notes\n```\n# code\n```\n### Notes\n") == {"a", "notes", "notes-1"}


def test_checker_reports_broken_links(tmp_path):
    """The check can fail: a missing file, a missing heading and a missing own anchor are
    reported; a good file link, a good anchor and external links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Page B\n\n## Some heading\n")
    (tmp_path / "fig.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n"
        "[ok](docs/b.md) [ok anchor](docs/b.md#some-heading) ![ok image](fig.png) [self](#top)\n"
        "[gone](docs/missing.md) [bad anchor](docs/b.md#no-such-heading) [bad self](#nowhere)\n"
        "![gone image](figures/none.png) [web](https://example.org/missing.md)\n"
    )
    broken = broken_links(page)
    assert [b.split(":")[0] for b in broken] == ["docs/missing.md", "docs/b.md#no-such-heading",
                                                  "#nowhere", "figures/none.png"]


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/ holds no markdown pages"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert broken_links(page) == []
