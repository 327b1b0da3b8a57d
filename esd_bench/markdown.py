"""Generated markdown files shared by several generators: each owns one marked section and replaces only that.

A section is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a generator whose section is not
in the file yet appends it. ``BENCHMARKS.md`` holds ``esd_bench.benchmark`` (erasure quality on the toy model) and
``esd_bench.speed`` (speed and memory against the paper's procedure), so each can be regenerated on its own.
"""
from __future__ import annotations

import os
from pathlib import Path

from esd_core.files import replace_file

TITLE = "# Benchmarks\n\nEach section below is written by the command it names; the others are kept as they are.\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: str | os.PathLike, name: str, body: str) -> Path:
    """Write ``body`` as section ``name`` of the markdown file ``path`` (created with a title if missing), keeping
    everything outside the section. The file is replaced atomically; a file whose markers for ``name`` are broken
    (one missing, repeated, or out of order) is refused unchanged."""
    path = Path(path)
    text = path.read_text() if path.exists() else TITLE
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    b, e = text.count(begin), text.count(end)
    if (b, e) == (0, 0):
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    elif (b, e) == (1, 1) and text.index(begin) < text.index(end):
        head, rest = text.split(begin)
        new = head + section + rest.split(end, 1)[1]
    else:
        raise ValueError(f"{path}: the markers of section {name!r} are broken ({b} x {begin!r}, {e} x {end!r}); "
                         "fix or delete them by hand, nothing was written")
    return replace_file(path, lambda tmp: tmp.write_text(new))


def publish(text: str, name: str, path: str | os.PathLike | None) -> None:
    """Print a generator's ``text`` and, when ``path`` is given, write it as section ``name`` of that file."""
    if path:
        replace_section(path, name, text)
    print(text)
