"""The Arm-vs-x86 table of docs/arm64.md from the records ``make test-arm64`` appends to
``$EDGEVLM_ARM_RECORD``:

    python tests/arm64/arm_table.py benchmarks/results/arm64/arm64.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CLASS_ORDER = ("arm64-neon", "arm64-dotprod", "arm64-i8mm")
HEADER = ("| target | Arm class | mean KL | KL p99 | same top | max abs dlogit | vision cosine min | goals |\n"
          "|---|---|---|---|---|---|---|---|")


def rows(records: list[dict]) -> list[str]:
    latest = {}
    for r in records:
        latest[(r["backend"], r["precision"], r["arm_class"])] = r
    key = sorted(latest, key=lambda k: (k[0] != "ort", k[1], CLASS_ORDER.index(k[2])))
    out = []
    for k in key:
        r = latest[k]
        vis = "-" if r["vision_cosine_min"] is None else f"{r['vision_cosine_min']:.6f}"
        kinds = {m.split(" by ")[0].split(" > ")[0]: m for m in reversed(r["misses"])}  # one per kind
        goals = "met" if not r["misses"] else "**missed**: " + "; ".join(reversed(list(kinds.values())))
        out.append(f"| {r['backend']} {r['precision']} | {r['arm_class']} (`{r['qemu_cpu']}`) | {r['kl_mean']:.2g} | "
                   f"{r['kl_p99']:.2g} | {r['same_top_token']:.0%} | {r['max_abs_logit_diff']:.2g} | {vis} | {goals} |")
    return out


if __name__ == "__main__":
    recs = [json.loads(line) for p in sys.argv[1:] for line in Path(p).read_text().splitlines() if line.strip()]
    print("\n".join([HEADER, *rows(recs)]))
