"""MkDocs hooks: the home page is the README (its ``docs/`` links made relative)."""

from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    return README.read_text(encoding="utf-8").replace("](docs/", "](")
