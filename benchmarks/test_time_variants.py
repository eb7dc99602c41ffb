"""Test-time variants of the deployed default model, scored on the 15 held-out seen classes only.

The question this answers: can anything at search time (no retraining) lift the share of right photos in
the first ten (P@10, what a user sees), or only mAP? Every variant uses the embedded default bundle as
shipped (its input size, flip averaging in the graph) through :class:`zsbir_infer.encoder.Encoder`, on the
held-out seen classes of ``benchmarks/train_real.py`` (``hold_out_classes(seen, 15, seed 0)``). The unseen
classes are not read: a variant is adopted only if it wins on val and suits the gallery, and only then evaluated
on the unseen split once.

Variants:

* query expansion ``k`` (what the bundle ships: ``retrieval.expand``; ``zsbir_infer.expansion``);
* domain centering: subtract the mean sketch and mean photo embedding of the training classes from
  queries and photos before normalizing (a fixed per-domain offset that could live in the graph);
* database-side augmentation (DBA): every photo replaced by the similarity-weighted mean of its ``k``
  nearest photos (itself included); needs a photo-photo neighbour graph of the whole gallery at index time.

    python benchmarks/test_time_variants.py        # writes benchmarks/results/test_time_variants.{json,md}

Embedding the 2,500 training-class and 750 held-out images takes about 1.5 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_real import REAL, SEED, VAL_CLASSES

from zsbir_infer.encoder import l2_normalize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def precision_at(q: np.ndarray, g: np.ndarray, ql: np.ndarray, gl: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's ``k`` most similar photos that are of its class."""
    top = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]
    return float((gl[top] == ql[:, None]).mean())


def dba(g: np.ndarray, k: int) -> np.ndarray:
    """Database-side augmentation: each row becomes the similarity-weighted mean of its ``k`` nearest rows."""
    s = g @ g.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.clip(np.take_along_axis(s, idx, axis=1), 0.0, None)
    return l2_normalize(np.einsum("nk,nkd->nd", w, g[idx]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REAL / "sketchy")
    ap.add_argument("--bundle", type=Path, default=ROOT / "zsbir_infer" / "assets" / "default")
    ap.add_argument("--out", type=Path, default=RESULTS / "test_time_variants")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no real-data folder (see ../shared/realdata/README.md)")
    ckpt = args.bundle / "checkpoint.json"  # the embedded default keeps its checkpoint beside the bundle
    if ckpt.is_file() and not json.loads(ckpt.read_text()).get("train", {}).get("val_classes"):
        raise SystemExit(
            f"{args.bundle}: its model trained on every seen class (a final fit), so the held-out classes say "
            "nothing about it; pass --bundle a bundle of the run it was validated as (zsbir export --checkpoint)"
        )
    from zsbir_export.train import hold_out_classes

    from zsbir_infer.datasets import open_benchmark
    from zsbir_infer.encoder import Encoder
    from zsbir_infer.expansion import expand_against, recommended_expand
    from zsbir_infer.metrics import evaluate

    bench = open_benchmark(args.data)
    train, val = hold_out_classes(bench.split("seen"), VAL_CLASSES, SEED)
    enc = Encoder.open(args.bundle)
    ship_k = recommended_expand(enc.bundle.manifest)
    t0 = time.perf_counter()
    vq = enc.embed([s.path for s in val.sketches], "sketch")
    vg = enc.embed([s.path for s in val.photos], "photo")
    tq = enc.embed([s.path for s in train.sketches], "sketch")
    tg = enc.embed([s.path for s in train.photos], "photo")
    embed_s = time.perf_counter() - t0
    ql = np.array([s.label for s in val.sketches])
    gl = np.array([s.label for s in val.photos])

    rows: list[dict[str, Any]] = []

    def score(name: str, q: np.ndarray, g: np.ndarray) -> None:
        for k in sorted({0, ship_k}):
            qe = expand_against(q, g, k)
            m = evaluate(qe, ql, g, gl)
            rows.append({"variant": name, "expand": k, "map_all": round(float(m["map_all"]), 4),
                         "p_10": round(precision_at(qe, g, ql, gl), 4)})  # fmt: skip
            r = rows[-1]
            print(f"{name:34s} expand {k:2d}: mAP@all {r['map_all']:.4f}  P@10 {r['p_10']:.3f}", flush=True)

    score("as shipped", vq, vg)
    score("domain centering (training means)", l2_normalize(vq - tq.mean(0)), l2_normalize(vg - tg.mean(0)))
    for k in (2, 5, 8):
        score(f"DBA k={k}", vq, dba(vg, k))

    base = {r["expand"]: r for r in rows if r["variant"] == "as shipped"}
    result = {
        "bundle": str(args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle),
        "fingerprint": enc.bundle.fingerprint,
        "val_classes": VAL_CLASSES, "seed": SEED, "val_sketches": len(ql), "val_photos": len(gl),
        "rows": rows, "embed_seconds": round(embed_s, 1),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "os": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "command": "python benchmarks/test_time_variants.py", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Test-time variants of the default model (held-out seen classes only)",
        "",
        f"Bundle `{result['bundle']}` (fingerprint {result['fingerprint']}), as shipped: "
        f"{enc.bundle.preprocess_spec('photo').size[0]} px, flip averaging, query expansion k = {ship_k}. "
        f"Scored on the {VAL_CLASSES} held-out seen classes (seed {SEED}; {len(ql)} sketches against {len(gl)} "
        "photos); the unseen classes were not read. Command: `python benchmarks/test_time_variants.py`; "
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| variant | expansion k | val mAP@all | change | val P@10 | change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base[r["expand"]]
        lines.append(f"| {r['variant']} | {r['expand']} | {r['map_all']:.4f} | {r['map_all'] - b['map_all']:+.4f} "
                     f"| {r['p_10']:.3f} | {r['p_10'] - b['p_10']:+.3f} |")  # fmt: skip
    gains = [(r["map_all"] - base[r["expand"]]["map_all"], r["p_10"] - base[r["expand"]]["p_10"], r) for r in rows]
    best_map, best_p10 = max(gains, key=lambda x: x[0]), max(gains, key=lambda x: x[1])
    centering = max(g[0] for g in gains if g[2]["variant"].startswith("domain centering"))
    lines += [
        "",
        f"Largest mAP gain over the shipped setting with the same expansion: {best_map[0]:+.4f} "
        f"({best_map[2]['variant']}, k = {best_map[2]['expand']}); largest P@10 gain: {best_p10[1]:+.3f} "
        f"({best_p10[2]['variant']}, k = {best_p10[2]['expand']}). What the user sees first, P@10, hardly moves "
        "with any of them: the first-round sketch-to-photo ranking is the model's.",
        "",
        f"Not adopted. Domain centering gains at most {centering:+.4f} mAP. DBA, the one variant with a clear "
        "mAP gain, makes each stored photo vector depend on its neighbours in the collection: adding or deleting "
        "one photo would change the vectors of others, while a zsbir gallery stores each photo's vector as a "
        "function of that photo and the model alone (append-only segments, incremental and resumable indexing, "
        "shards that merge exactly), and the neighbour graph of a billion-photo collection is a job of its own. "
        f"For {best_p10[1]:+.3f} in the first ten results that trade is not worth it; the unseen split was "
        "therefore not scored with any of these variants.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
