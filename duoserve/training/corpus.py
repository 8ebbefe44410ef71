"""The training corpus: Python 3.11 documentation, reST sources turned into plain text.

Source: Debian's ``python3.11-doc`` package ships the Sphinx sources of every page under
``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`` (PSF License; code examples
Zero-Clause BSD). Each page is one document. Markup is removed with a small set of rules:
headings lose their adornments, roles keep their text, directives become their signature
or a short prefix ("Note:", "New in version 3.8."), index/toctree/metadata blocks vanish,
and code blocks stay indented.

Held-out split: by document, a page goes to held-out when a hash of its path falls in the
lowest ``heldout_percent``; the rule depends on nothing but the path.

Files written (``write_corpus``): ``train.jsonl.gz`` and ``heldout.jsonl.gz`` (one
``{"id", "text"}`` per line), ``corpus.json`` (name, version, license, sizes).
The train split also holds short chat-formatted examples made from section titles and
first paragraphs, so the default model knows the chat template the server uses.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

CORPUS_NAME = "python-3.11-docs"
CORPUS_LICENSE = "PSF-2.0 (Python documentation; code examples 0BSD)"

# Chat markers; the tokenizer declares them as special tokens and the chat template uses them.
EOS_TOKEN = "<|endoftext|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
SPECIAL_TOKENS = (EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN)

_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:-]*)::\s*(.*)$")
_COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
_OPTION_RE = re.compile(r"^\s*:[\w -]+:(\s.*)?$")
_ADORNMENT_RE = re.compile(r"^([=\-~^\"'`#*+_.:])\1{2,}\s*$")
_TABLE_BORDER_RE = re.compile(r"^\s*[=\-+|: ]*[=\-]{3,}[=\-+|: ]*$")
_ROLE_RE = re.compile(r":((?:[A-Za-z][\w.+-]*:)+)`([^`]+)`")
_NUMBERED_ROLES = {"pep:": "PEP {}", "rfc:": "RFC {}", "issue:": "bpo-{}", "gh:": "gh-{}"}
_LINK_RE = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_REF_RE = re.compile(r"`([^`]+)`__?")
_LITERAL_RE = re.compile(r"``([^`]+?)``")
_FIELD_RE = re.compile(r"^:(orphan|tocdepth|nocomments|og:[\w-]+):.*$")  # page metadata
_STRONG_RE = re.compile(r"\*\*(\S[^*]*?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*\\])\*(?![\s*])([^*\n]+?)(?<!\s)\*(?![\w*])")
_HEADING_MARK = "\x00H "

_DROP = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "codeauthor",
    "tabularcolumns", "raw", "image", "figure", "only", "testsetup", "testcleanup",
    "include", "literalinclude", "productionlist", "currentmodule", "module", "program",
    "audit-event", "c:namespace", "c:namespace-push", "c:namespace-pop", "default-role",
    "role", "contents", "miscnews", "limited-api-list", "opcode-list",
}  # fmt: skip
_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"}
_PREFIX = {
    "note": "Note: ", "warning": "Warning: ", "seealso": "See also: ", "tip": "Tip: ",
    "important": "Important: ", "caution": "Caution: ", "hint": "Hint: ", "danger": "Danger: ",
    "attention": "Attention: ", "impl-detail": "CPython implementation detail: ",
}  # fmt: skip


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index one past the block that starts at ``start``: blank or more-indented lines."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    return end


def _render_directive(name: str, arg: str, body: list[str]) -> list[str]:
    """Plain-text lines for one directive whose body is already dedented and cleaned."""
    while body and _OPTION_RE.match(body[0]):
        body = body[1:]  # leading ``:option: value`` lines
    body = _clean_lines(body)
    if name in _DROP:
        return []
    if name in _CODE:
        return ["", *("    " + line if line.strip() else "" for line in body), ""]
    head = ""
    if name in _PREFIX:
        head = _PREFIX[name]
    elif name == "versionadded":
        head = f"New in version {arg}. "
        arg = ""
    elif name == "versionchanged":
        head = f"Changed in version {arg}: "
        arg = ""
    elif name == "deprecated":
        head = f"Deprecated since version {arg}: "
        arg = ""
    elif name == "deprecated-removed":
        since, _, removed = arg.partition(" ")
        head = f"Deprecated since version {since}, will be removed in version {removed}: "
        arg = ""
    elif name == "availability":
        return ["", f"Availability: {arg}", ""]
    lines = [""] + ([arg, ""] if arg else [])
    if head:
        first = next((i for i, line in enumerate(body) if line.strip()), None)
        if first is None:
            return [*lines, head.strip()]
        body = [*body[:first], head + body[first], *body[first + 1 :]]
    return [*lines, *body, ""]


def _clean_lines(lines: list[str]) -> list[str]:
    """Clean one block of reST lines (recursive over directive bodies)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        directive = _DIRECTIVE_RE.match(line)
        if directive or _COMMENT_RE.match(line):
            indent = _indent(line)
            end = _block_end(lines, i + 1, indent)
            if directive:
                body = textwrap.dedent("\n".join(lines[i + 1 : end])).split("\n")
                name, arg = directive.group(2), directive.group(3).strip()
                rendered = _render_directive(name, arg, body)
                out.extend(" " * indent + r if r.strip() else "" for r in rendered)
            i = end
            continue
        if _ADORNMENT_RE.match(line):
            # Underlined heading: the previous line is the title.
            if out and out[-1].strip() and i > 0 and lines[i - 1].rstrip() == out[-1]:
                out[-1] = _HEADING_MARK + out[-1].strip()
            i += 1
            continue
        if _TABLE_BORDER_RE.match(line) or line.strip() == "::":
            i += 1
            continue
        if line.endswith("::"):
            line = line[:-2].rstrip() + (":" if not line[:-2].endswith(" ") else "")
        out.append(line)
        i += 1
    return out


