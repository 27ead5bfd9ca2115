"""Write one marked section of a markdown file, leaving the rest as it is.

Several benchmark scripts write into the same documents (docs/results.md,
docs/performance.md, README.md); each owns the text between its markers
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``.
"""

from __future__ import annotations

from pathlib import Path


def write_section(path: str | Path, name: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``body``.

    Args:
        path: the markdown file; created with ``# {title}`` when missing.
        name: the marker name.
        body: the section's text, without markers.
        title: heading for a new file.
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else (f"# {title}\n\n" if title else "")
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
