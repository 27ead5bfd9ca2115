"""Write one marked section of a markdown file, leaving the rest as it is.

Several benchmark scripts write into the same documents (docs/results.md,
docs/performance.md, README.md); each owns the text between its markers
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: str | Path, name: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``body``.

    The file is read right before writing and replaced atomically, so scripts
    writing other sections of it in between lose nothing.

    Args:
        path: the markdown file; created with ``# {title}`` when missing.
        name: the marker name.
        body: the section's text, without markers.
        title: heading for a new file.
    """
    path = Path(path)
    start, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else (f"# {title}\n" if title else "")
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{name}-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
