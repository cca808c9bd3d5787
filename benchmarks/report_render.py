"""Report rendering: blocks -> Markdown and self-contained HTML (plots inlined), and number formatting.

A report is a list of blocks, built by ``report.py`` (benchmarks), ``report_projection.py`` (device
projections) and ``study_report.py`` (integrator studies); this module only renders them.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

Block = tuple  # ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", name, png, caption)


def med(rec: dict, metric: str) -> float | None:
    return ((rec.get("metrics") or {}).get(metric) or {}).get("median")


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def render_md(blocks: list[Block], plot_dir: str) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append("#" * int(b[0][1]) + " " + b[1])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append("| " + " | ".join(b[1]) + " |\n|" + "---|" * len(b[1]))
            out[-1] += "".join("\n| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in b[2])
        elif b[0] == "img":
            out.append(f"![{b[3]}]({plot_dir}/{b[1]}.png)")
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
       "text-align:left}th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}img{max-width:100%}"
       "h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:2em}")


def render_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            out.append(f"<figure><img alt=\"{html.escape(b[3])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(b[3])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_plots(blocks: list[Block], plot_dir: Path) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        if b[0] == "img":
            (plot_dir / f"{b[1]}.png").write_bytes(b[2])
