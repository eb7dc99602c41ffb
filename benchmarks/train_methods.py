#!/usr/bin/env python
"""Method vs ablation table on the synthetic benchmark's UNSEEN classes.

Each method is trained twice from the same photo-pretrained weights, with the same data, seed, epochs
and batch size: once with all its losses and once with ``--ablation`` (the method-specific losses
dropped: Tursun -> classification only; DSN -> classification + SAKE distillation, i.e. SAKE).
Usage (repository root, venv active)::

    python benchmarks/train_methods.py --data build/default_model/synth
    python benchmarks/train_methods.py --data DIR --only dsn        # one method
    python benchmarks/train_methods.py --collect --work DIR         # table from finished run folders

Writes ``benchmarks/results/methods.{md,json}`` from the run folders found under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import ROOT, machine, run

RESULTS = ROOT / "benchmarks" / "results"


def row_from_run(name: str, run_dir: Path) -> dict[str, object]:
    """A table row from a finished run folder (its checkpoint.json records command, settings, metrics)."""
    ckpt = json.loads((run_dir / "checkpoint.json").read_text())
    train = ckpt["train"]
    pre_cmd = ""
    if train.get("pretrained"):
        pre = json.loads(Path(train["pretrained"]).with_suffix(".json").read_text())
        pre_cmd = pre["train"].get("command") or ""
    method, ablation = train["method"], bool(train["ablation"])
    return {
        "name": name,
        "method": method,
        "ablation": ablation,
        "losses": LOSSES[(method, ablation)],
        "epochs": train["epochs"],
        "seconds": ckpt["metrics"].get("train_seconds", 0.0),
        "command": train.get("command") or "",
        "pretrain_command": pre_cmd,
        "unseen": ckpt["metrics"]["unseen"],
        "val": ckpt["metrics"].get("val"),
        "val_classes": len(ckpt["metrics"].get("val_classes", [])),
        "train_classes": len(ckpt["class_names"]),
        "run_dir": str(run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="synthetic benchmark (zsbir data synth)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "methods")
    ap.add_argument("--only", choices=["tursun", "dsn"], default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--tursun-epochs", type=int, default=60)
    ap.add_argument("--dsn-epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrained-plain", type=Path, default=None, help="reuse a plain 'none' checkpoint")
    ap.add_argument(
        "--reuse-tursun",
        type=Path,
        default=None,
        help="take the tursun row from this finished run (e.g. the default model's, same settings); "
        "only its ablation is trained",
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="add a finished run as an extra row (e.g. a variant of a method)",
    )
    ap.add_argument("--collect", action="store_true", help="no training: build the table from WORK's run folders")
    args = ap.parse_args()

    zsbir = str(Path(sys.executable).with_name("zsbir"))
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [args.only] if args.only else ["tursun", "dsn"]
    if not args.collect:
        if args.data is None:
            ap.error("--data is required unless --collect")
        common = ["--data", str(args.data), "--size", str(args.size), "--width", str(args.width)]
        common += ["--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
        common += ["--quiet", "--device", "cpu"]
        for method in methods:
            backbone = "resnet18" if method == "tursun" else "cse_resnet18"
            pre_ckpt = args.pretrained_plain if method == "tursun" else None
            if pre_ckpt is None:
                pre = args.work / f"pretrain_{backbone}"
                cmd = [zsbir, "train", "--method", "none", "--backbone", backbone, "--out", str(pre)]
                cmd += ["--epochs", str(args.pretrain_epochs), "--val-every", str(args.pretrain_epochs), *common]
                run(cmd, args.work / f"pretrain_{backbone}.log")
                pre_ckpt = pre / "checkpoint.json"
            epochs = args.tursun_epochs if method == "tursun" else args.dsn_epochs
            for ablation in (False, True):
                if method == "tursun" and not ablation and args.reuse_tursun is not None:
                    continue
                out = args.work / (method + ("_ablation" if ablation else ""))
                cmd = [zsbir, "train", "--method", method, "--backbone", backbone, "--out", str(out)]
                cmd += ["--epochs", str(epochs), "--val-every", str(epochs), "--pretrained", str(pre_ckpt), *common]
                if ablation:
                    cmd.append("--ablation")
                run(cmd, args.work / f"{out.name}.log")
    rows: dict[str, dict[str, object]] = {}
    for name in ORDER:
        method, ablation = name.split(" ")[0], name.endswith("(ablation)")
        run_dir = args.work / (method + ("_ablation" if ablation else ""))
        if method == "tursun" and not ablation and args.reuse_tursun is not None:
            run_dir = args.reuse_tursun
            while not (run_dir / "metrics.json").exists():  # the reused run may still be finishing
                time.sleep(10)
        if (run_dir / "checkpoint.json").exists():
            rows[name] = row_from_run(name, run_dir)
    for item in args.extra:
        name, _, run_dir = item.partition("=")
        if (Path(run_dir) / "checkpoint.json").exists():
            rows[name] = row_from_run(name, Path(run_dir))
            tursun_cfg = json.loads((Path(run_dir) / "checkpoint.json").read_text())["train"]["tursun"]
            mining = tursun_cfg.get("mining", "hard")  # runs made before the option existed mined batch-hard
            if rows[name]["method"] == "tursun" and not rows[name]["ablation"]:
                rows[name]["losses"] = f"CE + domain-balanced quadruplet ({mining} mining) + knowledge preservation"
    result = {
        "what": "method vs ablation (method-specific losses dropped), synthetic benchmark, unseen classes",
        "seed": args.seed,
        "reproduce": "python benchmarks/train_methods.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [rows[k] for k in ORDER if k in rows] + [rows[k] for k in rows if k not in ORDER],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "methods.md").write_text(render_md(result))
    print((RESULTS / "methods.md").read_text())


ORDER = ["tursun", "tursun (ablation)", "dsn", "dsn (ablation)"]
LOSSES = {
    ("tursun", False): "CE + domain-balanced quadruplet + knowledge preservation",
    ("tursun", True): "CE",
    ("dsn", False): "CE + SAKE KD + cross-modal contrastive + memory bank",
    ("dsn", True): "CE + SAKE KD",
}


def render_md(r: dict[str, Any]) -> str:
    """The results page."""
    lines = [
        "# Methods vs their ablations (synthetic benchmark, unseen classes)",
        "",
        "Sketch -> photo retrieval on the 25 UNSEEN classes of the synthetic benchmark (chance mAP@all ~0.04).",
        "Each method and its ablation start from the same photo-pretrained weights (`zsbir train --method none`)",
        f"and use the same data, seed ({r['seed']}), epochs, batch size and learning-rate schedule; the ablation",
        "drops the method-specific losses. Short CPU runs: absolute numbers are low-budget, the comparison is",
        "what matters.",
        "",
        "`val` is mAP@all on seen classes held out of pre-training and training (`--val-classes`), the only",
        "figure any choice between runs may be based on; runs without it validated on the unseen classes.",
        "",
        "| run | losses | train classes | epochs | val mAP@all | mAP@all | mAP@200 | P@100 | P@200 "
        "| ITQ 64-bit mAP@all (gallery-fit / transductive) | time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        u = row["unseen"]
        itq = ""
        if "itq" in u:
            itq = f"{u['itq']['map_all']:.4f} / {u['itq_transductive']['map_all']:.4f}"
        val = f"{row['val']['map_all']:.4f}" if row.get("val") else ""
        lines.append(
            f"| {row['name']} | {row['losses']} | {row.get('train_classes', '')} | {row['epochs']} | {val} | "
            f"{u['map_all']:.4f} | {u['map_200']:.4f} | {u['p_100']:.4f} | {u['p_200']:.4f} | {itq} "
            f"| {row['seconds'] / 60:.1f} min |"
        )
    m = r["machine"]
    lines += [
        "",
        f"Reproduce: `{r['reproduce']}`. Machine: {m['cpu']}, {m['cpu_count']} cores, no GPU, torch {m['torch']}.",
        "",
        "Commands:",
        "",
    ]
    for row in r["rows"]:
        lines.append(f"- {row['name']}: `{row['command']}` (pre-training: `{row['pretrain_command']}`)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
