"""Tests for zsbir_export.checkpoints: our safetensors+JSON format and official DSN/SAKE model_best.pth.tar."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

import torch
from zsbir_export.checkpoints import (
    OFFICIAL_PREPROCESS,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)
from zsbir_export.models import EmbeddingModel, EmbeddingNet, build_model, cse_resnet, resnet18
from zsbir_export.models.cse_resnet import CSEResNetModel

pytestmark = pytest.mark.torch


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial batch-norm statistics, so that a buffer that fails to load changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(7)


def _save_official(model: torch.nn.Module, path: Path, legacy: bool = False, **extra: object) -> None:
    """Save like the official train_cse_resnet_*_ext.py: DataParallel keys, epoch/arch/best_acc1/optimizer."""
    dp = torch.nn.DataParallel(model)  # on CPU this only wraps: keys get the 'module.' prefix
    optimizer = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=0.9)
    state = {
        "epoch": 12,
        "arch": "cse_resnet50",
        "state_dict": dp.state_dict(),
        "best_acc1": torch.tensor(87.5),
        "optimizer": optimizer.state_dict(),
        **extra,
    }
    assert next(iter(state["state_dict"])).startswith("module.original_model.")  # type: ignore[call-overload]
    torch.save(state, str(path), _use_new_zipfile_serialization=not legacy)


def _small_cse(**kw: object) -> CSEResNetModel:
    torch.manual_seed(0)
    args: dict = {"width": 8, "embed_dim": 16, "num_classes": 5}
    args.update(kw)
    model = cse_resnet("cse_resnet50", **args).eval()
    _randomize(model)
    return model


X = torch.Generator().manual_seed(1)
IMGS = torch.randn(2, 3, 64, 64, generator=X)
TAGS = torch.tensor([1, 0])


# ------------------------------------------------------------------------------------------ our format


@pytest.mark.parametrize("kind", ["plain", "cse"])
def test_our_format_round_trip(tmp_path: Path, kind: str) -> None:
    if kind == "plain":
        model: EmbeddingModel = EmbeddingNet("resnet18", width=8, embed_dim=16, num_classes=3).eval()
    else:
        model = build_model({"backbone": "cse_resnet18", "width": 8, "embed_dim": 16, "num_classes": 3}).eval()
    _randomize(model)
    cfg = {
        "method": "tursun",
        "class_names": ["a", "b", "c"],
        "train": {"seed": 3, "lr": 0.01},
        "metrics": {"map": 0.5},
    }
    w, j = save_checkpoint(model, cfg, tmp_path / "ckpt")
    assert (w.name, j.name) == ("ckpt.safetensors", "ckpt.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]  # no temp files left
    stored = json.loads(j.read_text())
    assert stored["format"] == "zsbir-checkpoint" and stored["version"] == 1
    assert stored["arch"] == model.arch_config()
    assert stored["preprocess"] == {"photo": OFFICIAL_PREPROCESS, "sketch": OFFICIAL_PREPROCESS}
    assert stored["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    with torch.no_grad():
        expected = model.embed(IMGS, TAGS)
    for name in (w, j, tmp_path / "ckpt"):
        loaded = load_checkpoint(name)
        assert loaded.source_format == "zsbir"
        assert loaded.sha256 == stored["weights_sha256"]
        assert not loaded.model.training
        assert loaded.config["class_names"] == ["a", "b", "c"] and loaded.config["train"]["seed"] == 3
        with torch.no_grad():
            assert torch.equal(loaded.model.embed(IMGS, TAGS), expected)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v), k
    # Saving again over an existing pair replaces it.
    save_checkpoint(model, {**cfg, "metrics": {"map": 0.7}}, j)
    assert load_checkpoint(w).config["metrics"] == {"map": 0.7}


def test_save_checkpoint_validates(tmp_path: Path) -> None:
    model = EmbeddingNet("resnet18", width=4, embed_dim=8, num_classes=3)
    with pytest.raises(ValueError, match="2 class names for a classifier over 3 classes"):
        save_checkpoint(model, {"class_names": ["a", "b"]}, tmp_path / "x")
    with pytest.raises(ValueError, match="does not describe the model"):
        save_checkpoint(model, {"arch": {"backbone": "resnet50"}}, tmp_path / "x")
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(model, {"train": {"path": Path("x")}}, tmp_path / "x")
    with pytest.raises(TypeError, match="arch_config"):
        save_checkpoint(resnet18(width=4), {}, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        save_checkpoint(model, {}, tmp_path / "nope" / "x")
    assert list(tmp_path.iterdir()) == []
    assert checkpoint_paths("a/b.json") == (Path("a/b.safetensors"), Path("a/b.json"))


def test_our_format_errors(tmp_path: Path) -> None:
    model = EmbeddingNet("resnet18", width=4, embed_dim=8, num_classes=3)
    w, j = save_checkpoint(model, {}, tmp_path / "m")

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "other.pth.tar")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "other")

    # Wrong architecture: the config claims another backbone.
    cfg = json.loads(j.read_text())
    cfg["arch"]["backbone"] = "resnet34"
    j.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not fit the architecture.*missing key\(s\): backbone\.layer1\.2\."):
        load_checkpoint(j)
    cfg["arch"]["backbone"] = "resnet18"
    cfg["arch"]["embed_dim"] = 9
    j.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*embedding\.weight \(file \(8, 32\), model \(9, 32\)\)"):
        load_checkpoint(j)
    cfg["arch"]["embed_dim"] = 8
    cfg["arch"]["backbone"] = "alexnet"
    j.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bad 'arch' block: unknown backbone 'alexnet'"):
        load_checkpoint(j)
    cfg["arch"]["backbone"] = "resnet18"
    cfg["version"] = 99
    j.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(j)
    cfg["version"] = 1
    j.write_text(json.dumps(cfg))
    load_checkpoint(j)  # repaired

    # Truncated weights: caught by the recorded SHA-256, and by safetensors when no hash is recorded.
    full = w.read_bytes()
    w.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated, modified"):
        load_checkpoint(w)
    del cfg["weights_sha256"]
    j.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(w)

    # Half of the pair missing.
    w.unlink()
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_checkpoint(j)
    j.unlink()
    w.write_bytes(full)
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_checkpoint(w)

    # Not a checkpoint at all.
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a zsbir checkpoint config"):
        load_checkpoint(bad)
    bad.write_text("{oops")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(bad)
    txt = tmp_path / "readme.txt"
    txt.write_text("just text")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(txt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------- official files


def test_official_dsn_checkpoint_round_trip_at_224(tmp_path: Path) -> None:
    # The official architecture at full size: CSE-ResNet-50, 64-d, 100 Sketchy training classes.
    torch.manual_seed(0)
    model = cse_resnet("cse_resnet50", embed_dim=64, num_classes=100).eval()
    _randomize(model)
    # DSN's default save folder (it mentions "sake" too).
    path = (
        tmp_path
        / "sketchy_kd(1.0)_kdneg(0.3)_sake(1.0)_dim(64)_contrastive(128-0.1)_T(0.07)_memory(10-1.0)"
        / "model_best.pth.tar"
    )
    path.parent.mkdir()
    _save_official(model, path)
    loaded = load_checkpoint(path)
    assert loaded.source_format == "dsn"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = loaded.config
    assert cfg["method"] == "dsn"
    assert cfg["arch"] == {
        "backbone": "cse_resnet50",
        "width": 64,
        "embed_dim": 64,
        "domain_conditioned": True,
        "num_classes": 100,
        "imagenet_head": True,
        "imagenet_classes": 1000,
        "reduction": 16,
    }
    assert cfg["preprocess"]["photo"] == cfg["preprocess"]["sketch"] == OFFICIAL_PREPROCESS
    assert cfg["preprocess"]["sketch"]["size"] == [224, 224] and cfg["preprocess"]["sketch"]["resize"] == "squash"
    assert cfg["domain_tags"] == {"photo": 1, "sketch": 0}
    assert cfg["source"]["epoch"] == 12 and cfg["source"]["best_acc1"] == pytest.approx(87.5)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for tags in (torch.tensor([1, 0]), torch.tensor([0, 1])):
            assert torch.equal(loaded.model.embed(x, tags), model.embed(x, tags))
    assert json.dumps(cfg)  # the config is JSON-serialisable (export writes it into the manifest)


def test_official_sake_legacy_serialization_and_label(tmp_path: Path) -> None:
    # SAKE (2019) checkpoints were written by PyTorch 1.x: the legacy (non-zip) format; old BN layers
    # had no num_batches_tracked buffer.
    model = _small_cse()
    dp_state = {"module." + k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "sake_sketchy" / "model_best.pth.tar"
    path.parent.mkdir()
    torch.save({"epoch": 3, "arch": "cse_resnet50", "state_dict": dp_state, "best_acc1": 50.0}, str(path),
               _use_new_zipfile_serialization=False)  # fmt: skip
    assert path.read_bytes()[:1] == b"\x80"
    loaded = load_checkpoint(path)
    assert loaded.source_format == "sake"
    assert loaded.config["arch"]["width"] == 8 and loaded.config["arch"]["embed_dim"] == 16
    with torch.no_grad():
        assert torch.equal(loaded.model.embed(IMGS, TAGS), model.embed(IMGS, TAGS))
    # The label can be forced: the keys of DSN and SAKE hashing checkpoints are identical.
    assert load_checkpoint(path, official_format="dsn").source_format == "dsn"
    with pytest.raises(ValueError, match="official_format"):
        load_checkpoint(path, official_format="other")


def test_official_sake_kd_layout_without_hashing_layer(tmp_path: Path) -> None:
    model = _small_cse(embed_dim=None)  # CSEResnetModel_KD: embedding = pooled features
    assert "original_model.second_last_linear.weight" not in model.state_dict()
    path = tmp_path / "model_best.pth.tar"
    _save_official(model, path)
    loaded = load_checkpoint(path)
    assert loaded.source_format == "sake"
    assert loaded.config["arch"]["embed_dim"] is None
    with torch.no_grad():
        e = loaded.model.embed(IMGS, TAGS)
        assert e.shape == (2, 8 * 8 * 4)
        assert torch.equal(e, model.embed(IMGS, TAGS))


def test_official_ems_classifier_is_dropped(tmp_path: Path) -> None:
    model = _small_cse()
    dp = {"module." + k: v for k, v in model.state_dict().items() if not k.startswith("linear.")}
    dp["module.linear.cpars"] = torch.randn(5, 16)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": dp}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.config["arch"]["num_classes"] == 0
    assert any("linear.cpars" in n for n in loaded.config["source"]["notes"])
    with torch.no_grad():
        assert torch.equal(loaded.model.embed(IMGS, TAGS), model.embed(IMGS, TAGS))


def test_official_checkpoint_errors(tmp_path: Path) -> None:
    model = _small_cse()
    sd = {"module." + k: v for k, v in model.state_dict().items()}

    # Truncated zip and truncated legacy pickle.
    good = tmp_path / "model_best.pth.tar"
    _save_official(model, good)
    trunc = tmp_path / "trunc.pth.tar"
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(trunc)
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": sd}, str(legacy), _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(legacy)

    # A pickle holding other objects is refused, not executed.
    unsafe = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": sd, "args": Path("/x")}, str(unsafe))
    with pytest.raises(CheckpointError, match=r"needs code execution to load and is refused") as info:
        load_checkpoint(unsafe)
    assert "pathlib.PosixPath" in str(info.value)
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"a": Path("/x")}, protocol=2))
    with pytest.raises(CheckpointError, match=r"needs code execution|corrupt"):
        load_checkpoint(raw_pickle)

    # Wrong architecture: a tensor of the wrong shape, a missing tensor, an extra tensor.
    bad = dict(sd)
    bad["module.original_model.layer2.0.se_module.fc2.bias"] = torch.zeros(3)
    p = tmp_path / "shape.pth.tar"
    torch.save({"state_dict": bad}, str(p))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch.*layer2\.0\.se_module\.fc2\.bias \(file \(3,\), model \(64,\)\)"
    ):
        load_checkpoint(p)
    bad = {k: v for k, v in sd.items() if "layer3.1.conv2" not in k}
    torch.save({"state_dict": bad}, str(p))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): original_model\.layer3\.1\.conv2\.weight"):
        load_checkpoint(p)
    bad = {**sd, "module.projector.weight": torch.zeros(4, 4)}
    torch.save({"state_dict": bad}, str(p))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): projector\.weight"):
        load_checkpoint(p)
    bad = {k: v for k, v in sd.items() if ".layer4.2." not in k}
    torch.save({"state_dict": bad}, str(p))
    with pytest.raises(CheckpointError, match=r"blocks per stage \[3, 4, 6, 2\] is not a supported depth"):
        load_checkpoint(p)

    # DSN's spatial-gate variants are refused by name.
    sse = {**sd, "module.original_model.layer1.0.se_module.conv1.weight": torch.zeros(1, 1, 3, 3)}
    torch.save({"state_dict": sse}, str(p))
    with pytest.raises(CheckpointError, match="spatial gates"):
        load_checkpoint(p)

    # A torchvision ImageNet file, or an unrelated state dict, is not a ZS-SBIR checkpoint.
    tv = tmp_path / "resnet18.pth"
    torch.save(resnet18(width=4).state_dict(), str(tv))
    with pytest.raises(CheckpointError, match="plain torchvision-style ResNet"):
        load_checkpoint(tv)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, str(other))
    with pytest.raises(CheckpointError, match=r"not a recognised checkpoint.*encoder\.weight"):
        load_checkpoint(other)
    scalar = tmp_path / "scalar.pth"
    torch.save(torch.zeros(3), str(scalar))
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_checkpoint(scalar)


class _TrainingArgs:
    """A custom class: unpickling an instance of it needs code execution (importing and building it)."""

    def __init__(self) -> None:
        self.lr = 0.1


def _refusal(path: Path, what: str) -> str:
    return (
        f"{path} needs code execution to load and is refused: it is a pickle that holds Python objects other "
        f"than tensors and plain containers{what}, and zsbir reads torch.save files only with "
        f"torch.load(weights_only=True), which runs no code. (A damaged file can look the same.) "
        f"If you trust the file, convert it once: in a trusted Python session run "
        f"ckpt = torch.load(PATH, map_location='cpu', weights_only=False) and re-save its state dict with "
        f"torch.save({{'state_dict': ckpt['state_dict']}}, 'converted.pth.tar') "
        f"(or torch.save(model.state_dict(), ...) if it holds a whole model), "
        f"then run zsbir export converted.pth.tar."
    )


def test_checkpoint_needing_code_execution_is_refused_with_the_whole_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 11: the refusal is complete and does not depend on torch's wording (changed in 2.13)."""
    model = _small_cse()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd, "args": _TrainingArgs()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    name = f"{_TrainingArgs.__module__}.{_TrainingArgs.__qualname__}"
    assert str(info.value) == _refusal(path, f" (it asks for {name})")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)

    # The same file converted as the message says loads.
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    converted = tmp_path / "converted.pth.tar"
    torch.save({"state_dict": ckpt["state_dict"]}, str(converted))
    assert load_checkpoint(converted).config["arch"] == model.arch_config()

    # Any other wording of torch's refusal (an UnpicklingError, or a RuntimeError about weights_only
    # as older versions raised) gives the same whole message; no name is invented when none is given.
    real_load = torch.load
    for exc in (
        pickle.UnpicklingError("Refused: this checkpoint uses a type that is not on the allowlist."),
        RuntimeError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False`"),
    ):

        def fake_load(*args: object, _exc: BaseException = exc, **kwargs: object) -> object:
            assert kwargs.get("weights_only") is True
            raise _exc

        monkeypatch.setattr(torch, "load", fake_load)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == _refusal(path, "")
        monkeypatch.setattr(torch, "load", real_load)
