"""Training strategies and teachers: the registry, the per-class ImageNet teacher, DSN on EfficientNet-Lite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from zsbir_export import losses as L  # noqa: E402
from zsbir_export.models.efficientnet import EfficientNetLite  # noqa: E402
from zsbir_export.train import METHODS, Method, TrainConfig, register, train  # noqa: E402
from zsbir_export.train.loop import _Run  # noqa: E402
from zsbir_export.train.methods import StepInput  # noqa: E402
from zsbir_export.train.teacher import ImageNetTeacher, is_imagenet_file, open_start  # noqa: E402

from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic  # noqa: E402

pytestmark = pytest.mark.torch

TINY = {"size": 32, "embed_dim": 16, "batch_size": 8, "per_class": 1, "threads": 1, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(classes=6, unseen=2, photos_per_class=4, sketches_per_class=4, size=48, seed=3)
    generate_synthetic(root, cfg, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-style EfficientNet-Lite0 state dict (random weights with non-trivial BN statistics)."""
    torch.manual_seed(1)
    net = EfficientNetLite()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("imagenet") / "efficientnet-lite0-test.pth"
    torch.save(net.state_dict(), path)
    return path


def _cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    args: dict[str, Any] = {"method": "tursun", "data": str(data), "out": str(out), "epochs": 1, "max_batches": 2}
    args.update(TINY, backbone="efficientnet_lite0")
    args.update(kw)
    return TrainConfig(**args)


def _quiet(_: str) -> None:
    pass


def test_registry_lists_the_methods_and_their_settings() -> None:
    assert {"tursun", "dsn", "none"} <= set(METHODS)
    assert METHODS["dsn"].domain_conditioned and METHODS["dsn"].online_teacher and METHODS["dsn"].hashing
    assert not METHODS["tursun"].online_teacher and METHODS["none"].domains == ("photo",)
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="nope", data=".", out=".").validate()
    with pytest.raises(ValueError, match="--ablation applies to"):
        TrainConfig(method="none", data=".", out=".", ablation=True).validate()


def test_imagenet_files_are_recognised(imagenet_file: Path, tmp_path: Path) -> None:
    assert is_imagenet_file(imagenet_file)
    other = tmp_path / "x.pth"
    torch.save({"foo": torch.zeros(1)}, other)
    assert not is_imagenet_file(other) and not is_imagenet_file(tmp_path / "missing.pth")
    start = open_start(str(imagenet_file), "efficientnet_lite0", 64)
    assert start.kind == "imagenet" and start.backbone_only and len(start.teacher_classes) == 1000
    assert start.student_state is not None and all(k.startswith("backbone.") for k in start.student_state)
    with pytest.raises(ValueError, match="ImageNet initialisation needs"):
        open_start(str(imagenet_file), "cse_resnet18", 64)
    with pytest.raises(FileNotFoundError, match="no ImageNet weights are packaged for resnet18"):
        open_start("imagenet", "resnet18", 64)


def test_tursun_teacher_is_the_imagenet_classifier_prepared_once_per_class(
    tiny_data: Path, imagenet_file: Path, tmp_path: Path
) -> None:
    run = _Run(_cfg(tiny_data, tmp_path, pretrained=str(imagenet_file)), _quiet)
    # the student's backbone is the ImageNet network; its heads are new
    net = EfficientNetLite()
    net.load_state_dict(torch.load(imagenet_file, weights_only=True))
    assert torch.equal(run.model.backbone._conv_stem.weight, net._conv_stem.weight)  # type: ignore[union-attr]
    # class-oriented targets = mean softmax of the ImageNet classifier over each class's training photos
    teacher = ImageNetTeacher(net)
    logits = torch.cat([teacher.logits(x, torch.ones(x.shape[0])) for x in _eval_batches(run, run.seen.photos)])
    labels = torch.tensor([s.label for s in run.seen.photos])
    expected = L.class_mean_soft_targets(logits, labels, len(run.seen.classes), run.cfg.tursun.temperature)
    targets = run.method.kp_targets  # type: ignore[attr-defined]
    assert targets.shape == (len(run.seen.classes), 1000)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert run.teacher is None  # prepared before training, then freed: no online teacher
    before = targets.clone()
    for _ in range(2):
        res = run.step(run.batches[0])
    assert set(res) - {"loss", "acc"} == {"ce", "quad", "kp"}
    assert torch.equal(run.method.kp_targets, before)  # type: ignore[attr-defined]


