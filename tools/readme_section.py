"""Replace the generated part of a README section: the text between ``<!-- NAME -->`` and ``<!-- /NAME -->``."""
from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, name: str, body: str) -> None:
    text = readme.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")
