#!/usr/bin/env python
"""Build the embedded synthetic-shapes model (``zsbir_infer/assets/synthetic``, used by ``zsbir demo``).

Synthetic set -> photo pre-training -> Tursun et al. training.

One reproducible command (run from the repository root, in the project's virtual environment)::

    python benchmarks/train_default.py            # about 20 min on a 2-core CPU
    python benchmarks/train_default.py --no-install --work /tmp/zsbir-default   # try without touching assets

Steps (each a ``zsbir`` command, recorded verbatim in the results):

1. ``zsbir data synth WORK/synth`` (the default synthetic benchmark, seed 0);
2. ``zsbir train --method none`` on the seen PHOTOS (the stand-in for ImageNet pre-training);
3. ``zsbir train --method tursun --pretrained <step 2>`` on the seen sketches and photos;
4. copies the checkpoint to ``zsbir_infer/assets/synthetic/checkpoint.{safetensors,json}`` and writes
   ``benchmarks/results/default_model.{md,json}`` (commands, wall times, machine, unseen metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from hardware import cpu_model  # noqa: E402


def machine() -> dict[str, object]:
    """Hardware/software facts recorded with every result."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (a zsbir command line), tee its output to ``log``, return the wall time."""
    print("$", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if not line.startswith("epoch ") or "mAP@all" in line:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "default_model", help="scratch folder")
    ap.add_argument("--data", type=Path, default=None, help="existing synthetic set (default: WORK/synth)")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-final", type=float, default=0.1, help="LR decays exponentially to lr * lr-final")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument(
        "--val-classes",
        type=int,
        default=15,
        help="seen classes held out (from pre-training and training) for validation; unseen is evaluated once",
    )
    ap.add_argument(
        "--ablation", action="store_true", help="train without the Tursun-specific losses (classification only)"
    )
    ap.add_argument("--no-install", action="store_true", help="do not copy into zsbir_infer/assets/synthetic")
    ap.add_argument(
        "--from-runs",
        nargs=2,
        type=Path,
        metavar=("PRETRAIN_DIR", "TRAIN_DIR"),
        help="do not train: collect two finished `zsbir train` runs (their recorded commands and train_seconds)",
    )
    args = ap.parse_args()

    zsbir = str(Path(sys.executable).with_name("zsbir"))
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or work / "synth"
    facts = machine()
    t0 = time.perf_counter()
    steps: list[dict[str, object]] = []

    if args.from_runs:
        pre, final = args.from_runs
        for step, run_dir in (("pretrain", pre), ("train", final)):
            cfg = json.loads((run_dir / "checkpoint.json").read_text())
            seconds = float(json.loads((run_dir / "metrics.json").read_text())["train_seconds"])
            steps.append({"step": step, "command": cfg["train"]["command"], "seconds": seconds})
        facts["note"] = "collected from finished runs (--from-runs); machine facts are those of the collecting run"
    elif args.data is None:
        cmd = [zsbir, "data", "synth", str(data), "--seed", "0", "--quiet"]
        steps.append(
            {"step": "data", "command": shlex.join(["zsbir", *cmd[1:]]), "seconds": run(cmd, work / "data.log")}
        )
    if not args.from_runs:
        train_steps(args, zsbir, data, work, steps)
        final = work / "tursun"
    total = sum(float(str(s["seconds"])) for s in steps) if args.from_runs else time.perf_counter() - t0
    finish(args, final, steps, total, facts)


def train_steps(args: argparse.Namespace, zsbir: str, data: Path, work: Path, steps: list[dict[str, object]]) -> None:
    """Pre-train, then train with Tursun et al.'s losses, into WORK/pretrain and WORK/tursun."""
    common = ["--data", str(data), "--size", str(args.size), "--width", str(args.width), "--lr", str(args.lr)]
    common += ["--seed", str(args.seed), "--threads", str(args.threads), "--quiet", "--device", "cpu"]
    common += ["--val-classes", str(args.val_classes)]
    pre = work / "pretrain"
    cmd = [zsbir, "train", "--method", "none", "--out", str(pre), "--epochs", str(args.pretrain_epochs)]
    cmd += [*common, "--val-every", str(args.pretrain_epochs)]
    steps.append(
        {"step": "pretrain", "command": shlex.join(["zsbir", *cmd[1:]]), "seconds": run(cmd, work / "pre.log")}
    )
    final = work / "tursun"
    cmd = [zsbir, "train", "--method", "tursun", "--out", str(final), "--epochs", str(args.epochs)]
    cmd += [*common, "--pretrained", str(pre / "checkpoint.json"), "--val-every", str(args.val_every)]
    cmd += ["--lr-final", str(args.lr_final)] + (["--ablation"] if args.ablation else [])
    seconds = run(cmd, work / "train.log")
    steps.append({"step": "train", "command": shlex.join(["zsbir", *cmd[1:]]), "seconds": seconds})


