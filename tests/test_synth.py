"""The synthetic ZS-SBIR benchmark generator: layout, determinism, resume, split, domain gap, CLI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir_infer.cli import main
from zsbir_infer.datasets import open_benchmark
from zsbir_infer.datasets.synth import (
    ATTACHES,
    INNERS,
    SHAPES,
    SPOKES,
    ClassSpec,
    SynthConfig,
    all_classes,
    generate_synthetic,
    make_classes,
    object_parts,
    render_image,
)

TINY = SynthConfig(classes=6, unseen=2, photos_per_class=3, sketches_per_class=3, size=64, seed=0)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "tiny"
    generate_synthetic(root, TINY, workers=1, progress=False)
    return root


def test_layout_and_counts(tiny: Path) -> None:
    seen = (tiny / "splits" / "seen.txt").read_text().split()
    unseen = (tiny / "splits" / "unseen.txt").read_text().split()
    assert len(seen) == 4 and len(unseen) == 2
    assert not set(seen) & set(unseen)
    for cls in seen + unseen:
        photos = sorted((tiny / "photo" / cls).iterdir())
        sketches = sorted((tiny / "sketch" / cls).iterdir())
        assert [p.name for p in photos] == [f"{cls}_{i:04d}.jpg" for i in range(3)]
        assert [p.name for p in sketches] == [f"{cls}_{i:04d}.png" for i in range(3)]
        with Image.open(photos[0]) as im:
            assert im.format == "JPEG" and im.size == (64, 64)
        with Image.open(sketches[0]) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["generator"] == "zsbir.synth" and meta["seed"] == 0
    assert meta["params"]["classes"] == 6 and meta["counts"]["photos"] == 18
    # no temporary files left behind
    assert not [p for p in tiny.rglob(".*") if p.is_file()]


def test_open_benchmark_on_synthetic(tiny: Path) -> None:
    bench = open_benchmark(tiny)
    assert bench.kind == "synthetic"
    unseen = bench.split("unseen")
    assert unseen.classes == bench.unseen_classes == sorted(bench.unseen_classes)
    assert len(unseen.photos) == 6 and len(unseen.sketches) == 6
    for s in unseen.photos + unseen.sketches:
        assert unseen.classes[s.label] == s.class_name and s.path.parent.name == s.class_name
    everything = bench.split("all")
    assert len(everything.classes) == 6 and len(everything.photos) == 18


def test_deterministic_rerun_is_byte_identical(tiny: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    generate_synthetic(other, TINY, workers=2, progress=False)  # other worker count, same bytes
    assert _digest(other) == _digest(tiny)


def test_different_seed_differs() -> None:
    a, b = make_classes(TINY), make_classes(replace(TINY, seed=1))
    assert a != b
    name = a[0][0].name
    img0 = np.asarray(render_image(TINY, name, "photo", 0))
    img1 = np.asarray(render_image(replace(TINY, seed=1), name, "photo", 0))
    assert not np.array_equal(img0, img1)
    # and images within a class differ from each other
    assert not np.array_equal(img0, np.asarray(render_image(TINY, name, "photo", 1)))


def test_resume_regenerates_only_missing(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "resume"
    generate_synthetic(root, TINY, workers=1, progress=False)
    victim = next((root / "sketch").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.*") if p != victim}
    victim.unlink()
    report = generate_synthetic(root, TINY, workers=1, progress=False)
    assert report.written == 1 and report.skipped == 35
    assert victim.exists()
    assert _digest(root) == _digest(tiny)
    for p, t in before.items():
        if p.suffix in (".jpg", ".png"):
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"


def test_refuses_other_parameters_and_foreign_folder(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "x"
    generate_synthetic(root, TINY, workers=1, progress=False)
    with pytest.raises(ValueError, match="other parameters"):
        generate_synthetic(root, replace(TINY, seed=5), workers=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_synthetic(foreign, TINY, workers=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"unseen": 6}, "unseen"),
        ({"classes": 1}, "classes"),
        ({"difficulty": 2.0}, "difficulty"),
        ({"size": 8}, "size"),
    ],
)
def test_bad_config(kwargs: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        replace(TINY, **kwargs).validate()  # type: ignore[arg-type]


def test_default_split_is_compositional() -> None:
    seen, unseen = make_classes(SynthConfig())
    assert len(seen) == 100 and len(unseen) == 25
    names = [c.name for c in seen + unseen]
    assert len(set(names)) == 125
    assert not {c.name for c in seen} & {c.name for c in unseen}
    seen_parts = {p for c in seen for p in c.parts()}
    for c in unseen:  # unseen classes are new combinations of parts that training has seen
        assert set(c.parts()) <= seen_parts
    assert make_classes(SynthConfig()) == (seen, unseen)  # deterministic


def test_class_names_round_trip() -> None:
    pool = all_classes()
    assert len(pool) == len(SHAPES) * len(SPOKES) * len(INNERS) * len(ATTACHES)
    for spec in pool:
        assert ClassSpec.from_name(spec.name) == spec
    assert ClassSpec("hex", 3, "cross", "legs").name == "hex-3spokes-cross-legs"
    with pytest.raises(ValueError):
        ClassSpec.from_name("hex-3-cross-legs")
    with pytest.raises(ValueError):
        ClassSpec.from_name("blob-3spokes-cross-legs")


def test_parts_follow_the_class() -> None:
    def roles(spec: ClassSpec) -> list[str]:
        return [p.role for p in object_parts(spec)]

    assert roles(ClassSpec("circle", 0, "plain", "bare")) == ["body"]
    # 3 spokes -> 3 lines + 3 knobs; legs -> 2 more lines; cross -> 2 marks
    r = roles(ClassSpec("hex", 3, "cross", "legs"))
    assert r.count("knob") == 3 and r.count("line") == 5 and r.count("mark") == 2 and r.count("body") == 1
    assert roles(ClassSpec("square", 0, "hole", "bare")) == ["body", "hole"]


def test_domain_gap(tiny: Path) -> None:
    photos = np.stack(
        [np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in (tiny / "photo").rglob("*.jpg")]
    )
    sketches = np.stack(
        [np.asarray(Image.open(p).convert("L"), np.float32) / 255 for p in (tiny / "sketch").rglob("*.png")]
    )
    # sketches: mostly white paper with a few dark strokes
    assert (sketches > 0.9).mean() > 0.85
    assert 0.0 < (sketches < 0.5).mean() < 0.12
    # photos: no white paper, coloured (channels differ), much darker on average
    assert (photos.min(axis=-1) > 0.9).mean() < 0.2
    assert np.abs(photos - photos.mean(axis=-1, keepdims=True)).mean() > 0.03
    assert sketches.mean() - photos.mean() > 0.3


def test_difficulty_changes_images() -> None:
    easy = replace(TINY, difficulty=0.0)
    hard = replace(TINY, difficulty=1.0)
    name = make_classes(TINY)[0][0].name
    a = [np.asarray(render_image(easy, name, "sketch", i), np.float32) for i in range(6)]
    b = [np.asarray(render_image(hard, name, "sketch", i), np.float32) for i in range(6)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_cli_synth_and_info(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["data", "synth", str(out), "--classes", "4", "--unseen", "1", "--photos-per-class", "2"]
    args += ["--sketches-per-class", "2", "--size", "48", "--seed", "3", "--workers", "1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 seen + 1 unseen" in result.output and "16 images written" in result.output
    assert len(list((out / "photo").rglob("*.jpg"))) == 8
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 images written, 16 already there" in again.output
    info = CliRunner().invoke(main, ["data", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["kind"] == "synthetic" and summary["images"]["unseen"] == {"photo": 2, "sketch": 2}
    bad = CliRunner().invoke(main, ["data", "synth", str(out), "--classes", "4", "--unseen", "4", "--quiet"])
    assert bad.exit_code != 0 and "unseen" in bad.output
