"""One document model, two renderings: markdown (``report.md``) and self-contained HTML.

The report is assembled as a list of blocks (headings, paragraphs, bullet lists,
tables, figures, notes); :func:`to_markdown` and :func:`to_html` render the same
blocks, so the two files never disagree. The HTML embeds every figure as a base64
``data:`` URI and its CSS inline: it opens from disk with no network and no script.
Inline markup in text: ``**bold**`` and ```code```, nothing else.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.text.lower()).strip("-")


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Note:
    """A call-out: ``kind`` is ``warning`` (something went wrong) or ``published``."""

    text: str
    kind: str = "warning"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    align: str = ""  # one of "l"/"r" per column; default: first left, the rest right
    caption: str = ""
    kind: str = ""  # css class, e.g. "published"
    row_kinds: list[str] = field(default_factory=list)  # css class per row, e.g. "skipped"
    wide: tuple[int, ...] = ()  # columns given room in HTML (long text)

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.columns) - 1)


@dataclass
class Figure:
    path: Path
    title: str
    caption: str


Block = Heading | Para | Bullets | Note | Table | Figure


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def toc(self) -> list[Heading]:
        return [b for b in self.blocks if isinstance(b, Heading) and b.level == 2]


# --------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown; figures linked relative to ``base`` (the folder report.md is written to)."""
    out = [f"# {doc.title}", ""]
    toc = doc.toc()
    first_h2 = next((i for i, b in enumerate(doc.blocks) if isinstance(b, Heading)), None)
    for i, block in enumerate(doc.blocks):
        if i == first_h2 and toc:
            out += ["**Contents:** " + " · ".join(f"[{h.text}](#{h.anchor})" for h in toc), ""]
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Note):
            tag = "PUBLISHED — not measured here" if block.kind == "published" else "Note"
            out += [f"> **{tag}:** {block.text}", ""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            align = {"l": ":--", "r": "--:"}
            out.append("| " + " | ".join(_md_cell(c) for c in block.columns) + " |")
            out.append("|" + "|".join(align[a] for a in block.alignment()) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Figure):
            rel = Path(os.path.relpath(block.path, base)).as_posix()
            out += [f"![{block.title}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- html

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d9dce1; --zebra:#f6f7f9; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial,
       sans-serif; color: var(--fg); margin: 0; line-height: 1.45; font-size: 15px; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p, li { max-width: 960px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
       font-size: 0.88em; background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
nav.toc { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px;
          padding: 8px 16px; margin: 14px 0 8px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 2; }
a { color: var(--accent); }
.table-wrap { overflow-x: auto; margin: 6px 0 18px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); font-style: italic;
          padding: 2px 0 6px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; vertical-align: top; }
th { background: #eef0f3; font-weight: 600; vertical-align: bottom; }
td.r { text-align: right; white-space: nowrap; }
th.r { text-align: right; }
td.l, th.l { text-align: left; }
td.wide { min-width: 20em; }
tbody tr:nth-child(even) { background: var(--zebra); }
tr.skipped td, tr.unavailable td { color: var(--muted); }
tr.oom td, tr.error td { color: #a1261b; }
table.published { border: 2px solid #c9a227; }
table.published th { background: #fbf3d5; }
table.published caption { font-style: normal; font-weight: 600; color: #7a5c00; }
figure { margin: 10px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; max-width: 960px; }
.note { border-left: 4px solid #d9822b; background: #fff6ec; padding: 8px 14px;
        margin: 10px 0 16px; border-radius: 0 4px 4px 0; max-width: 960px; }
.note.published { border-left-color: #c9a227; background: #fdf8e4; }
.badge { display: inline-block; font-size: 11px; font-weight: 700; letter-spacing: .04em;
         text-transform: uppercase; padding: 1px 6px; border-radius: 3px; margin-right: 6px;
         background: #c9a227; color: #fff; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 40px; }
"""


def _inline(text: str) -> str:
    text = html.escape(str(text), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", text)
    return text


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_html(doc: Document, footer: str = "") -> str:
    """A self-contained HTML page: inline CSS, figures as data URIs, no script, no links out."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(doc.title)}</title>", f"<style>{CSS}</style>", "</head>",
             "<body>", "<main>", f"<h1>{_inline(doc.title)}</h1>"]
    toc = doc.toc()
    first_h2 = next((i for i, b in enumerate(doc.blocks) if isinstance(b, Heading)), None)
    for i, block in enumerate(doc.blocks):
        if i == first_h2 and toc:
            items = "".join(f'<li><a href="#{h.anchor}">{_inline(h.text)}</a></li>' for h in toc)
            parts.append(f'<nav class="toc"><strong>Contents</strong><ol>{items}</ol></nav>')
        parts.append(_html_block(block))
    if footer:
        parts.append(f"<footer>{_inline(footer)}</footer>")
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f'<h{block.level} id="{block.anchor}">{_inline(block.text)}</h{block.level}>'
    if isinstance(block, Para):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Note):
        badge = ('<span class="badge">published</span>' if block.kind == "published"
                 else "<strong>Note:</strong> ")
        return f'<div class="note {block.kind}">{badge}{_inline(block.text)}</div>'
    if isinstance(block, Table):
        align = block.alignment()
        classes = [a + (" wide" if i in block.wide else "") for i, a in enumerate(align)]
        head = "".join(f'<th class="{a}">{_inline(c)}</th>'
                       for c, a in zip(block.columns, classes, strict=True))
        body = []
        for n, row in enumerate(block.rows):
            kind = block.row_kinds[n] if n < len(block.row_kinds) else ""
            cells = "".join(f'<td class="{a}">{_inline(c)}</td>'
                            for c, a in zip(row, classes, strict=True))
            body.append(f'<tr class="{kind}">{cells}</tr>' if kind else f"<tr>{cells}</tr>")
        caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
        cls = f' class="{block.kind}"' if block.kind else ""
        return (f'<div class="table-wrap"><table{cls}>{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>")
    if isinstance(block, Figure):
        return (f'<figure><img src="{_data_uri(block.path)}" alt="{html.escape(block.title)}">'
                f"<figcaption><strong>{_inline(block.title)}.</strong> "
                f"{_inline(block.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {block!r}")
