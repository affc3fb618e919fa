"""Real corpora, from text that Debian packages ship, laid out the way people keep a corpus (on S3, or a folder):

    fortunes/<name>.jsonl[.gz]       the `fortunes` package's files (/usr/share/games/fortunes), one JSON object per
                                     fortune ({"text", "source", "n"}), every third file gzipped
    man/man<s>/<page>.<s>.txt[.gz]   man pages rendered to plain text (groff -man -Tutf8, 80 columns, overstrikes
                                     stripped by col -b), read paragraph by paragraph; every fourth one gzipped

Hundreds of files of very uneven size, from a few hundred bytes (a short fortune file gzipped) to about 1 MB (the
largest man pages), and real mess: overstrikes in fortunes, tables and long option lists in man pages, paragraphs
that many pages share (REPORTING BUGS, COPYRIGHT), i.e. exact duplicates across files.

`make setup-corpora` installs the packages (`CORPUS_PACKAGES` in the Makefile); a test skips, naming what is
missing, only when they are not there.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

FORTUNES_DIR = "/usr/share/games/fortunes"
MAN_ROOT = "/usr/share/man"
MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")
# Debian package -> what of it the corpus needs (the Makefile's CORPUS_PACKAGES installs the same list).
PACKAGES = {"fortunes": FORTUNES_DIR, "groff-base": "groff", "bsdextrautils": "col", "manpages": MAN_ROOT + "/man7"}
MAN_PAGES = 240  # rendered pages, spread over the sizes of those installed, plus the largest few
LARGEST_PAGES = 3


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus: its path under the corpus root, its uncompressed bytes and how it is stored."""

    path: str
    data: bytes
    gzipped: bool

    @property
    def stored(self) -> bytes:
        return gzip.compress(self.data, mtime=0) if self.gzipped else self.data


def missing_packages() -> list[str]:
    """The corpus packages (or their files) that are not on this machine."""
    out = []
    for package, needs in PACKAGES.items():
        there = os.path.isdir(needs) if needs.startswith("/") else shutil.which(needs) is not None
        if not there:
            out.append(package)
    if "manpages" not in out and not glob.glob(os.path.join(MAN_ROOT, "man7", "*")):
        out.append("manpages (installed, but dpkg's path-exclude in /etc/dpkg/dpkg.cfg.d/ drops /usr/share/man)")
    return out


def require_packages() -> None:
    missing = missing_packages()
    if missing:
        pytest.skip(f"the real-corpus fixtures need the Debian packages {', '.join(missing)}: run "
                    f"`make setup-corpora` (apt-get install -y {' '.join(PACKAGES)})")


def fortune_files() -> list[CorpusFile]:
    """Every fortune file as JSONL, one object per `%`-separated fortune (empty ones left out)."""
    out = []
    names = sorted(n for n in os.listdir(FORTUNES_DIR)
                   if not n.endswith((".dat", ".u8")) and os.path.isfile(os.path.join(FORTUNES_DIR, n)))
    for i, name in enumerate(names):
        with open(os.path.join(FORTUNES_DIR, name), encoding="utf-8") as f:
            raw = f.read()
        fortunes = [t.strip("\n") for t in raw.split("\n%\n")]
        lines = [json.dumps({"text": t, "source": f"fortunes/{name}", "n": n}, ensure_ascii=False)
                 for n, t in enumerate(fortunes) if t.strip() and t.strip() != "%"]
        gzipped = i % 3 == 2
        data = ("\n".join(lines) + "\n").encode()
        out.append(CorpusFile(f"fortunes/{name}.jsonl" + (".gz" if gzipped else ""), data, gzipped))
    return out


def _page_sources() -> list[str]:
    """Man page sources, spread evenly over their sizes, with the largest few; `.so` redirects left out."""
    pages = []
    for section in MAN_SECTIONS:
        for path in glob.glob(os.path.join(MAN_ROOT, f"man{section}", "*.gz")):
            if os.path.islink(path):
                continue
            with gzip.open(path) as f:
                if f.read(64).lstrip().startswith(b".so"):
                    continue
            pages.append((os.path.getsize(path), path))
    pages.sort()
    if len(pages) <= MAN_PAGES:
        return [p for _, p in pages]
    step = len(pages) / (MAN_PAGES - LARGEST_PAGES)
    chosen = {pages[int(i * step)][1] for i in range(MAN_PAGES - LARGEST_PAGES)}
    chosen |= {p for _, p in pages[-LARGEST_PAGES:]}
    return sorted(chosen)


def render_man_page(source: str) -> bytes:
    """A man page as plain text, 80 columns: groff's terminal output with overstrikes (-P-c), stripped by col -b."""
    with gzip.open(source) as f:
        roff = f.read()
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    text = subprocess.run(["groff", "-man", "-Tutf8", "-k", "-t", "-P-c", "-rLL=80n"], input=roff, env=env,
                          capture_output=True, check=False, timeout=120).stdout
    return subprocess.run(["col", "-bx"], input=text, env=env, capture_output=True, check=True, timeout=120).stdout


def man_files() -> list[CorpusFile]:
    sources = _page_sources()
    with ThreadPoolExecutor(2) as pool:  # two groff processes: the machine has two cores, shared
        rendered = list(pool.map(render_man_page, sources))
    out = []
    for i, (source, text) in enumerate(zip(sources, rendered)):
        if len(text) < 200:  # a page groff could not render
            continue
        section = os.path.basename(os.path.dirname(source))
        gzipped = i % 4 == 3
        name = os.path.basename(source)[: -len(".gz")] + ".txt" + (".gz" if gzipped else "")
        out.append(CorpusFile(f"man/{section}/{name}", text, gzipped))
    return out


def one_file_per_fortune(count: int) -> list[CorpusFile]:
    """The first `count` fortunes (in file order) as one plain-text file each, the layout of a corpus kept one page
    or one snippet per file: thousands of files of a few dozen to a few thousand bytes."""
    out = []
    for f in fortune_files():
        for line in f.data.decode("utf-8").splitlines():
            record = json.loads(line)
            name = record["source"].split("/", 1)[1]
            out.append(CorpusFile(f"snippets/{name}/{record['n']:05d}.txt", record["text"].encode(), False))
            if len(out) == count:
                return out
    return out


def debian_corpus() -> list[CorpusFile]:
    """The whole corpus (skips the test when its packages are missing)."""
    require_packages()
    return fortune_files() + man_files()


def upload(files: list[CorpusFile], s3_endpoint: str, bucket: str, prefix: str) -> None:
    """Put the files under s3://bucket/prefix/ (the bucket must exist)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.path}", Body=f.stored), files))

