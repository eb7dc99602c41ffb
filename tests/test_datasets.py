"""Real-benchmark loaders on tiny trees built in the SAKE/DSN and ZSE-SBIR layouts, and open_benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir_infer.cli import main
from zsbir_infer.datasets import BenchmarkError, detect_kind, open_benchmark
from zsbir_infer.datasets.benchmarks import parse_cname_cid, parse_filelist

SK = "256x256/sketch/tx_000000000000_ready"
PH = "256x256/photo/tx_000000000000_ready"


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (255, 255, 255)).save(path)


def _table(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # shuffled order on purpose: the id, not the line order, defines the label
    rows = [f"{n} {i}" for i, n in enumerate(names)]
    path.write_text("\n".join(rows[::-1]) + "\n")


def _filelist(bench: Path, list_path: Path, names: list[str], templates: list[str], per_class: int) -> list[str]:
    """Write images and a 'relative/path label' list; returns the relative paths in order."""
    lines, rels = [], []
    for label, cls in enumerate(names):
        for t in templates:
            for i in range(per_class):
                rel = t.format(cls=cls, i=i)
                _img(bench / rel)
                lines.append(f"{rel} {label}")
                rels.append(rel)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("\n".join(lines) + "\n")
    return rels


def make_sketchy(
    bench: Path, zs: str = "zeroshot1", seen: tuple[str, ...] = ("pig", "sea_turtle", "chair"), with_test: bool = True
) -> None:
    unseen = ["cup", "swan"] if zs == "zeroshot1" else ["bat"]
    z = bench / zs
    _table(z / "cname_cid.txt", list(seen))
    _table(z / "cname_cid_zero.txt", unseen)
    sk = [SK + "/{cls}/n0000_{i}-1.png"]
    ph = [PH + "/{cls}/n0000_{i}.jpg", "EXTEND_image_sketchy_ready/{cls}/ext_{i}.jpg"]
    _filelist(bench, z / "sketch_tx_000000000000_ready_filelist_train.txt", list(seen), sk, 2)
    _filelist(bench, z / "sketch_tx_000000000000_ready_filelist_zero.txt", unseen, sk, 3)
    _filelist(bench, z / "all_photo_filelist_train.txt", list(seen), ph, 2)
    _filelist(bench, z / "all_photo_filelist_zero.txt", unseen, ph, 2)
    if with_test:
        _filelist(
            bench, z / "sketch_tx_000000000000_ready_filelist_test.txt", list(seen), [SK + "/{cls}/t{i}-9.png"], 1
        )


def make_tuberlin(bench: Path, with_test: bool = False) -> None:
    seen, unseen = ["wrist-watch", "alarm clock", "pig"], ["banana", "flying saucer"]
    z = bench / "zeroshot"
    _table(z / "cname_cid.txt", seen)
    _table(z / "cname_cid_zero.txt", unseen)
    _filelist(bench, z / "png_ready_filelist_train.txt", seen, ["png_ready/{cls}/{i}.png"], 2)
    _filelist(bench, z / "png_ready_filelist_zero.txt", unseen, ["png_ready/{cls}/{i}.png"], 2)
    _filelist(bench, z / "ImageResized_ready_filelist_train.txt", seen, ["ImageResized_ready/{cls}/n{i}.JPEG"], 3)
    _filelist(bench, z / "ImageResized_ready_filelist_zero.txt", unseen, ["ImageResized_ready/{cls}/n{i}.JPEG"], 3)
    if with_test:
        _filelist(bench, z / "png_ready_filelist_test.txt", seen, ["png_ready/{cls}/t{i}.png"], 1)


def make_quickdraw(bench: Path) -> None:
    seen, unseen = ["teapot", "bee", "sea_turtle"], ["bat", "cow"]
    z = bench / "zeroshot"
    _table(z / "cname_cid.txt", seen)
    _table(z / "cname_cid_zero.txt", unseen)
    _filelist(bench, z / "sketch_train.txt", seen, ["sketches/{cls}/5{i}.png"], 3)
    _filelist(bench, z / "sketch_zero.txt", unseen, ["sketches/{cls}/5{i}.png"], 4)
    _filelist(bench, z / "all_photo_train.txt", seen, ["images/{cls}/image_{i:05d}.jpg"], 2)
    _filelist(bench, z / "all_photo_zero.txt", unseen, ["images/{cls}/image_{i:05d}.jpg"], 2)


def test_parsers(tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text("png_ready/alarm clock/1.png 2\n\nimages/a/b.jpg 0\n")
    assert parse_filelist(f) == [("png_ready/alarm clock/1.png", 2), ("images/a/b.jpg", 0)]
    f.write_text("no_label_here.png\n")
    with pytest.raises(BenchmarkError, match=r"l\.txt:1"):
        parse_filelist(f)
    t = tmp_path / "c.txt"
    t.write_text("alarm clock 1\npig 0\n")
    assert parse_cname_cid(t) == ["pig", "alarm clock"]
    t.write_text("pig 0\ncow 2\n")
    with pytest.raises(BenchmarkError, match=r"not 0\.\.1"):
        parse_cname_cid(t)
    with pytest.raises(BenchmarkError, match="missing file"):
        parse_cname_cid(tmp_path / "nope.txt")


def test_sketchy_sake_layout(tmp_path: Path) -> None:
    root = tmp_path / "dataset" / "Sketchy"
    make_sketchy(root)
    for where in (root, root.parent):  # the benchmark folder or SAKE's dataset/ folder
        assert detect_kind(where) == "sketchy"
        bench = open_benchmark(where)
        assert bench.kind == "sketchy" and bench.root == root
        assert bench.seen_classes == ["chair", "pig", "sea_turtle"]
        assert bench.unseen_classes == ["cup", "swan"]
        assert bench.info["zeroshot"] == "zeroshot1" and bench.info["layout"] == "sake"
    unseen = bench.split("unseen")
    assert unseen.classes == ["cup", "swan"]
    assert len(unseen.sketches) == 2 * 3 and len(unseen.photos) == 2 * 2 * 2
    for s in unseen.photos + unseen.sketches:
        assert s.path.is_file() and s.path.parent.name == s.class_name == unseen.classes[s.label]
    assert {s.domain for s in unseen.sketches} == {"sketch"}
    assert any("EXTEND_image_sketchy_ready" in str(s.path) for s in unseen.photos)
    seen = bench.split("seen")
    assert len(seen.sketches) == 6 and len(seen.photos) == 12
    assert all(seen.classes[s.label] == s.path.parent.name for s in seen.photos)
    val = bench.split("val")
    assert len(val.sketches) == 3 and val.photos == [] and val.classes == bench.seen_classes
    allsplit = bench.split("all")
    assert len(allsplit.classes) == 5 and len(allsplit.sketches) == 12


def test_zse_sbir_data_path_with_all_three(tmp_path: Path) -> None:
    data = tmp_path / "datasets"
    make_sketchy(data / "Sketchy", "zeroshot0", seen=("table", "teapot"), with_test=False)
    make_sketchy(data / "Sketchy", "zeroshot1", with_test=False)
    make_tuberlin(data / "TUBerlin")
    make_quickdraw(data / "QuickDraw")
    with pytest.raises(BenchmarkError, match="several benchmarks"):
        open_benchmark(data)
    sk = open_benchmark(data, kind="sketchy")
    assert sk.info["zeroshot"] == "zeroshot1" and sk.unseen_classes == ["cup", "swan"]
    assert sk.info["layout"] == "zse-sbir"
    with pytest.raises(ValueError, match="'seen', 'unseen' or 'all'"):
        sk.split("val")
    sk0 = open_benchmark(data / "Sketchy", zeroshot="zeroshot0")
    assert sk0.seen_classes == ["table", "teapot"] and sk0.unseen_classes == ["bat"]
    with pytest.raises(BenchmarkError, match="zeroshot7"):
        open_benchmark(data / "Sketchy", zeroshot="zeroshot7")

    tu = open_benchmark(data, kind="tuberlin")
    assert detect_kind(data / "TUBerlin") == "tuberlin"
    assert tu.unseen_classes == ["banana", "flying saucer"]
    z = tu.split("unseen")
    assert len(z.sketches) == 4 and len(z.photos) == 6
    assert all(s.path.is_file() for s in z.photos + z.sketches)
    assert {s.class_name for s in z.photos if " " in str(s.path)} == {"flying saucer"}
    assert len(tu.split("seen").photos) == 9

    qd = open_benchmark(data / "QuickDraw")
    assert qd.kind == "quickdraw" and qd.seen_classes == ["bee", "sea_turtle", "teapot"]
    z = qd.split("unseen")
    assert len(z.sketches) == 8 and len(z.photos) == 4
    assert all("sketches" in s.path.parts for s in z.sketches) and all("images" in s.path.parts for s in z.photos)
    assert [qd.split("seen").classes[s.label] for s in qd.split("seen").photos[:2]] == ["teapot", "teapot"]


def test_tuberlin_sake_with_val(tmp_path: Path) -> None:
    root = tmp_path / "TUBerlin"
    make_tuberlin(root, with_test=True)
    tu = open_benchmark(root)
    assert tu.info["layout"] == "sake" and len(tu.split("val").sketches) == 3


def test_missing_train_photo_list_only_breaks_seen(tmp_path: Path) -> None:
    root = tmp_path / "TUBerlin"
    make_tuberlin(root)
    (root / "zeroshot" / "ImageResized_ready_filelist_train.txt").unlink()
    tu = open_benchmark(root)
    assert len(tu.split("unseen").photos) == 6
    with pytest.raises(BenchmarkError, match=r"ImageResized_ready_filelist_train\.txt"):
        tu.split("seen")


def test_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkError, match=r"missing file .*splits/seen\.txt"):
        open_benchmark(empty)
    with pytest.raises(BenchmarkError, match="does not exist"):
        open_benchmark(tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match=r"not a quickdraw benchmark: missing file .*sketch_zero\.txt"):
        open_benchmark(empty, kind="quickdraw")

    root = tmp_path / "Sketchy"
    make_sketchy(root)
    (root / "zeroshot1" / "all_photo_filelist_zero.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"missing file: .*all_photo_filelist_zero\.txt"):
        open_benchmark(root)

    root2 = tmp_path / "S2"
    make_sketchy(root2)
    lst = root2 / "zeroshot1" / "sketch_tx_000000000000_ready_filelist_zero.txt"
    lst.write_text(lst.read_text().replace(" 1\n", " 7\n"))
    with pytest.raises(BenchmarkError, match=r"label 7 .*cname_cid_zero\.txt"):
        open_benchmark(root2)

    root3 = tmp_path / "S3"
    make_sketchy(root3)
    for p in (root3 / "256x256").rglob("*.png"):
        p.unlink()
    with pytest.raises(BenchmarkError, match="missing image"):
        open_benchmark(root3)

    ours = tmp_path / "ours"
    (ours / "splits").mkdir(parents=True)
    (ours / "splits" / "seen.txt").write_text("a\n")
    (ours / "splits" / "unseen.txt").write_text("b\n")
    (ours / "photo" / "a").mkdir(parents=True)
    (ours / "sketch" / "a").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match=r"missing folder: .*photo/b"):
        open_benchmark(ours)
    (ours / "photo" / "b").mkdir()
    (ours / "sketch" / "b").mkdir()
    _img(ours / "photo" / "b" / "x.jpg")
    (ours / "photo" / "b" / ".x.jpg.tmp1").write_bytes(b"partial")
    bench = open_benchmark(ours)
    assert bench.kind == "folder" and [s.path.name for s in bench.split("unseen").photos] == ["x.jpg"]
    (ours / "splits" / "unseen.txt").write_text("a\n")
    with pytest.raises(BenchmarkError, match="overlap"):
        open_benchmark(ours)


def test_cli_info_on_real_layout(tmp_path: Path) -> None:
    root = tmp_path / "QuickDraw"
    make_quickdraw(root)
    result = CliRunner().invoke(main, ["data", "info", str(root), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "quickdraw" and summary["unseen_classes"] == 2
    assert summary["images"]["unseen"] == {"photo": 4, "sketch": 8}
    bad = CliRunner().invoke(main, ["data", "info", str(root / "zeroshot")])
    assert bad.exit_code != 0 and "missing file" in bad.output
