"""Reading README.md and docs/ for the tests that keep them true: sections, tables, numbers, and
the stored benchmark results the tables quote."""
import json
import re

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
# the architecture, measurements, research logs and reference the README links instead of holding
MOVED = ("architecture.md", "export.md", "measurements.md", "perf-1.7b.md", "fidelity.md", "demo-model-study.md",
         "int8-portability.md", "integrator-study.md", "serving.md", "training.md", "models.md")


def section(text: str, heading: str) -> str:
    """The body of the section that starts with ``heading`` (a full heading line), to the next
    heading of the same or a higher level."""
    level = heading.split()[0]
    body = text.split("\n" + heading + "\n", 1)[1]
    stop = re.search(rf"^#{{1,{len(level)}}} ", body, flags=re.M)
    return body[: stop.start()] if stop else body


def table(text: str, header_start: str) -> list[list[str]]:
    """Rows (cells stripped) of the markdown table whose header line starts with ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def pages() -> dict:
    """README.md and every docs page, by path relative to the repo."""
    out = {"README.md": README.read_text()}
    out.update({f"docs/{p.name}": p.read_text() for p in sorted(DOCS.glob("*.md"))})
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def close(shown: str, value: float) -> bool:
    """A number as printed (rounded to its decimals, thousands commas allowed) is ``value``."""
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown.replace(",", "")) - value) <= 0.5 * 10 ** -digits + 1e-9


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks of a Markdown page."""
    blocks = text.split("```")[1::2]
    return [line.strip() for block in blocks for line in block.splitlines()[1:]]


def numbers(cell: str) -> list[str]:
    """The numbers written in a table cell (``3,051``, ``0.0018``, ``4.32`` of ``4.32x``), not digits
    inside names such as ``q4_k_m``, ``int8`` or ``i7``."""
    return [n.rstrip(",") for n in re.findall(r"(?<![A-Za-wyz_.\d])\d[\d,]*(?:\.\d+)?", cell)]


def stored(run: str) -> list[dict]:
    """The records of a committed results file (strict: a torn line fails the test)."""
    return [json.loads(line) for line in (RESULTS / run).read_text().splitlines()]


def median(records: list[dict], backend: str, precision: str, metric: str) -> float:
    rec = [r for r in records if (r.get("backend"), r.get("precision"), r.get("status")) == (backend, precision, "ok")][-1]
    return rec["metrics"][metric]["median"]
