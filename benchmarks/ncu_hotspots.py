"""Summarise an Nsight Compute source page (``ncu -i REP --page source --csv --print-source sass``): stall
reasons over the whole kernel and the SASS lines with the most warp-stall samples, with their top reasons.

    python benchmarks/ncu_hotspots.py source.csv [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    with open(args.csv, newline="") as fh:
        rows = list(csv.reader(fh))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr, data = rows[head], [r for r in rows[head + 1 :] if len(r) == len(rows[head])]
    col = {name: i for i, name in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]

    def num(r: list[str], name: str) -> int:
        v = r[col[name]].replace(",", "")
        return int(float(v)) if v not in ("", "-") else 0

    total = collections.Counter({name: sum(num(r, name) for r in data) for name in reasons})
    samples = sum(total.values()) or 1
    executed = sum(num(r, "Instructions Executed") for r in data)
    print(f"{len(data)} SASS lines, {executed:,} warp instructions executed, {samples:,} stall samples")
    print("stall reasons: " + ", ".join(f"{k[6:]} {100 * v / samples:.1f}%" for k, v in total.most_common(8) if v))
    key = "Warp Stall Sampling (All Samples)"
    ranked = sorted(range(len(data)), key=lambda i: -num(data[i], key))[: args.top]
    for i in sorted(ranked):
        r = data[i]
        top = sorted(((num(r, k), k[6:]) for k in reasons), reverse=True)[:3]
        why = " ".join(f"{n}:{v}" for v, n in top if v)
        print(f"{i:5d} {100 * num(r, key) / samples:5.1f}% x{num(r, 'Instructions Executed'):>10,} "
              f"{r[col['Source']].strip()[:58]:<58} {why}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
