"""Real text found on this machine, turned into interactions (for the demo and the benchmarks).

Each source yields *documents* (one file, or one chapter); train and held-out data are split by
document, never by line. ``interactions(doc, ...)`` cuts a document into records whose prompt is the
document's name plus the text just before a chunk and whose response is the chunk.
"""
from __future__ import annotations

import glob
import gzip
import html.parser
import random
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# The packages `make test` installs on this machine's image (.ci/services.sh: prometheus and what it pulls in).
# Their files are never documents, so a benchmark draws the same corpus before and after a test run (they bring
# changelogs, man pages and JavaScript of their own, and drawing from a changed file list reshuffles every pick).
INSTALLED_BY_TESTS = (
    "prometheus", "prometheus-node-exporter", "prometheus-node-exporter-collectors", "freeipmi-common",
    "libfreeipmi17", "ipmitool", "openipmi", "libopenipmi0", "libjs-jquery-hotkeys", "fonts-glyphicons-halflings",
    "libjs-popper.js", "libjs-bootstrap4", "libjs-bootstrap", "libjs-moment", "libjs-eonasdan-bootstrap-datetimepicker",
    "libjs-moment-timezone", "libjs-mustache", "libjs-d3", "libjs-rickshaw", "libjs-sizzle", "node-jquery",
    "uuid-runtime", "kmod", "libio-pty-perl", "libipc-run-perl", "libnvme1", "nvme-cli", "pci.ids", "libpci3",
    "libsnmp-base", "libsnmp40", "libtime-duration-perl", "libtimedate-perl", "moreutils", "smartmontools",
)


def _installed_by_tests() -> frozenset[str]:
    """Every path dpkg lists for the packages of ``INSTALLED_BY_TESTS`` that are installed here."""
    lists = [f for pkg in INSTALLED_BY_TESTS
             for f in glob.glob(f"/var/lib/dpkg/info/{pkg}.list") + glob.glob(f"/var/lib/dpkg/info/{pkg}:*.list")]
    return frozenset(line for f in lists for line in Path(f).read_text(errors="replace").splitlines())


def _files(paths) -> list[Path]:
    """Candidate files, sorted, without those of the packages the tests install (a file of theirs, or one
    reached through a folder link of theirs, such as a doc folder linked to another package's)."""
    skip = _installed_by_tests()

    def theirs(p: Path) -> bool:
        return (str(p) in skip or str(p.resolve()) in skip
                or any(str(a) in skip and a.is_symlink() for a in p.parents))
    return sorted(p for p in paths if not theirs(p))


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def python_docs(limit: int, seed: int = 0) -> list[Document]:
    """Python standard-library sources (no tests, no site-packages, no idlelib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _files(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idlelib"} & set(p.relative_to(root).parts)
                   and p.stat().st_size > 2000)
    return _take(files, limit, seed, lambda p: p.relative_to(root).as_posix())


def perl_docs(limit: int, seed: int = 0) -> list[Document]:
    files = _files({Path(p).resolve() for p in glob.glob("/usr/share/perl/*/**/*.pm", recursive=True)
                    if Path(p).stat().st_size > 2000})
    return _take(files, limit, seed, lambda p: p.name)


def c_header_docs(limit: int, seed: int = 0) -> list[Document]:
    files = _files(p for p in Path("/usr/include").rglob("*.h") if p.is_file() and p.stat().st_size > 2000)
    return _take(files, limit, seed, lambda p: p.relative_to("/usr/include").as_posix())


def man_docs(limit: int, seed: int = 0) -> list[Document]:
    """Section 1-8 man pages rendered to plain text with groff (generated gcloud pages skipped)."""
    files = _files(p for s in range(1, 9) for p in Path(f"/usr/share/man/man{s}").glob("*.gz")
                   if not p.name.startswith("gcloud") and p.stat().st_size > 1500)
    random.Random(seed).shuffle(files)
    out = []
    for p in files:
        if len(out) >= limit:
            break
        try:
            src = gzip.decompress(p.read_bytes())
            text = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-dAD=l"], input=src,
                                  capture_output=True, timeout=20).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            continue
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 2000:
            out.append(Document(p.name.removesuffix(".gz"), text))
    return out


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "nav"):
            self.skip += 1
        elif tag in ("p", "pre", "h1", "h2", "h3", "li", "br"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "nav") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def rust_book_docs(limit: int, seed: int = 0) -> list[Document]:
    """Chapters of the Rust books bundled with rustup's toolchain (print.html split at <h1>)."""
    books = sorted(glob.glob("/root/.rustup/toolchains/*/share/doc/rust/html/*/print.html")
                   + glob.glob("/usr/share/doc/rust*/html/*/print.html"))
    docs: list[Document] = []
    seen = set()
    for b in books:
        raw = Path(b).read_text(encoding="utf-8", errors="replace")
        for i, chapter in enumerate(re.split(r"<h1[^>]*>", raw)[1:]):
            p = _Text()
            p.feed(chapter)
            text = re.sub(r"\n{3,}", "\n\n", "".join(p.parts)).strip()
            key = text[:200]
            if len(text) > 2000 and key not in seen:
                seen.add(key)
                docs.append(Document(f"{Path(b).parent.name}#{i}", text))
    random.Random(seed).shuffle(docs)
    return docs[:limit]


