"""Training: batches, one step lowers the loss, exact resume, pre-training hand-off and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from zsbir_export.train import TrainConfig, train  # noqa: E402
from zsbir_export.train.data import EpochBatches, make_spec, plan_epoch, render_batch  # noqa: E402
from zsbir_export.train.loop import _Run  # noqa: E402
from zsbir_export.train.methods import parse_parts, parts_loss  # noqa: E402
from zsbir_export.train.methods import part_slices as _slices  # noqa: E402

from zsbir_infer.datasets import open_benchmark  # noqa: E402
from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic  # noqa: E402

pytestmark = pytest.mark.torch

TINY = {"size": 32, "width": 4, "embed_dim": 16, "batch_size": 8, "per_class": 1, "threads": 1, "workers": 0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(classes=6, unseen=2, photos_per_class=4, sketches_per_class=4, size=48, seed=3)
    generate_synthetic(root, cfg, workers=1, progress=False)
    return root


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    args: dict[str, object] = {
        "method": "tursun",
        "data": str(data),
        "out": str(out),
        "epochs": 2,
        "max_batches": 2,
        "progress": False,
        "itq_bits": 8,
        **TINY,
    }
    args.update(kw)
    return TrainConfig(**args)  # type: ignore[arg-type]


def _quiet(_: str) -> None:
    pass


def test_plan_epoch_is_class_balanced_and_deterministic(tiny_data: Path) -> None:
    split = open_benchmark(tiny_data).split("seen")
    a = plan_epoch(split, batch_size=8, seed=1, epoch=0, per_class=2)
    assert a == plan_epoch(split, batch_size=8, seed=1, epoch=0, per_class=2)
    assert a != plan_epoch(split, batch_size=8, seed=1, epoch=1, per_class=2)
    assert len(a) == (len(split.sketches) + len(split.photos)) // 8
    for plan in a:
        sk = [split.sketches[i].label for i in plan.sketches]
        ph = [split.photos[i].label for i in plan.photos]
        assert sorted(sk) == sorted(ph)  # same classes in both domains
        assert len(set(sk)) == 2 and all(sk.count(c) == 2 for c in set(sk))
    with pytest.raises(ValueError, match="too small"):
        plan_epoch(split, batch_size=3, seed=0, epoch=0, per_class=2)


def test_render_batch_layout_and_augmentation(tiny_data: Path) -> None:
    split = open_benchmark(tiny_data).split("seen")
    plan = plan_epoch(split, 8, 0, 0, per_class=1)[0]
    ds = EpochBatches(split, make_spec(32), 8, 0, 1, ("sketch", "photo"), n_views=2)
    b = ds[0]
    assert b.images.shape == (8, 3, 32, 32) and len(b.views) == 2 and b.views[0].shape == b.images.shape
    assert b.tags.tolist() == [0] * 4 + [1] * 4 and b.n_sketch == 4
    again = render_batch(split, plan, make_spec(32), ds.cache, augment=True, n_views=2)
    assert torch.equal(again.images, b.images) and torch.equal(again.views[1], b.views[1])
    plain = render_batch(split, plan, make_spec(32), ds.cache, augment=False)
    assert not torch.equal(plain.images, b.images)  # augmentation changes pixels
    assert not torch.equal(b.views[0], b.views[1])  # the two contrastive views differ


@pytest.mark.parametrize("method,ablation", [("tursun", False), ("tursun", True), ("none", False), ("dsn", True)])
def test_one_step_decreases_loss(tiny_data: Path, tmp_path: Path, method: str, ablation: bool) -> None:
    run = _Run(_cfg(tiny_data, tmp_path, method=method, ablation=ablation, lr=1e-4), _quiet)
    batch = run.batches[0]
    first = run.step(batch)
    second = run.step(batch)
    assert second["loss"] < first["loss"]
    expected = {"tursun": {"ce", "quad", "kp"}, "none": {"ce", "ce_parts"}, "dsn": {"ce", "kd"}}[method]
    if ablation:
        expected = {"ce"} if method == "tursun" else expected
    assert set(first) - {"loss", "acc"} == expected


def test_dsn_step_has_all_losses(tiny_data: Path, tmp_path: Path) -> None:
    run = _Run(_cfg(tiny_data, tmp_path, method="dsn"), _quiet)
    batch = run.batches[0]
    assert len(batch.views) == 2
    first = run.step(batch)
    assert set(first) - {"loss", "acc"} == {"ce", "kd", "con", "mem"}
    assert all(np.isfinite(v) for v in first.values())
    assert run.bank is not None and run.bank.used_fraction() > 0
    second = run.step(batch)
    assert second["ce"] < first["ce"]


@pytest.mark.parametrize("method", ["tursun", "dsn"])
def test_resume_is_exact(tiny_data: Path, tmp_path: Path, method: str) -> None:
    straight = train(_cfg(tiny_data, tmp_path / "a", method=method), log=_quiet)
    train(_cfg(tiny_data, tmp_path / "b", method=method), stop_after=1, log=_quiet)
    resumed = train(_cfg(tiny_data, tmp_path / "b", method=method), resume=True, log=_quiet)
    sa = torch.load(straight.run_dir / "resume.pt", weights_only=True)
    sb = torch.load(resumed.run_dir / "resume.pt", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 2
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert json.loads(sa["history"])[-1]["loss"] == json.loads(sb["history"])[-1]["loss"]
    assert straight.metrics["unseen"]["map_all"] == resumed.metrics["unseen"]["map_all"]
    if method == "dsn":
        assert "itq" in straight.metrics["unseen"] and "itq_transductive" in straight.metrics["unseen"]


def test_resume_refuses_other_settings(tiny_data: Path, tmp_path: Path) -> None:
    train(_cfg(tiny_data, tmp_path, epochs=1), log=_quiet)
    with pytest.raises(ValueError, match=r"cannot resume.*seed"):
        train(_cfg(tiny_data, tmp_path, epochs=1, seed=5), resume=True, log=_quiet)
    with pytest.raises(FileNotFoundError, match="no resume state"):
        train(_cfg(tiny_data, tmp_path / "empty", epochs=1), resume=True, log=_quiet)


def test_workers_give_the_same_batches(tiny_data: Path, tmp_path: Path) -> None:
    a = train(_cfg(tiny_data, tmp_path / "w0", epochs=1, workers=0), log=_quiet)
    b = train(_cfg(tiny_data, tmp_path / "w1", epochs=1, workers=1), log=_quiet)
    assert a.history[-1]["loss"] == b.history[-1]["loss"]


def test_pretrained_hand_off_and_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    from zsbir_export.checkpoints import load_checkpoint

    pre = train(_cfg(tiny_data, tmp_path / "pre", method="none", epochs=1), log=_quiet)
    run = train(_cfg(tiny_data, tmp_path / "t", epochs=1, pretrained=str(pre.checkpoint)), log=_quiet)
    loaded = load_checkpoint(run.checkpoint)
    cfg = loaded.config
    assert cfg["method"] == "tursun" and cfg["ablation"] is False
    assert cfg["class_names"] == open_benchmark(tiny_data).seen_classes
    assert cfg["preprocess"]["sketch"]["size"] == [32, 32]
    assert cfg["metrics"]["unseen"]["map_all"] == run.metrics["unseen"]["map_all"]
    x = torch.zeros(2, 3, 32, 32)
    emb = loaded.model.embed(x, torch.tensor([0, 1]))
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    # a pretrained model of another width is refused with a clear message
    with pytest.raises(ValueError, match="width"):
        train(_cfg(tiny_data, tmp_path / "t2", epochs=1, width=8, pretrained=str(pre.checkpoint)), log=_quiet)


def test_cli_smoke(tiny_data: Path, tmp_path: Path) -> None:
    from zsbir_infer.cli import main

    out = tmp_path / "run"
    args = ["train", "--method", "tursun", "--data", str(tiny_data), "--out", str(out), "--epochs", "1"]
    args += ["--size", "32", "--width", "4", "--embed-dim", "16", "--batch-size", "8", "--max-batches", "2"]
    args += ["--workers", "0", "--threads", "1", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "unseen mAP@all=" in res.output
    assert (out / "checkpoint.safetensors").exists() and (out / "checkpoint.json").exists()
    cfg = json.loads((out / "checkpoint.json").read_text())
    assert cfg["train"]["command"].startswith("zsbir train")
    bad = CliRunner().invoke(main, [*args[:6], str(tmp_path / "other"), *args[7:], "--resume"])
    assert bad.exit_code != 0 and "no resume state" in bad.output
    bad = CliRunner().invoke(main, ["train", "--method", "foo", "--data", str(tiny_data), "--out", str(out)])
    assert bad.exit_code == 2 and "foo" in bad.output


def test_cli_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, zsbir_export.cli.train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_parts_and_parts_loss() -> None:
    names, index = parse_parts(["ring-3-a", "hex-3-b", "ring-4-a"])
    assert names == ["0:hex", "0:ring", "1:3", "1:4", "2:a", "2:b"]
    assert index == [[1, 2, 4], [0, 2, 5], [1, 3, 4]]
    assert _slices(names) == [(0, 2), (2, 4), (4, 6)]
    assert _slices(["cat", "dog"]) == []
    # uniform logits: each field contributes ln 2
    logits = torch.zeros(3, 6)
    got = parts_loss(logits, torch.tensor(index), _slices(names))
    assert got.item() == pytest.approx(float(np.log(2.0)))
    # a confident correct prediction in every field -> ~0
    sure = torch.full((3, 6), -20.0)
    for r, idx in enumerate(index):
        sure[r, idx] = 20.0
    assert parts_loss(sure, torch.tensor(index), _slices(names)).item() < 1e-6
    with pytest.raises(ValueError, match="compositional"):
        parse_parts(["cat", "dog-x"])


def test_class_pretraining_option(tiny_data: Path, tmp_path: Path) -> None:
    run = _Run(_cfg(tiny_data, tmp_path, method="none", pretrain_labels="class"), _quiet)
    res = run.step(run.batches[0])
    assert set(res) - {"loss", "acc"} == {"ce", "ce_teacher_head"}
    assert run.teacher_classes == open_benchmark(tiny_data).seen_classes


def test_hold_out_classes_is_deterministic_disjoint_and_relabelled(tiny_data: Path) -> None:
    from zsbir_export.train import hold_out_classes

    seen = open_benchmark(tiny_data).split("seen")
    tr, val = hold_out_classes(seen, 1, seed=5)
    tr2, val2 = hold_out_classes(seen, 1, seed=5)
    assert val.classes == val2.classes and tr.classes == tr2.classes
    assert len(val.classes) == 1 and sorted(tr.classes + val.classes) == seen.classes
    for part in (tr, val):
        for s in part.photos + part.sketches:
            assert part.classes[s.label] == s.class_name
    assert len(tr.photos) + len(val.photos) == len(seen.photos)
    assert len(tr.sketches) + len(val.sketches) == len(seen.sketches)
    others = {tuple(hold_out_classes(seen, 1, seed=s)[1].classes) for s in range(20)}
    assert len(others) > 1  # the seed picks the classes
    with pytest.raises(ValueError, match="val-classes"):
        hold_out_classes(seen, len(seen.classes) - 1, seed=0)


def test_validation_on_held_out_seen_classes(tiny_data: Path, tmp_path: Path) -> None:
    from zsbir_export.checkpoints import load_checkpoint

    pre = train(_cfg(tiny_data, tmp_path / "pre", method="none", epochs=1, val_classes=1), log=_quiet)
    run = train(_cfg(tiny_data, tmp_path / "t", epochs=2, val_classes=1, pretrained=str(pre.checkpoint)), log=_quiet)
    held = run.metrics["val_classes"]
    assert len(held) == 1 and 0 <= run.metrics["val"]["map_all"] <= 1
    assert all("val" in h and "unseen" not in h for h in run.history)  # unseen is not looked at while training
    assert "map_all" in run.metrics["unseen"]  # ... but evaluated once at the end
    cfg = load_checkpoint(run.checkpoint).config
    assert held[0] not in cfg["class_names"] and len(cfg["class_names"]) == 3
    assert cfg["train"]["benchmark"]["val"] == 1
    # a pre-training run that saw the held-out classes is refused (it would leak them)
    leaky = train(_cfg(tiny_data, tmp_path / "leaky", method="none", epochs=1), log=_quiet)
    with pytest.raises(ValueError, match="held-out validation"):
        train(_cfg(tiny_data, tmp_path / "t2", epochs=1, val_classes=1, pretrained=str(leaky.checkpoint)), log=_quiet)
