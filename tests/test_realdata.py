"""Split sets of our folder layout, extra sketches (doodles) for the seen classes, and the real data.

The synthetic tests build tiny folders in tmp_path. The real-data tests read the team's Sketchy subset and
QuickDraw doodles from ``../shared/realdata`` (only listing files, never decoding them) and skip where
that folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from zsbir_infer.cli import main
from zsbir_infer.datasets import (
    Benchmark,
    BenchmarkError,
    add_extra_sketches,
    detect_kind,
    open_benchmark,
    read_class_map,
    split_sets,
)

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
needs_realdata = pytest.mark.skipif(
    not (REALDATA / "sketchy").is_dir(), reason=f"no real data at {REALDATA} (team data, not part of the repo)"
)

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
SEEN, UNSEEN = ("ant", "bee", "cat", "dog"), ("eel", "fox")  # the default split set
SEEN21, UNSEEN21 = ("ant", "bee", "cat", "eel"), ("dog", "fox")  # split set "21": dog and eel swap


def _touch(path: Path) -> None:
    # Loaders only list files, so empty files with an image suffix are enough.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def make_folder(root: Path, default: bool = True, photos: int = 2, sketches: int = 3) -> Path:
    splits = root / "splits"
    splits.mkdir(parents=True)
    if default:
        (splits / "seen.txt").write_text("\n".join(SEEN) + "\n")
        (splits / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    (splits / "seen21.txt").write_text("\n".join(SEEN21) + "\n")
    (splits / "unseen21.txt").write_text("\n".join(UNSEEN21) + "\n")
    (splits / "seen_orphan.txt").write_text("ant\n")  # no unseen_orphan.txt: not a split set
    for cls in CLASSES:
        for i in range(photos):
            _touch(root / "photo" / cls / f"{i}.jpg")
        for i in range(sketches):
            _touch(root / "sketch" / cls / f"{i}.png")
    return root


def make_doodles(root: Path, rows: list[str] | None, folders: dict[str, int]) -> Path:
    for word, n in folders.items():
        (root / "sketch" / word).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _touch(root / "sketch" / word / f"d{i}.png")
    if rows is not None:
        (root / "class_map.csv").write_text("sketchy_class,quickdraw_word\n" + "".join(r + "\n" for r in rows))
    return root


# Words: apple->ant, honeybee->bee, hound->dog, eel->eel, fox->fox (no folder: unseen doodles are
# deliberately absent), zebra->zebra (no class here), plus a folder the map does not mention.
DOODLE_ROWS = ["ant,apple", "bee,honeybee", "dog,hound", "eel,eel", "fox,fox", "zebra,zebra"]
DOODLE_FOLDERS = {"apple": 2, "honeybee": 1, "hound": 3, "eel": 4, "zebra": 1, "unmapped": 2}


# ------------------------------------------------------------------------------------------ split sets


def test_split_sets_of_folder_layout(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "b")
    assert split_sets(root) == ["default", "21"]
    assert detect_kind(root) == "folder"

    bench = open_benchmark(root)
    assert bench.info["split_set"] == "default" and bench.info["split_sets"] == ["default", "21"]
    assert bench.seen_classes == list(SEEN) and bench.unseen_classes == list(UNSEEN)
    explicit = open_benchmark(root, zeroshot="default")
    assert explicit.seen_classes == bench.seen_classes and explicit.info["split_set"] == "default"

    b21 = open_benchmark(root, zeroshot="21")
    assert b21.info["split_set"] == "21" and b21.kind == "folder"
    assert b21.seen_classes == list(SEEN21) and b21.unseen_classes == list(UNSEEN21)
    unseen = b21.split("unseen")
    assert unseen.classes == ["dog", "fox"]
    assert {(s.class_name, s.label) for s in unseen.sketches} == {("dog", 0), ("fox", 1)}
    assert len(unseen.photos) == 4 and len(unseen.sketches) == 6
    seen = b21.split("seen")
    assert {s.class_name: s.label for s in seen.photos} == {"ant": 0, "bee": 1, "cat": 2, "eel": 3}
    assert b21.counts() == {"seen": {"photo": 8, "sketch": 12}, "unseen": {"photo": 4, "sketch": 6}}

    with pytest.raises(BenchmarkError, match=r"missing file: .*splits/seen7\.txt .*split sets in .*: default, 21"):
        open_benchmark(root, zeroshot="7")
    with pytest.raises(BenchmarkError, match=r"unseen_orphan\.txt"):
        open_benchmark(root, zeroshot="_orphan")
    with pytest.raises(BenchmarkError, match="bad split set name"):
        open_benchmark(root, zeroshot="../x")


def test_folder_with_only_a_named_split_set(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "b", default=False)
    assert split_sets(root) == ["21"] and detect_kind(root) == "folder"
    with pytest.raises(BenchmarkError, match=r"missing file: .*splits/seen\.txt .*split sets in .*: 21"):
        open_benchmark(root)
    assert open_benchmark(root, zeroshot="21").unseen_classes == ["dog", "fox"]
    (root / "splits" / "unseen21.txt").write_text("dog\nant\n")
    with pytest.raises(BenchmarkError, match="overlap"):
        open_benchmark(root, zeroshot="21")


# ------------------------------------------------------------------------------------------ extra sketches


def _extra_paths(bench: Benchmark, doodles: Path) -> list[tuple[Path, str, str]]:
    return [r for rows in bench.items.values() for r in rows if doodles in r[0].parents]


@pytest.mark.parametrize(
    ("zeroshot", "added_classes", "refused"),
    [(None, {"ant": 2, "bee": 1, "dog": 3}, 2), ("21", {"ant": 2, "bee": 1, "eel": 4}, 2)],
)
def test_doodles_join_only_seen_classes(
    tmp_path: Path, zeroshot: str | None, added_classes: dict[str, int], refused: int
) -> None:
    root = make_folder(tmp_path / "b")
    doodles = make_doodles(tmp_path / "qd", DOODLE_ROWS, DOODLE_FOLDERS)
    plain = open_benchmark(root, zeroshot=zeroshot)
    bench = open_benchmark(root, zeroshot=zeroshot, extra_sketches=doodles)
    assert bench.info["extra_sketches"] == {
        "root": str(doodles),
        "class_map": str(doodles / "class_map.csv"),
        "added": sum(added_classes.values()),
        "classes": len(added_classes),
        "words": len(added_classes),
        "skipped_words": 1,  # zebra
        "unseen_refused": refused,  # default: eel, fox; 21: hound (dog), fox
        "unmapped_words": 1,
    }
    extra = _extra_paths(bench, doodles)
    assert all(domain == "sketch" for _, _, domain in extra)
    got: dict[str, int] = {}
    for _, cls, _ in extra:
        got[cls] = got.get(cls, 0) + 1
    assert got == added_classes
    assert not set(got) & set(bench.unseen_classes)
    # Only the seen part grew; the unseen part is untouched.
    assert not any(doodles in p.parents for p, _, _ in bench.items["unseen"])
    assert bench.split("unseen") == plain.split("unseen")
    seen = bench.split("seen")
    assert seen.classes == plain.split("seen").classes and seen.photos == plain.split("seen").photos
    assert len(seen.sketches) == len(plain.split("seen").sketches) + sum(added_classes.values())
    for s in seen.sketches:
        assert seen.classes[s.label] == s.class_name
    assert len(bench.split("all").sketches) == len(plain.split("all").sketches) + sum(added_classes.values())


def test_doodle_folder_without_class_map(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "b")
    doodles = make_doodles(tmp_path / "qd", None, {"ant": 2, "eel": 1, "fox": 3, "yak": 1})
    bench = open_benchmark(root, extra_sketches=doodles)
    summary = bench.info["extra_sketches"]
    assert isinstance(summary, dict)
    assert summary["added"] == 2 and summary["classes"] == 1 and summary["class_map"] is None
    assert summary["unseen_refused"] == 2 and summary["skipped_words"] == 1 and summary["unmapped_words"] == 0
    # Under the other split set eel is seen and dog unseen.
    summary21 = open_benchmark(root, zeroshot="21", extra_sketches=doodles).info["extra_sketches"]
    assert isinstance(summary21, dict)
    assert summary21["added"] == 3 and summary21["unseen_refused"] == 1


def test_extra_sketches_on_a_real_layout_benchmark(tmp_path: Path) -> None:
    bench = Benchmark(
        kind="sketchy",
        root=tmp_path / "Sketchy",
        seen_classes=["ant", "bee"],
        unseen_classes=["eel"],
        items={"seen": [], "unseen": []},
    )
    doodles = make_doodles(tmp_path / "qd", DOODLE_ROWS, DOODLE_FOLDERS)
    extra = add_extra_sketches(bench, doodles)
    assert extra.classes == ["ant", "bee"] and extra.unseen_refused == ["eel"]
    assert extra.skipped_words == ["hound", "fox", "zebra"]
    assert bench.counts()["seen"] == {"photo": 0, "sketch": 3}


def test_malformed_class_map_and_bad_extra_folders(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "b")
    qd = make_doodles(tmp_path / "qd", DOODLE_ROWS, DOODLE_FOLDERS)
    csv_path = qd / "class_map.csv"
    assert read_class_map(csv_path)[0] == ("apple", "ant", 2)
    cases = [
        ("class,word\nant,apple\n", r"class_map\.csv:1: expected the header"),
        ("sketchy_class,quickdraw_word\nant,apple\nbee,honeybee,extra\n", r"class_map\.csv:3: expected"),
        ("sketchy_class,quickdraw_word\nant,apple\n\ndog,\n", r"class_map\.csv:4: expected"),
        ("sketchy_class,quickdraw_word\nant,apple\nbee,apple\n", r"class_map\.csv:3: word 'apple' .* line 2"),
        ('sketchy_class,quickdraw_word\nant,"apple\n', r"class_map\.csv:\d+: "),
        ("", r"class_map\.csv:1: empty file"),
        ("sketchy_class,quickdraw_word\nant,pear\n", r"class_map\.csv:2: missing folder: .*sketch/pear"),
    ]
    for text, pattern in cases:
        csv_path.write_text(text)
        with pytest.raises(BenchmarkError, match=pattern):
            open_benchmark(root, extra_sketches=qd)
    csv_path.write_text("sketchy_class,quickdraw_word\nfox,pear\n")  # refused words need no folder
    summary = open_benchmark(root, extra_sketches=qd).info["extra_sketches"]
    assert isinstance(summary, dict) and summary["unseen_refused"] == 1 and summary["added"] == 0
    with pytest.raises(BenchmarkError, match=r"missing folder: .*nowhere/sketch"):
        open_benchmark(root, extra_sketches=tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match="is the benchmark itself"):
        open_benchmark(root, extra_sketches=root)


def test_cli_data_info_split_sets_and_extra(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "b")
    doodles = make_doodles(tmp_path / "qd", DOODLE_ROWS, DOODLE_FOLDERS)
    res = CliRunner().invoke(main, ["data", "info", str(root), "--zeroshot", "21", "--extra-sketches", str(doodles)])
    assert res.exit_code == 0, res.output
    assert "split set: 21 (available: default, 21)" in res.output
    assert "seen: 8 photos, 19 sketches (7 of them extra)" in res.output
    assert "7 sketches of 3 seen classes" in res.output and "refused 2 words of unseen classes" in res.output
    assert "unseen classes: dog, fox" in res.output
    res = CliRunner().invoke(main, ["data", "info", str(root), "--extra-sketches", str(doodles), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["split_set"] == "default" and summary["split_sets"] == ["default", "21"]
    assert summary["classes"]["unseen"] == ["eel", "fox"]
    assert summary["extra_sketches"]["added"] == 6 and summary["extra_sketches"]["unseen_refused"] == 2
    assert summary["images"]["seen"] == {"photo": 8, "sketch": 18}
    bad = CliRunner().invoke(main, ["data", "info", str(root), "--zeroshot", "9"])
    assert bad.exit_code != 0 and "seen9.txt" in bad.output and "default, 21" in bad.output


# ------------------------------------------------------------------------------------------ real data


@needs_realdata
def test_real_sketchy_subset_counts_and_split_sets() -> None:
    root = REALDATA / "sketchy"
    assert detect_kind(root) == "folder"
    assert split_sets(root) == ["default", "21"]
    sake = open_benchmark(root)
    assert sake.info["split_set"] == "default" and sake.info.get("pairs_finegrained") == "pairs_finegrained.csv"
    assert (len(sake.seen_classes), len(sake.unseen_classes)) == (100, 25)
    c = sake.counts()
    assert c["seen"]["photo"] + c["unseen"]["photo"] == 3125
    assert c["seen"]["sketch"] + c["unseen"]["sketch"] == 3125
    assert c["unseen"] == {"photo": 625, "sketch": 625}
    y21 = open_benchmark(root, zeroshot="21")
    assert (len(y21.seen_classes), len(y21.unseen_classes)) == (104, 21)
    assert sorted(sake.seen_classes + sake.unseen_classes) == sorted(y21.seen_classes + y21.unseen_classes)
    assert len(set(sake.seen_classes + sake.unseen_classes)) == 125
    assert y21.counts()["unseen"] == {"photo": 525, "sketch": 525}
    assert set(y21.split("all").classes) == set(sake.split("all").classes)


@needs_realdata
@pytest.mark.parametrize("zeroshot", [None, "21"])
def test_real_doodles_add_only_seen_classes(zeroshot: str | None) -> None:
    root, doodles = REALDATA / "sketchy", REALDATA / "quickdraw"
    bench = open_benchmark(root, zeroshot=zeroshot, extra_sketches=doodles)
    summary = bench.info["extra_sketches"]
    assert isinstance(summary, dict)
    extra = _extra_paths(bench, doodles)
    classes = {cls for _, cls, _ in extra}
    assert summary["added"] == len(extra) > 0 and summary["classes"] == len(classes)
    assert classes <= set(bench.seen_classes)
    assert not classes & set(bench.unseen_classes)
    # The shipped doodles avoid the unseen classes of both splits, so none is refused under either.
    assert summary["unseen_refused"] == 0 and summary["skipped_words"] == 0
    assert not any(doodles in p.parents for p, _, _ in bench.items["unseen"])
    unseen = bench.split("unseen")
    assert len(unseen.sketches) == (625 if zeroshot is None else 525)
    assert all(doodles not in s.path.parents for s in unseen.sketches)


@needs_realdata
def test_real_class_unseen_in_sake_but_seen_in_21_is_refused_under_sake(tmp_path: Path) -> None:
    root = REALDATA / "sketchy"
    sake, y21 = open_benchmark(root), open_benchmark(root, zeroshot="21")
    crossing = sorted(set(sake.unseen_classes) & set(y21.seen_classes))
    assert crossing  # e.g. airplane
    cls = crossing[0]
    doodles = make_doodles(tmp_path / "qd", [f"{cls},my_word"], {"my_word": 2})
    refused = open_benchmark(root, extra_sketches=doodles).info["extra_sketches"]
    accepted = open_benchmark(root, zeroshot="21", extra_sketches=doodles).info["extra_sketches"]
    assert isinstance(refused, dict) and isinstance(accepted, dict)
    assert refused["unseen_refused"] == 1 and refused["added"] == 0
    assert accepted["unseen_refused"] == 0 and accepted["added"] == 2


@needs_realdata
def test_real_cli_data_info() -> None:
    res = CliRunner().invoke(
        main,
        [
            "data",
            "info",
            str(REALDATA / "sketchy"),
            "--zeroshot",
            "21",
            "--extra-sketches",
            str(REALDATA / "quickdraw"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "104 seen / 21 unseen classes" in res.output and "split set: 21 (available: default, 21)" in res.output
    assert "refused 0 words of unseen classes" in res.output