def _take(files: list[Path], limit: int, seed: int, name: Callable[[Path], str]) -> list[Document]:
    random.Random(seed).shuffle(files)
    out = []
    for p in files:
        if len(out) >= limit:
            break
        text = _read(p)
        if text and len(text) > 2000:
            out.append(Document(name(p), text))
    return out


def locale_docs(limit: int, seed: int = 0) -> list[Document]:
    """glibc locale definitions: structured tables of <Uxxxx> code points, names and formats."""
    files = _files(p for p in Path("/usr/share/i18n/locales").iterdir() if p.is_file() and p.stat().st_size > 3000)
    return _take(files, limit, seed, lambda p: p.name)


def changelog_docs(limit: int, seed: int = 0) -> list[Document]:
    """Debian package changelogs: terse English between version lines, names and dates."""
    files = _files(p for p in Path("/usr/share/doc").glob("*/changelog.Debian.gz") if p.stat().st_size > 1500)
    random.Random(seed).shuffle(files)
    out = []
    for p in files:
        if len(out) >= limit:
            break
        try:
            text = gzip.decompress(p.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if len(text) > 3000:
            out.append(Document(p.parent.name, text))
    return out


def javascript_docs(limit: int, seed: int = 0) -> list[Document]:
    """JavaScript modules shipped with Node.js packages (minified files skipped)."""
    found = _files(p for root in ("/usr/lib/node_modules", "/usr/share/nodejs") for p in Path(root).rglob("*.js")
                   if p.is_file() and ".min." not in p.name and p.stat().st_size > 3000)
    files = sorted({p.resolve() for p in found})  # a module linked from two places is one document
    docs = _take(files, limit * 3, seed, lambda p: "/".join(p.parts[-3:]))
    return [d for d in docs if max(map(len, d.text.splitlines())) < 400][:limit]  # no one-line bundles


SOURCES: dict[str, Callable[[int, int], list[Document]]] = {
    "python": python_docs, "perl": perl_docs, "c": c_header_docs, "man": man_docs, "rust": rust_book_docs,
    "locale": locale_docs, "changelog": changelog_docs, "js": javascript_docs,
}
# Benchmark suites: "related" are the continual benchmark's four (code and prose that help one another);
# "unlike" are four kinds of text as far apart as this machine has (tables, terse changelogs, code, prose).
SUITES: dict[str, list[str]] = {"related": ["man", "python", "rust", "c"],
                                "unlike": ["locale", "changelog", "js", "man"]}


def interactions(doc: Document, domain: str, chars: int = 360, per_doc: int = 4, context: int = 200) -> Iterator[dict]:
    """Records ``{"prompt", "response", "meta"}`` cut from one document."""
    text = doc.text
    start = min(len(text) // 5, 2000)
    for k in range(per_doc):
        a = start + k * chars * 2
        body = text[a : a + chars]
        if len(body) < chars // 2:
            break
        yield {"prompt": f"# {doc.name}\n{text[max(0, a - context) : a]}", "response": body,
               "meta": {"domain": domain, "doc": doc.name}}


def code_interactions(limit_files: int = 60, seed: int = 0) -> list[dict]:
    """The demo's data: chunks of Python standard-library sources."""
    return [rec for d in python_docs(limit_files, seed) for rec in interactions(d, "python")]