def _eval_batches(run: _Run, samples: list[Any]) -> list[Any]:
    from zsbir_export.train.data import iter_eval_batches

    return list(iter_eval_batches(samples, run.spec, run.cache, 128))


def test_dsn_on_efficientnet_with_imagenet_teacher(tiny_data: Path, imagenet_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_data, tmp_path, method="dsn", pretrained=str(imagenet_file), itq_bits=8, lr=1e-4)
    run = _Run(cfg, _quiet)
    for block in run.model.backbone._blocks:  # type: ignore[union-attr]
        block.drop_rate = 0.0  # the same batch twice must give a smaller loss: no stochastic depth
    assert run.model.arch_config()["domain_conditioned"] is True  # type: ignore[operator]
    assert isinstance(run.teacher, ImageNetTeacher)
    mask = run.method.class_mask  # type: ignore[attr-defined]
    assert mask.shape == (len(run.seen.classes), 1000) and (mask.sum(1) == 5).all()
    first = run.step(run.batches[0])
    assert set(first) - {"loss", "acc"} == {"ce", "kd", "con", "mem"}
    second = run.step(run.batches[0])
    assert second["loss"] < first["loss"]


def test_resume_from_imagenet_is_exact(tiny_data: Path, imagenet_file: Path, tmp_path: Path) -> None:
    kw = {"pretrained": str(imagenet_file), "epochs": 2, "freeze": 3, "backbone_lr": 0.1}
    straight = train(_cfg(tiny_data, tmp_path / "a", **kw), log=_quiet)
    train(_cfg(tiny_data, tmp_path / "b", **kw), stop_after=1, log=_quiet)
    resumed = train(_cfg(tiny_data, tmp_path / "b", **kw), resume=True, log=_quiet)
    assert straight.metrics["unseen"]["map_all"] == resumed.metrics["unseen"]["map_all"]
    sa = torch.load(straight.run_dir / "resume.pt", weights_only=True)
    sb = torch.load(resumed.run_dir / "resume.pt", weights_only=True)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    # frozen blocks kept their ImageNet weights and batch-norm statistics
    net = torch.load(imagenet_file, weights_only=True)
    for k in ("_conv_stem.weight", "_blocks.2._bn1.running_mean", "_blocks.2._depthwise_conv.weight"):
        assert torch.equal(sa["model"][f"backbone.{k}"], net[k]), k
    assert not torch.equal(sa["model"]["backbone._blocks.3._bn1.weight"], net["_blocks.3._bn1.weight"])
    with pytest.raises(ValueError, match=r"cannot resume.*freeze"):
        train(_cfg(tiny_data, tmp_path / "b", **{**kw, "freeze": 2}), resume=True, log=_quiet)


def test_a_registered_method_runs_in_the_loop(tiny_data: Path, tmp_path: Path) -> None:
    @register("toy")
    class Toy(Method):
        needs_teacher = False

        def losses(self, step: StepInput) -> tuple[dict[str, Any], Any]:
            out = self.ctx.model(step.x, step.tag)
            logits = self.ctx.model.classifier(out.embedding)  # type: ignore[operator]
            return {"toy_ce": torch.nn.functional.cross_entropy(logits, step.y)}, logits

    try:
        result = train(_cfg(tiny_data, tmp_path, method="toy"), log=_quiet)
        assert "toy_ce" in result.history[-1] and result.metrics["unseen"]["map_all"] > 0
    finally:
        del METHODS["toy"]
