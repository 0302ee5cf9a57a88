"""Checks that the built site works from disk: every local link of every page names a file.

Opened as ``file://…/site/index.html`` (no server), a link to ``page/`` shows a directory listing
and a link to a missing file shows an error page. `nox -s docs` runs this after the build:
``python scripts/check_site_links.py site``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

LINK = re.compile(r"""(?:href|src)="([^"]+)\"""")


def broken_links(site: Path) -> list[str]:
    """Returns ``page: link`` for every local link that does not name an existing file."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        if page.name == "404.html":  # only a server shows it, and it links from the site's root
            continue
        for link in LINK.findall(page.read_text(encoding="utf-8")):
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or not parts.path:  # external, or an anchor on the page
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.is_file():
                problems.append(f"{page.relative_to(site)}: {link}")
    return problems


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "site")
    if not (site / "index.html").is_file():
        print(f"{site}/index.html does not exist: build the site first (nox -s docs)", file=sys.stderr)
        return 2
    problems = broken_links(site)
    for problem in problems:
        print(f"does not open from disk: {problem}", file=sys.stderr)
    pages = len(list(site.rglob("*.html")))
    print(f"{pages} pages, {len(problems)} local links that do not open from disk")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
