"""Choose a trained run's deployment settings on held-out seen classes, then report the choice on unseen.

Three settings that need no training: the input size at test time (a model trained on random crops at
128 px often does better a little larger), test-time flip averaging (``flip_average``: each image and its
mirror, inside the exported graph) and query expansion (``zsbir_infer.expansion``: k best photos).
Every combination is scored on the run's 15 held-out seen classes (mAP@all); the best one is then
evaluated once on the unseen classes, beside the plain setting. ``--write-checkpoint DIR`` saves the run's
checkpoint with the chosen settings (preprocess size, arch ``flip_average``, ``retrieval.expand``).

    python benchmarks/select_deploy.py --run runs/real/tursun_doodles_flat
    python benchmarks/select_deploy.py --run runs/real/tursun_doodles_flat --write-checkpoint zsbir_infer/assets/default

A final fit (the chosen recipe retrained on every seen class, nothing held out) has nothing to choose on:
``--settings-from`` applies the setting chosen for its validated run unchanged and only reports unseen.

    python benchmarks/select_deploy.py --run runs/real/tursun_doodles_224_all \\
        --settings-from benchmarks/results/deploy_selection.json --write-checkpoint zsbir_infer/assets/default

Results: ``benchmarks/results/deploy_selection.{json,md}`` (final fit: ``deploy_final_fit.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import ROOT, machine
from train_real import REAL, SEED, VAL_CLASSES

RESULTS = ROOT / "benchmarks" / "results"
# Test-time sizes tried: the training size and one 32 px step either side (128/160/192 for a 160 px run).
SIZE_STEPS = (-32, 0, 32)
EXPANDS = (0, 5, 10, 15, 20, 25)


def _embeddings(model: Any, split: Any, size: int) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """(queries, gallery) embeddings without and with flip averaging, at ``size`` px."""
    import torch
    from zsbir_export.train.data import make_spec
    from zsbir_export.train.loop import _embed_samples

    spec, dev, out = make_spec(size), torch.device("cpu"), {}
    for flip in (False, True):
        model.flip_average = flip
        q = _embed_samples(model, split.sketches, 0, spec, dev, None)
        g = _embed_samples(model, split.photos, 1, spec, dev, None)
        out[flip] = (q, g)
    model.flip_average = False
    return out


def _score(q: np.ndarray, g: np.ndarray, split: Any, expand: int) -> dict[str, float]:
    from zsbir_infer.expansion import expand_against
    from zsbir_infer.metrics import evaluate

    ql = np.array([s.label for s in split.sketches])
    gl = np.array([s.label for s in split.photos])
    return {k: float(v) for k, v in evaluate(expand_against(q, g, expand), ql, g, gl).items()}


def grid(model: Any, split: Any, train_size: int) -> list[dict[str, Any]]:
    """mAP@all of every (size, flip, expand) setting on ``split``, sizes around ``train_size``."""
    rows = []
    for size in (train_size + step for step in SIZE_STEPS):
        emb = _embeddings(model, split, size)
        for flip, (q, g) in emb.items():
            for expand in EXPANDS:
                m = _score(q, g, split, expand)
                rows.append({"size": size, "flip": flip, "expand": expand, **m})
                print(f"size {size} flip {flip!s:5} expand {expand:2}: mAP@all {m['map_all']:.4f}", flush=True)
    return rows


def _write_checkpoint(model: Any, config: dict[str, Any], setting: dict[str, Any], chosen_on: str, dest: Path) -> None:
    """Save ``model`` with ``setting`` (size, flip, expand) as its deployment settings under ``dest``."""
    from zsbir_export.checkpoints import save_checkpoint
    from zsbir_export.train.data import make_spec

    cfg = dict(config)
    spec = make_spec(setting["size"])
    cfg["preprocess"] = {"photo": dict(spec), "sketch": dict(spec)}
    cfg["retrieval"] = {"expand": setting["expand"], "chosen_on": chosen_on}
    model.flip_average = bool(setting["flip"])
    cfg.pop("arch", None)
    save_checkpoint(model, cfg, dest / "checkpoint.json")
    print(f"wrote {dest / 'checkpoint.json'} with the chosen settings")


def _unseen(model: Any, unseen: Any, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each named setting with its unseen-class metrics added (reported, never used to choose)."""
    out: dict[str, Any] = {}
    by_size: dict[int, dict[bool, tuple[np.ndarray, np.ndarray]]] = {}  # both flips, embedded once per size
    for name, r in settings.items():
        if r["size"] not in by_size:
            by_size[r["size"]] = _embeddings(model, unseen, r["size"])
        q, g = by_size[r["size"]][r["flip"]]
        out[name] = {**r, "unseen": _score(q, g, unseen, r["expand"])}
        print(f"{name}: {out[name]}", flush=True)
    return out