def _reproduce_argv() -> list[str]:
    """This command's arguments without ``--from-runs A B`` (the equivalent training command)."""
    argv, out = sys.argv[1:], []
    skip = 0
    for a in argv:
        if skip:
            skip -= 1
        elif a == "--from-runs":
            skip = 2
        else:
            out.append(a)
    return out


def finish(
    args: argparse.Namespace, final: Path, steps: list[dict[str, object]], total: float, facts: dict[str, object]
) -> None:
    """Install the checkpoint (unless --no-install) and write benchmarks/results/default_model.{md,json}."""
    ckpt = json.loads((final / "checkpoint.json").read_text())
    unseen = ckpt["metrics"]["unseen"]
    val = ckpt["metrics"].get("val")
    facts["load_average_at_end"] = os.getloadavg()
    result = {
        "what": "embedded synthetic-shapes model (zsbir_infer/assets/synthetic/checkpoint.*)",
        "method": "tursun (ablation: classification loss only)" if args.ablation else "tursun",
        "arch": ckpt["arch"],
        "input_size": args.size,
        "reproduce": "python benchmarks/train_default.py " + " ".join(shlex.quote(a) for a in _reproduce_argv()),
        "steps": steps,
        "wall_seconds_total": round(total, 1),
        "machine": facts,
        "unseen": unseen,
        "val": val,
        "val_classes": ckpt["metrics"].get("val_classes", []),
        "chance_map_all_approx": round(1.0 / int(ckpt["train"]["benchmark"]["unseen"]), 4),
        "history": [json.loads(line) for line in (final / "log.jsonl").read_text().splitlines()],
    }
    if not args.no_install:
        dest = ROOT / "zsbir_infer" / "assets" / "synthetic"
        dest.mkdir(parents=True, exist_ok=True)
        for ext in (".safetensors", ".json"):
            shutil.copyfile(final / f"checkpoint{ext}", dest / f"checkpoint{ext}")
        result["installed"] = str(dest.relative_to(ROOT))
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "default_model.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "default_model.md").write_text(render_md(result))
    print(f"total {total / 60:.1f} min; unseen mAP@all {unseen['map_all']:.4f}")


def render_md(r: dict[str, Any]) -> str:
    """The human-readable results page."""
    u = r["unseen"]
    m = r["machine"]
    v = r.get("val") or {}
    n_val = len(r.get("val_classes") or [])
    lines = [
        "# Embedded default model",
        "",
        "Trained on the seen classes of the default synthetic benchmark (`zsbir data synth`, seed 0: 100 seen",
        "+ 25 unseen classes, 40 photos + 20 sketches per class, 128 px), evaluated sketch -> photo on the",
        "25 UNSEEN classes (zero-shot). Chance mAP@all is about 0.04.",
        "",
        f"{n_val} of the seen classes are held out of pre-training and training and serve as the validation set "
        "that picked the recipe (see `recipe_selection.md`); the unseen classes are evaluated once, after training, "
        "and no choice was made on them.",
        "",
        f"Reproduce: `{r['reproduce']}` (from the repository root, venv active).",
        "",
        "| metric | unseen classes (test) | held-out seen classes (validation) |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {u[key]:.4f} | {v[key]:.4f} |" if key in v else f"| {name} | {u[key]:.4f} | |"
            for name, key in (("mAP@all", "map_all"), ("mAP@200", "map_200"), ("P@100", "p_100"), ("P@200", "p_200"))
        ),
        "",
        f"Model: {r['arch']['backbone']} width {r['arch']['width']}, {r['arch']['embed_dim']}-d embedding, "
        f"{r['input_size']} px input, method {r['method']}.",
        "",
        "| step | command | wall time |",
        "| --- | --- | --- |",
    ]
    for s in r["steps"]:
        lines.append(f"| {s['step']} | `{s['command']}` | {s['seconds'] / 60:.1f} min |")
    lines += [
        f"| total | | {r['wall_seconds_total'] / 60:.1f} min |",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, no GPU, torch {m['torch']}, Python {m['python']}. "
        f"The machine was shared with other jobs: load average {m['load_average_at_start'][0]:.1f} at the start "
        f"and {m['load_average_at_end'][0]:.1f} at the end, so wall times are pessimistic.",
        *([f"({m['note']}.)"] if m.get("note") else []),
        "",
        "Validation history (held-out seen-class mAP@all by epoch):",
        "",
        "| epoch | loss | validation mAP@all |",
        "| --- | --- | --- |",
    ]
    for h in r["history"]:
        val = h.get("val", h.get("unseen", {})).get("map_all")
        lines.append(f"| {h['epoch']} | {h['loss']:.4f} | {'' if val is None else f'{val:.4f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
