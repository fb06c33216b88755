"""Build ``tfkit/assets/shakespeare.jsonl.gz``, the bundled default corpus, from ``../shared/corpora/shakespeare``.

One JSON line per work, sorted by file name: ``{"title": <file stem>, "text": <the work>}``; gzip
level 9 with mtime 0 and no file name, so the output is byte-for-byte reproducible.

Usage: ``python tools/make_default_corpus.py [--src DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "corpora" / "shakespeare"
DEFAULT_OUT = ROOT / "tfkit" / "assets" / "shakespeare.jsonl.gz"
EXPECTED_WORKS = 42


def build(src: Path, out: Path) -> dict:
    """Write the corpus; return a summary (works, text bytes, compressed bytes, sha256)."""
    files = sorted(src.glob("*.txt"), key=lambda p: p.name)
    if len(files) != EXPECTED_WORKS:
        raise SystemExit(f"expected {EXPECTED_WORKS} .txt files in {src}, found {len(files)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n_bytes = 0
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
        for f in files:
            text = f.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
            n_bytes += len(text.encode("utf-8"))
            line = json.dumps({"title": f.stem, "text": text}, ensure_ascii=False)
            gz.write(line.encode("utf-8") + b"\n")
    tmp.replace(out)
    data = out.read_bytes()
    return {"works": len(files), "text_bytes": n_bytes, "gz_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder of the 42 Shakespeare .txt files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .jsonl.gz to write")
    args = ap.parse_args(argv)
    print(json.dumps(build(args.src, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