def final_fit(args: argparse.Namespace, loaded: Any, bench: Any) -> None:
    """Apply the settings chosen for a validated run (``--settings-from``) to its final fit (``--run``).

    A final fit trains the chosen recipe on every seen class, so it has no held-out classes to choose
    on: it takes the validated run's setting unchanged, and its unseen figures are only reported.
    """
    sel = json.loads(args.settings_from.read_text())
    chosen = {k: sel["chosen"][k] for k in ("size", "flip", "expand")}
    train = loaded.config["train"]
    if int(train.get("val_classes") or 0):
        raise SystemExit(f"{args.run} held out {train['val_classes']} classes: choose its settings on them instead")
    plain = {"size": int(train["size"]), "flip": False, "expand": 0}
    t0 = time.perf_counter()
    rows = _unseen(loaded.model.eval(), bench.split("unseen"), {"plain": plain, "chosen": chosen})
    result = {"run": _rel(args.run), "settings_from": _rel(args.settings_from), "validated_run": sel["run"],
              "machine": machine(), **rows, "validated_run_unseen": {n: sel[n]["unseen"] for n in ("plain", "chosen")},
              "seconds": round(time.perf_counter() - t0, 1),
              "command": f"python benchmarks/select_deploy.py --run {args.run} --settings-from {args.settings_from}",
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (RESULTS / "deploy_final_fit.json").write_text(json.dumps(result, indent=2) + "\n")
    v = result["validated_run_unseen"]
    lines = [
        "# Final fit: the chosen recipe on every seen class",
        "",
        f"Run `{result['run']}` trains the validated run's recipe (`{sel['run']}`) unchanged on all the seen "
        "classes, nothing held out. Nothing is chosen from it: it keeps its last epoch and takes the deployment "
        f"setting chosen on the validated run's held-out classes (`{result['settings_from']}`), and it was to "
        "replace the validated run whatever its unseen figures (decided before it was trained). Command: `"
        + result["command"]
        + f"`. Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} cores, "
        f"torch {result['machine']['torch']}.",
        "",
        "| model | setting | size | flip | expand | unseen mAP@all | unseen mAP@200 | unseen P@100 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {n} | {rows[n]['size']} | {'yes' if rows[n]['flip'] else 'no'} | {rows[n]['expand']} | "
            f"{u['map_all']:.4f} | {u['map_200']:.4f} | {u['p_100']:.4f} |"
            for label, metrics in (("final fit", {n: r["unseen"] for n, r in rows.items()}), ("validated run", v))
            for n, u in metrics.items()
        ),
    ]
    (RESULTS / "deploy_final_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_checkpoint is not None:
        on = f"{sel['val_classes']} held-out seen classes of {sel['run']} (its final fit on all seen classes)"
        _write_checkpoint(loaded.model, loaded.config, chosen, on, args.write_checkpoint)


def _rel(path: Path) -> str:
    p = path.resolve()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished zsbir train run folder")
    ap.add_argument("--data", type=Path, default=REAL / "sketchy")
    ap.add_argument("--write-checkpoint", type=Path, default=None, metavar="DIR")
    ap.add_argument(
        "--settings-from", type=Path, default=None, metavar="JSON",
        help="deploy_selection.json of a validated run: apply its chosen setting to --run, that recipe's final fit",
    )  # fmt: skip
    args = ap.parse_args()
    import torch
    from zsbir_export.checkpoints import load_checkpoint
    from zsbir_export.train import hold_out_classes

    from zsbir_infer.datasets import open_benchmark

    torch.set_num_threads(2)
    loaded = load_checkpoint(args.run / "checkpoint.json")
    model = loaded.model.eval()
    if not hasattr(model, "flip_average"):
        raise SystemExit(f"{args.run}: flip averaging needs an EmbeddingNet model")
    zeroshot = loaded.config["train"].get("zeroshot")
    bench = open_benchmark(args.data, zeroshot=zeroshot)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.settings_from is not None:
        final_fit(args, loaded, bench)
        return
    val = hold_out_classes(bench.split("seen"), VAL_CLASSES, SEED)[1]
    t0 = time.perf_counter()
    rows = grid(model, val, int(loaded.config["train"]["size"]))
    best = max(rows, key=lambda r: r["map_all"])
    plain = next(r for r in rows if r["size"] == loaded.config["train"]["size"] and not r["flip"] and not r["expand"])
    picked = {n: {"size": r["size"], "flip": r["flip"], "expand": r["expand"], "val": r["map_all"]}
              for n, r in (("plain", plain), ("chosen", best))}  # fmt: skip
    chosen = _unseen(model, bench.split("unseen"), picked)
    result = {"run": _rel(args.run), "machine": machine(), "val_classes": VAL_CLASSES, "seed": SEED,
              "grid_val": rows, **chosen, "seconds": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/select_deploy.py --run " + str(args.run),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    (RESULTS / "deploy_selection.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Deployment settings chosen on held-out seen classes",
        "",
        f"Run `{result['run']}`; grid of test-time input size x flip averaging x query expansion k, scored by "
        f"mAP@all on its {VAL_CLASSES} held-out seen classes (seed {SEED}); the best setting is then evaluated "
        "once on the unseen classes beside the plain one. Command: `" + result["command"] + "`. Machine: "
        f"{result['machine']['cpu']}, {result['machine']['cpu_count']} cores, torch {result['machine']['torch']}.",
        "",
        "| size | flip | expand | val mAP@all | val mAP@200 |",
        "|---|---|---|---|---|",
        *(
            f"| {r['size']} | {'yes' if r['flip'] else 'no'} | {r['expand']} | {r['map_all']:.4f} | "
            f"{r['map_200']:.4f} |"
            for r in rows
        ),
        "",
        "| setting | size | flip | expand | val mAP@all | unseen mAP@all | unseen mAP@200 | unseen P@100 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {c['size']} | {'yes' if c['flip'] else 'no'} | {c['expand']} | {c['val']:.4f} | "
            f"{c['unseen']['map_all']:.4f} | {c['unseen']['map_200']:.4f} | {c['unseen']['p_100']:.4f} |"
            for n, c in chosen.items()
        ),
    ]
    (RESULTS / "deploy_selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_checkpoint is not None:
        _write_checkpoint(model, loaded.config, best, f"{VAL_CLASSES} held-out seen classes", args.write_checkpoint)


if __name__ == "__main__":
    main()