def _clean_inline(text: str) -> str:
    """Remove inline reST markup, keeping the visible text."""

    def role(match: re.Match[str]) -> str:
        name, inner = match.group(1), match.group(2)
        if name in _NUMBERED_ROLES and "<" not in inner:
            return _NUMBERED_ROLES[name].format(inner.lstrip("!"))
        target = re.match(r"^(.*?)\s*<[^>]*>$", inner, flags=re.S)
        if target and target.group(1):
            return target.group(1)
        if inner.startswith("~"):
            return inner[1:].split(".")[-1]
        return inner.lstrip("!")

    text = _ROLE_RE.sub(role, text)
    text = _LINK_RE.sub(r"\1", text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _REF_RE.sub(r"\1", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = text.replace("|version|", "3.11").replace("|release|", "3.11")
    return text.replace("\\ ", "").replace(" --- ", " — ")


def clean_rst(source: str) -> tuple[str, list[tuple[str, str]]]:
    """Turn one reST page into plain text; also return its (title, body) sections."""
    lines = _clean_lines(source.replace("\t", "    ").split("\n"))
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith(_HEADING_MARK):
            sections.append((_clean_inline(line[len(_HEADING_MARK) :]), []))
        elif not _FIELD_RE.match(line):
            sections[-1][1].append(line)
    parts: list[str] = []
    result: list[tuple[str, str]] = []
    for title, body_lines in sections:
        body = _clean_inline("\n".join(body_lines))  # roles may span lines
        body = re.sub(r"\n{3,}", "\n\n", body).strip("\n")
        if title:
            parts.append(title)
        if body.strip():
            parts.append(body)
        if title:
            result.append((title, body))
    return "\n\n".join(parts).strip() + "\n", result


def is_heldout(doc_id: str, heldout_percent: float) -> bool:
    """Deterministic document-level split: hash of the id below the percentage."""
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < heldout_percent * 100


_QUESTIONS = (
    "Tell me about {}.",
    "What does the documentation say about {}?",
    "Explain {}.",
    "Can you describe {}?",
)


def chat_examples(doc_id: str, sections: list[tuple[str, str]], max_chars: int = 700) -> list[str]:
    """Short chat-formatted examples: a question on a section title, its first paragraphs."""
    examples = []
    for index, (title, body) in enumerate(sections):
        key = hashlib.sha256(f"{doc_id}#{index}".encode()).digest()
        if key[0] % 2 or len(title) < 4 or not body[:1].isalpha():
            continue  # half of the sections, prose-first ones only
        answer = ""
        for paragraph in body.split("\n\n"):
            if answer and len(answer) + len(paragraph) > max_chars:
                break
            answer = f"{answer}\n\n{paragraph}" if answer else paragraph
        if len(answer) < 80 or len(answer) > 2 * max_chars:
            continue
        question = _QUESTIONS[key[1] % len(_QUESTIONS)].format(title.rstrip(".:"))
        examples.append(f"{USER_TOKEN}\n{question}{EOS_TOKEN}\n{ASSISTANT_TOKEN}\n{answer}")
    return examples


def collect_documents(sources_dir: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """All pages under a Sphinx ``_sources`` folder as (id, text, sections), sorted by id."""
    docs = []
    for path in sorted(sources_dir.rglob("*.rst.txt")):
        doc_id = path.relative_to(sources_dir).as_posix().removesuffix(".rst.txt")
        text, sections = clean_rst(path.read_text(encoding="utf-8"))
        if len(text) >= 200:
            docs.append((doc_id, text, sections))
    return docs


def _write_jsonl_gz(path: Path, records: Iterable[dict[str, str]]) -> int:
    num_bytes = 0
    # mtime=0 so the same corpus gives byte-identical files.
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
    ):
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            num_bytes += len(record["text"].encode())
    return num_bytes


def write_corpus(
    sources_dir: Path, out_dir: Path, source_info: dict[str, str], heldout_percent: float = 3.0
) -> dict[str, object]:
    """Clean, split and write the corpus; return the metadata also saved as corpus.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = collect_documents(sources_dir)
    train = [(i, t, s) for i, t, s in docs if not is_heldout(i, heldout_percent)]
    heldout = [(i, t) for i, t, _ in docs if is_heldout(i, heldout_percent)]
    chats = [
        {"id": f"{doc_id}#chat{n}", "text": text}
        for doc_id, _, sections in train
        for n, text in enumerate(chat_examples(doc_id, sections))
    ]
    train_records = [{"id": i, "text": t} for i, t, _ in train] + chats
    meta: dict[str, object] = {
        "name": CORPUS_NAME,
        "license": CORPUS_LICENSE,
        **source_info,
        "heldout_rule": f"sha256(doc id) in lowest {heldout_percent}% (by document)",
        "num_train_docs": len(train),
        "num_train_chat_examples": len(chats),
        "num_heldout_docs": len(heldout),
        "train_bytes": _write_jsonl_gz(out_dir / "train.jsonl.gz", train_records),
        "heldout_bytes": _write_jsonl_gz(
            out_dir / "heldout.jsonl.gz", ({"id": i, "text": t} for i, t in heldout)
        ),
        "heldout_doc_ids": [i for i, _ in heldout],
    }
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_documents(corpus_dir: Path, split: str) -> list[tuple[str, str]]:
    """(id, text) of every document of one split (``train`` or ``heldout``) in file order."""
    with gzip.open(corpus_dir / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [(record["id"], record["text"]) for record in map(json.loads, f)]


def main() -> None:
    """CLI: ``python -m duoserve.training.corpus --sources DIR --out DIR [--version V]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=Path, required=True, help="Sphinx _sources folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--package", default="python3.11-doc")
    parser.add_argument("--version", default="unknown", help="Debian package version")
    parser.add_argument("--sha256", default="", help="sha256 of the .deb")
    parser.add_argument("--heldout-percent", type=float, default=3.0)
    args = parser.parse_args()
    info = {"package": args.package, "version": args.version, "deb_sha256": args.sha256}
    meta = write_corpus(args.sources, args.out, info, args.heldout_percent)
    shown = {k: v for k, v in meta.items() if k != "heldout_doc_ids"}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
