#!/usr/bin/env python
"""Table of candidate training recipes for the embedded default model, selected on VALIDATION classes.

Every candidate is a finished ``zsbir train --val-classes N`` run: N seen classes were held out of its
pre-training and training, and its final validation mAP@all on them is the selection signal. The
unseen (zero-shot test) classes are evaluated once at the end of each run; they are listed for the
record but the rule below never reads them. Usage (repository root, venv active)::

    python benchmarks/recipe_selection.py --run "A: 60 epochs=/tmp/s3/A" --run "D: 120 epochs=/tmp/s3/D"

Rule: the highest final validation mAP@all among candidates whose pre-training + training wall time
fits the 30-minute budget of the default model. Writes ``benchmarks/results/recipe_selection.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import ROOT, machine

RESULTS = ROOT / "benchmarks" / "results"
BUDGET_SECONDS = 30 * 60


def candidate(name: str, run_dir: Path) -> dict[str, Any]:
    """One row: commands, wall times and metrics recorded by a finished run (and its pre-training run)."""
    ckpt = json.loads((run_dir / "checkpoint.json").read_text())
    train = ckpt["train"]
    metrics = ckpt["metrics"]
    if "val" not in metrics:
        raise SystemExit(f"{run_dir}: not a --val-classes run (no validation metrics); it cannot be a candidate")
    pre_seconds, pre_cmd = 0.0, ""
    if train.get("pretrained"):
        pre_json = Path(train["pretrained"]).with_suffix(".json")
        pre = json.loads(pre_json.read_text())
        pre_cmd = pre["train"].get("command") or ""
        pre_seconds = float(pre["metrics"].get("train_seconds", 0.0))
    val, unseen = reevaluate(run_dir / "checkpoint.safetensors", train)
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    seconds = float(metrics.get("train_seconds", 0.0))
    return {
        "name": name,
        "run_dir": str(run_dir),
        "command": train.get("command") or "",
        "pretrain_command": pre_cmd,
        "epochs": train["epochs"],
        "seconds": seconds,
        "pretrain_seconds": pre_seconds,
        "total_seconds": seconds + pre_seconds,
        "val_classes": metrics.get("val_classes", []),
        "val": val,
        "unseen": unseen,
        "val_recorded": metrics["val"],
        "unseen_recorded": metrics["unseen"],
        "val_history": [(h["epoch"], h["val"]["map_all"]) for h in history if "val" in h],
    }


def reevaluate(checkpoint: Path, train: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validation and unseen metrics of a checkpoint recomputed with this checkout's evaluation code, so that
    runs trained at different commits are measured the same way."""
    import torch
    from zsbir_export.checkpoints import load_checkpoint
    from zsbir_export.train import evaluate_split, hold_out_classes
    from zsbir_export.train.data import ImageCache

    from zsbir_infer.datasets import open_benchmark

    loaded = load_checkpoint(checkpoint)
    bench = open_benchmark(train["data"])
    _, val_split = hold_out_classes(bench.split("seen"), int(train["val_classes"]), int(train["seed"]))
    spec = loaded.config["preprocess"]["photo"]
    cache, device = ImageCache(), torch.device("cpu")
    model = loaded.model.eval()
    val = evaluate_split(model, val_split, spec, device, cache)
    unseen = evaluate_split(model, bench.split("unseen"), spec, device, cache)
    return val, unseen


def select(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rule of the module docstring (reads only validation metrics and wall times)."""
    fits = [r for r in rows if r["total_seconds"] <= BUDGET_SECONDS]
    return max(fits, key=lambda r: r["val"]["map_all"]) if fits else None


def render_md(result: dict[str, Any]) -> str:
    """The readable table."""
    rows, chosen = result["candidates"], result["selected"]
    lines = [
        "# Recipe selection for the embedded default model (held-out seen-class validation)",
        "",
        f"Each candidate held out the same {len(rows[0]['val_classes'])} seen classes (chosen by `--seed 0`) from "
        "pre-training and training. Selection rule: highest final **validation** mAP@all among candidates whose "
        "pre-training + training time fits the 30-minute budget. Unseen-class figures are shown for the record "
        "only; the rule does not read them. All metrics are recomputed from the saved checkpoints with the "
        "evaluation code of this checkout (the `.json` also keeps the figures each run recorded itself).",
        "",
        "| candidate | epochs | val mAP@all | val mAP@200 | val P@100 | unseen mAP@all (not used) "
        "| pre-train + train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mark = " **(selected)**" if chosen == r["name"] else ""
        v, u = r["val"], r["unseen"]
        lines.append(
            f"| {r['name']}{mark} | {r['epochs']} | {v['map_all']:.4f} | {v['map_200']:.4f} | {v['p_100']:.4f} "
            f"| {u['map_all']:.4f} | {r['pretrain_seconds'] / 60:.1f} + {r['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Validation mAP@all during training:", ""]
    for r in rows:
        hist = ", ".join(f"{e}: {m:.3f}" for e, m in r["val_history"])
        lines.append(f"- {r['name']}: {hist}")
    lines += ["", "Commands:", ""]
    for r in rows:
        lines.append(f"- {r['name']}: `{r['command']}` (pre-training: `{r['pretrain_command']}`)")
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}. Runs shared the machine with each other "
        "and with other jobs, so wall times are pessimistic. Held-out classes: " + ", ".join(rows[0]["val_classes"]),
    ]
    if result.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR", help="a finished run")
    ap.add_argument("--note", action="append", default=[], help="a sentence for the Notes section (repeatable)")
    args = ap.parse_args()
    rows = []
    for spec in args.run:
        name, sep, path = spec.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"--run expects NAME=RUN_DIR, got {spec!r}")
        rows.append(candidate(name, Path(path)))
    held = {tuple(r["val_classes"]) for r in rows}
    if len(held) != 1:
        raise SystemExit("the candidates held out different validation classes; they cannot be compared")
    chosen = select(rows)
    result = {
        "candidates": rows,
        "selected": chosen["name"] if chosen else None,
        "notes": list(args.note),
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipe_selection.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "recipe_selection.md").write_text(render_md(result))
    print(render_md(result))


if __name__ == "__main__":
    main()
