"""Rebuild ``fp_export/data/kjv.txt.xz`` from Debian's King James Bible packages.

The committed corpus is the output of this script; rerunning it on a Debian machine with
``apt-get install bible-kjv`` (packages ``bible-kjv`` and ``bible-kjv-text``, version 4.38)
reproduces the file byte for byte. The text is the 1611 King James Version, public domain.

Format: one chapter per paragraph, its title line ("Genesis 1") then one verse per line without
verse numbers; paragraphs separated by one blank line.
"""

from __future__ import annotations

import hashlib
import lzma
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fp_export" / "data" / "kjv.txt.xz"


def chapters(raw: str) -> list[str]:
    """Split the ``bible -l0`` dump into chapter paragraphs."""
    out: list[list[str]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if line.startswith("  "):
            number, _, verse = line.strip().partition(" ")
            if not number.isdigit() or not out:
                raise ValueError(f"unexpected verse line: {line!r}")
            out[-1].append(verse.strip())
        else:
            out.append([line.strip()])
    return ["\n".join(c) for c in out]


def main() -> None:
    raw = subprocess.run(
        ["bible", "-l0", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    text = "\n\n".join(chapters(raw)) + "\n"
    data = lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    OUT.write_bytes(data)
    print(f"{OUT}: {len(text)} chars, sha256(text)={hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
