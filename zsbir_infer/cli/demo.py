"""``zsbir demo``: the whole pipeline end to end on synthetic zero-shot data.

The model is the embedded synthetic-shapes bundle (``zsbir_infer/assets/synthetic``, trained on the
synthetic benchmark's seen classes), unless ``--model`` names another; the embedded *default* model is
trained on real sketches and photos and is what ``index``/``query`` use on a user's photos.

1. render photos and sketches of *unseen* classes of the synthetic benchmark (classes the model never saw
   in training: the classes named in the model's training checkpoint are left out);
2. index the photos into a gallery (``zsbir index``'s pipeline);
3. query the gallery with a few sketches and print the top results (a check mark when the class is right);
4. evaluate every sketch against the gallery (mAP@all, mAP@200, P@100, P@200);
5. write a self-contained HTML page of the queries and their results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from zsbir_infer.cli.embed import BACKEND_CHOICES, PRECISION_CHOICES
from zsbir_infer.fsio import atomic_path


def _training_classes(folder: Path) -> set[str]:
    """Class names the model was trained on, from ``checkpoint.json`` beside the bundle (if present)."""
    for name in ("checkpoint.json", "config.json"):
        p = folder / name
        if p.is_file():
            try:
                names = json.loads(p.read_text(encoding="utf-8")).get("class_names") or []
            except (OSError, ValueError, AttributeError):
                return set()
            return {str(n) for n in names}
    return set()


def _demo_classes(n_classes: int, seen: set[str]) -> list[str]:
    """``n_classes`` zero-shot classes: the synthetic benchmark's unseen split, minus any training class."""
    from zsbir_infer.datasets.synth import SynthConfig, all_classes, make_classes

    _, unseen = make_classes(SynthConfig())
    names = [c.name for c in unseen if c.name not in seen]
    if len(names) < n_classes:
        names += [c.name for c in all_classes() if c.name not in seen and c.name not in names]
    return sorted(names[:n_classes])


def _render(out: Path, classes: list[str], photos: int, sketches: int, size: int) -> tuple[int, int]:
    """Render the images (skipping those already there); returns (written, kept)."""
    from concurrent.futures import ThreadPoolExecutor

    from zsbir_infer.datasets.synth import SynthConfig, render_image

    config = SynthConfig(size=size)
    tasks = [(c, "photo", i) for c in classes for i in range(photos)]
    tasks += [(c, "sketch", i) for c in classes for i in range(sketches)]

    def one(task: tuple[str, str, int]) -> bool:
        cls, domain, i = task
        folder = out / ("photos" if domain == "photo" else "sketches") / cls
        path = folder / f"{cls}_{i:04d}.{'jpg' if domain == 'photo' else 'png'}"
        if path.exists():
            return False
        folder.mkdir(parents=True, exist_ok=True)
        img = render_image(config, cls, domain, i)
        with atomic_path(path) as tmp:
            if domain == "photo":
                img.save(tmp, format="JPEG", quality=90)
            else:
                img.save(tmp, format="PNG")
        return True

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        done = list(pool.map(one, tasks))
    return sum(done), len(done) - sum(done)


