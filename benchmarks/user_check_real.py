"""A new user's check on real images: `zsbir index ./photos` then `zsbir query sketch.png`, as commands.

Copies the unseen classes' photos of a Sketchy-layout folder into a scratch folder (outside the project;
deleted afterwards), indexes it with the embedded default model, queries one real sketch of each unseen
class (the first in name order) and counts how many of the top 10 photos are of the sketch's class
(P@10; chance is 1 in the number of classes). Commands and figures go to
``benchmarks/results/user_check_real.{json,md}`` (class names and figures only, no image data).

    python benchmarks/user_check_real.py [--data ../shared/realdata/sketchy] [--expand K]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import ROOT
from train_real import REAL

RESULTS = ROOT / "benchmarks" / "results"
ZSBIR = str(Path(sys.executable).parent / "zsbir")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REAL / "sketchy")
    ap.add_argument("--expand", type=int, default=None, help="passed to zsbir query (default: the bundle's)")
    args = ap.parse_args()
    from zsbir_infer.datasets import open_benchmark

    unseen = open_benchmark(args.data).split("unseen")
    names = list(unseen.classes)
    work = Path(tempfile.mkdtemp(prefix="zsbir-usercheck-"))
    try:
        photos = work / "photos"
        for s in unseen.photos:
            dest = photos / names[s.label] / s.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s.path, dest)
        t0 = time.perf_counter()
        subprocess.run([ZSBIR, "index", str(photos), "-q"], cwd=work, check=True)
        index_s = time.perf_counter() - t0
        sketches = {}
        for s in sorted(unseen.sketches, key=lambda s: str(s.path)):
            sketches.setdefault(s.label, s.path)
        expand_args = ["--expand", str(args.expand)] if args.expand is not None else []
        cmd = [ZSBIR, "query", *[str(p) for p in sketches.values()], "--json", "-k", "10", *expand_args]
        t1 = time.perf_counter()
        out = subprocess.run(cmd, cwd=work, check=True, capture_output=True, text=True).stdout
        query_s = time.perf_counter() - t1
        # Every sketch of the split, not only the first of each class: the figure a sample of 25 only hints at.
        everyone = sorted(unseen.sketches, key=lambda s: str(s.path))
        cmd_all = [ZSBIR, "query", *[str(s.path) for s in everyone], "--json", "-k", "10", *expand_args]
        out_all = subprocess.run(cmd_all, cwd=work, check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = json.loads(out)
    rows = []
    for label, res in zip(sketches, results["queries"], strict=True):
        got = [Path(h["relpath"]).parts[0] for h in res["results"]]
        rows.append({"class": names[label], "p10": sum(g == names[label] for g in got) / 10, "top10": got})
    mean = sum(r["p10"] for r in rows) / len(rows)
    per_class: dict[str, list[float]] = {}
    for s, res in zip(everyone, json.loads(out_all)["queries"], strict=True):
        got = [Path(h["relpath"]).parts[0] for h in res["results"]]
        per_class.setdefault(names[s.label], []).append(sum(g == names[s.label] for g in got) / 10)
    all_p10 = [p for ps in per_class.values() for p in ps]
    mean_all = sum(all_p10) / len(all_p10)
    majority_all = sum(p >= 0.6 for p in all_p10)
    for r in rows:
        r["class_mean_p10"] = sum(per_class[r["class"]]) / len(per_class[r["class"]])
    summary = {"data": str(args.data), "classes": len(names), "photos": len(unseen.photos), "mean_p10": mean,
               "chance": 1 / len(names), "all_sketches": len(all_p10), "mean_p10_all": mean_all,
               "majority_right_all": majority_all, "index_seconds": round(index_s, 1),
               "query_seconds": round(query_s, 2),
               "expand": args.expand, "rows": rows, "command": " ".join(["python benchmarks/user_check_real.py",
               *(["--expand", str(args.expand)] if args.expand is not None else [])]),
               "created": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "user_check_real.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# A new user's check on real images (`zsbir index ./photos && zsbir query sketch.png`)",
        "",
        f"{len(unseen.photos)} photos of the {len(names)} unseen classes (SAKE split) indexed with the embedded "
        f"default model in {index_s:.0f} s; one real sketch per class queried in one `zsbir query` "
        f"({query_s:.1f} s, cold). Command: `{summary['command']}`.",
        "",
        f"**Mean P@10 {mean:.2f}** (chance {1 / len(names):.2f}); sketches with at least 6 of 10 right: "
        f"{sum(r['p10'] >= 0.6 for r in rows)} of {len(rows)}.",
        "",
        f"All {len(all_p10)} unseen sketches, queried the same way (one more `zsbir query`): **mean P@10 "
        f"{mean_all:.2f}**; {majority_all} of {len(all_p10)} ({majority_all / len(all_p10):.0%}) get at least "
        "6 of 10 right.",
        "",
        "| sketch class | P@10 (first sketch) | mean P@10 (all 25 sketches) |",
        "|---|---|---|",
        *(f"| {r['class']} | {r['p10']:.1f} | {r['class_mean_p10']:.2f} |" for r in rows),
    ]
    (RESULTS / "user_check_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
