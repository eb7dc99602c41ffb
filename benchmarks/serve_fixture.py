"""The synthetic-benchmark gallery that ``bench_serve.py`` and ``screenshot_serve.py`` serve (a sibling module).

``zsbir data synth`` writes the benchmark (125 shape classes, 25 of them unseen by the synthetic model); the
photos of the *unseen* classes are copied to ``WORK/photos/<class>/`` and indexed into ``WORK/.zsbir`` with
the embedded synthetic-shapes bundle (``zsbir_infer/assets/synthetic``; the default bundle where that is
absent). Nothing here reads ``shared/`` data: every image is generated.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import zsbir_infer


def bundle_path() -> Path:
    """The synthetic-shapes bundle, else the embedded default bundle."""
    assets = Path(zsbir_infer.__file__).resolve().parent / "assets"
    synthetic = assets / "synthetic"
    return synthetic if (synthetic / "manifest.json").is_file() else assets / "default"


def build(work: Path, photos_per_class: int = 12, sketches_per_class: int = 3) -> dict[str, object]:
    """Generate (once), index (incrementally) and describe the gallery under ``work``."""
    data = work / "synth"
    zsbir = [str(Path(sys.executable).parent / "zsbir")]
    if not (data / "meta.json").is_file():
        subprocess.run(
            [
                *zsbir,
                "data",
                "synth",
                str(data),
                "--photos-per-class",
                str(photos_per_class),
                "--sketches-per-class",
                str(sketches_per_class),
                "--quiet",
            ],
            check=True,
        )
    unseen = [c.strip() for c in (data / "splits" / "unseen.txt").read_text().splitlines() if c.strip()]
    photos = work / "photos"
    for c in unseen:
        dst = photos / c
        if not dst.is_dir():
            shutil.copytree(data / "photo" / c, dst)
    bundle = bundle_path()
    gallery = work / ".zsbir"
    subprocess.run(
        [*zsbir, "index", str(photos), "-o", str(gallery), "--model", str(bundle), "--quiet"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    sketches = sorted(p for c in unseen for p in (data / "sketch" / c).glob("*.png"))
    return {"gallery": gallery, "bundle": bundle, "photos": photos, "unseen": unseen, "sketches": sketches}