@click.command(name="demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("zsbir-demo"),
    show_default=True,
    help="Folder for the images, the gallery and the results page (reused by a rerun).",
)
@click.option("--quick", is_flag=True, help="A smaller run (fewer classes and images): well under a minute.")
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle (default: the embedded synthetic-shapes model, assets/synthetic).",
)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="fp32", show_default=True)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("-k", "k", type=click.IntRange(1, 50), default=5, show_default=True, help="Results shown per query.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics and paths as JSON at the end.")
def command(out: Path, quick: bool, model: Path | None, precision: str, backend: str, k: int, as_json: bool) -> None:
    """Run the pipeline end to end on synthetic zero-shot classes and write an HTML results page."""
    import numpy as np

    from zsbir_infer.bundle import synthetic_bundle_path
    from zsbir_infer.cli.embed import open_encoder
    from zsbir_infer.gallery import Gallery, ModelMismatchError
    from zsbir_infer.indexer import IndexingError, index_folder
    from zsbir_infer.metrics import evaluate
    from zsbir_infer.report import QueryResult, write_html
    from zsbir_infer.retriever import Retriever

    n_classes, n_photos, n_sketches, n_queries = (6, 12, 4, 4) if quick else (15, 30, 10, 6)
    t0 = time.perf_counter()
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    if model is None:
        model = synthetic_bundle_path()
        say(f"model: the synthetic-shapes bundle {model} (the default model for real photos is assets/default)")
    enc = open_encoder(model, precision, backend, 32, None)
    try:
        classes = _demo_classes(n_classes, _training_classes(model))
        say(f"[1/5] rendering {n_classes} unseen classes x ({n_photos} photos + {n_sketches} sketches) in {out}/")
        written, kept = _render(out, classes, n_photos, n_sketches, 128)
        say(f"      {written} images written, {kept} already there")

        say(f"[2/5] indexing {out / 'photos'} with model {enc.fingerprint} ({enc.describe()})")
        model_name = str(model.resolve()) if model else None
        try:
            report = index_folder(out / "photos", out / "gallery", enc, model=model_name)
        except (ModelMismatchError, IndexingError) as exc:
            # The demo's own gallery from an earlier run with another model (or folder): rebuild it.
            say(f"      rebuilding {out / 'gallery'}: {str(exc).split(';')[0]}")
            shutil.rmtree(out / "gallery")
            report = index_folder(out / "photos", out / "gallery", enc, model=model_name)
        say(
            f"      {report.indexed} indexed, {report.unchanged} unchanged, {len(report.skipped)} skipped "
            f"({report.files_per_s:.0f} files/s)"
        )

        sketches = sorted((out / "sketches").glob("*/*.png"))
        sketches = [s for s in sketches if s.parent.name in classes]
        labels = [s.parent.name for s in sketches]
        retr = Retriever.open(out / "gallery", enc)
        try:
            picks = [next(s for s in sketches if s.parent.name == c) for c in classes[:n_queries]]
            say(f"[3/5] querying with {len(picks)} sketches (top {k}; + = same class as the sketch)")
            results = retr.search([str(p) for p in picks], k=k)
            page_items = []
            for p, hits in zip(picks, results, strict=True):
                say(f"  {p.relative_to(out)}")
                marked: list[Any] = []
                for h in hits:
                    ok = h.relpath.split("/", 1)[0] == p.parent.name
                    say(f"    {'+' if ok else ' '} {h.rank}. {h.score:.3f}  {h.relpath}")
                    marked.append(_Marked(h.path, h.relpath, h.score, h.rank, ok))
                page_items.append(QueryResult(str(p.relative_to(out)), p, marked))

            say(f"[4/5] evaluating {len(sketches)} sketches against {len(retr)} photos")
            q = retr.embed([str(s) for s in sketches])
        finally:
            retr.close()
        with Gallery.open(out / "gallery") as g:
            rows = g.indexed()
            gal = g.vectors([i for _, i in rows])
        gal_labels = [rel.split("/", 1)[0] for rel, _ in rows]
        metrics = evaluate(q, np.array(labels), gal, np.array(gal_labels))
        say(
            "      "
            + ", ".join(
                f"{name} {metrics[key]:.3f}"
                for key, name in (
                    ("map_all", "mAP@all"),
                    ("map_200", "mAP@200"),
                    ("p_100", "P@100"),
                    ("p_200", "P@200"),
                )
            )
        )
        say(f"      (chance level: mAP about {1 / n_classes:.3f})")
        page = write_html(
            out / "results.html",
            page_items,
            title="zsbir demo: zero-shot sketch-based retrieval",
            subtitle=(
                f"{n_classes} unseen classes, {len(rows)} photos, model {enc.fingerprint}; "
                f"mAP@all {metrics['map_all']:.3f}"
            ),
        )
    finally:
        enc.close()
    seconds = time.perf_counter() - t0
    say(f"[5/5] results page: {page.resolve()}  (open it in a browser; total {seconds:.1f} s)")
    if as_json:
        doc = {
            "out": str(out.resolve()),
            "html": str(page.resolve()),
            "gallery": str((out / "gallery").resolve()),
            "classes": classes,
            "photos": len(rows),
            "sketches": len(sketches),
            "metrics": metrics,
            "seconds": round(seconds, 2),
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")


class _Marked:
    """A hit with the benchmark's verdict (``relevant``) for the results page."""

    def __init__(self, path: str, relpath: str, score: float, rank: int, relevant: bool) -> None:
        self.path, self.relpath, self.score, self.rank, self.relevant = path, relpath, score, rank, relevant
