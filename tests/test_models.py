"""Tests for zsbir_export.models: torchvision-compatible ResNets, CSE-ResNet (DSN/SAKE), embedding models."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F
from zsbir_export.models import EmbeddingNet, ModelOutput, build_model, cse_resnet
from zsbir_export.models.cse_resnet import CSEResNetModel
from zsbir_export.models.resnet import (
    PretrainedLoadError,
    build_resnet,
    load_pretrained,
    resnet18,
    resnet34,
    resnet50,
)

pytestmark = pytest.mark.torch


def _expected_torchvision_keys(kind: str, layers: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """torchvision's ResNet state-dict layout, written out from the published architecture."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        out[f"{prefix}.weight"] = (c,)
        out[f"{prefix}.bias"] = (c,)
        out[f"{prefix}.running_mean"] = (c,)
        out[f"{prefix}.running_var"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    out["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    expansion = 1 if kind == "basic" else 4
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            if kind == "basic":
                out[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                out[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                out[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            if i == 0 and (stage > 1 or inplanes != planes * expansion):
                out[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    out["fc.weight"] = (1000, 512 * expansion)
    out["fc.bias"] = (1000,)
    return out


@pytest.mark.parametrize(
    ("name", "kind", "layers", "params", "n_keys"),
    [
        ("resnet18", "basic", (2, 2, 2, 2), 11_689_512, 122),
        ("resnet34", "basic", (3, 4, 6, 3), 21_797_672, 218),
        ("resnet50", "bottleneck", (3, 4, 6, 3), 25_557_032, 320),
    ],
)
def test_resnet_matches_torchvision_layout(
    name: str, kind: str, layers: tuple[int, ...], params: int, n_keys: int
) -> None:
    model = build_resnet(name)
    sd = model.state_dict()
    expected = _expected_torchvision_keys(kind, layers)
    assert list(sd) == list(expected)  # same names, same order as torchvision
    assert len(sd) == n_keys
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet_forward_shapes_and_width() -> None:
    torch.manual_seed(0)
    small = resnet18(width=16, num_classes=10).eval()
    assert small.feature_dim == 128
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert small(x).shape == (2, 10)
        assert small.features(x).shape == (2, 128)
    n = sum(p.numel() for p in small.parameters())
    # Convolutions scale with width^2: the 16-wide net is ~1/16 of the 64-wide trunk.
    assert 600_000 < n < 800_000
    assert resnet50(width=8, num_classes=None).feature_dim == 8 * 8 * 4
    headless = resnet34(width=8, num_classes=None).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, 64)
    assert not any(k.startswith("fc.") for k in headless.state_dict())


def test_resnet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown ResNet"):
        build_resnet("resnet101")
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)


def test_load_pretrained_round_trip_and_prefixes(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = resnet18(width=8, num_classes=5)
    # Make batch-norm statistics non-trivial so a skipped buffer would show.
    src.train()
    with torch.no_grad():
        src(torch.randn(4, 3, 64, 64))
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    dst = resnet18(width=8, num_classes=5)
    assert load_pretrained(dst, path) == []
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, wrapped)
    dst2 = resnet18(width=8, num_classes=5)
    load_pretrained(dst2, wrapped)
    assert torch.equal(dst2.state_dict()["layer4.1.bn2.running_var"], src.state_dict()["layer4.1.bn2.running_var"])

    # The head can be skipped when the model has another number of classes.
    headless = resnet18(width=8, num_classes=None)
    load_pretrained(headless, path, skip_fc=True)
    assert torch.equal(headless.conv1.weight, src.conv1.weight)


def test_load_pretrained_errors(tmp_path: Path) -> None:
    src = resnet18(width=8, num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)

    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(resnet18(width=8, num_classes=5), tmp_path / "nope.pth")

    with pytest.raises(PretrainedLoadError, match=r"shape mismatch.*conv1\.weight: file \(8, 3, 7, 7\) vs model \(16"):
        load_pretrained(resnet18(width=16, num_classes=5), path)

    # Wrong depth: resnet34 has blocks (layer1.2, layer2.2, ...) the resnet18 file lacks.
    with pytest.raises(PretrainedLoadError, match=r"96 missing key\(s\): layer1\.2\.conv1\.weight"):
        load_pretrained(resnet34(width=8, num_classes=5), path)

    with pytest.raises(PretrainedLoadError, match=r"unexpected key.*fc\.weight"):
        load_pretrained(resnet18(width=8, num_classes=None), path)

    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PretrainedLoadError, match="cannot read"):
        load_pretrained(resnet18(width=8, num_classes=5), truncated)

    unsafe = tmp_path / "unsafe.pth"
    with unsafe.open("wb") as f:
        pickle.dump({"state_dict": src.state_dict(), "cfg": Path("x")}, f, protocol=2)
    with pytest.raises(PretrainedLoadError, match="unsafe"):
        load_pretrained(resnet18(width=8, num_classes=5), unsafe)


# ----------------------------------------------------------------------------------------- CSE-ResNet


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics and affine parameters (so eval mode matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def official_reference(
    sd: dict[str, torch.Tensor], x: torch.Tensor, tag: torch.Tensor, pool7: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional re-statement of the official ``CSENet_hashing`` forward (eval mode) from its weights.

    Written from the published structure: layer0 = 7x7/2 conv, BN, ReLU, 3x3/2 max-pool with
    ceil_mode and no padding; bottlenecks stride their first 1x1 conv; the SE excitation sees
    ``cat(relu(fc1(avg)), tag)``; ``pool7`` uses the official fixed ``AvgPool2d(7, stride=1)``.
    Returns (L2-normalized 64-d code, pooled features).
    """
    p = "original_model."

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            t, sd[f"{p}{name}.running_mean"], sd[f"{p}{name}.running_var"], sd[f"{p}{name}.weight"],
            sd[f"{p}{name}.bias"], False, 0.0, 1e-5,
        )  # fmt: skip

    tagc = tag.reshape(-1, 1).float()
    h = F.relu(bn(F.conv2d(x, sd[p + "layer0.conv1.weight"], stride=2, padding=3), "layer0.bn1"))
    h = F.max_pool2d(h, 3, 2, ceil_mode=True)
    for s in range(1, 5):
        i = 0
        while f"{p}layer{s}.{i}.conv1.weight" in sd:
            b = f"layer{s}.{i}"
            stride = 2 if (s > 1 and i == 0) else 1
            if f"{p}{b}.conv3.weight" in sd:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}{b}.conv1.weight"], stride=stride), f"{b}.bn1"))
                o = F.relu(bn(F.conv2d(o, sd[f"{p}{b}.conv2.weight"], padding=1), f"{b}.bn2"))
                o = bn(F.conv2d(o, sd[f"{p}{b}.conv3.weight"]), f"{b}.bn3")
            else:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}{b}.conv1.weight"], stride=stride, padding=1), f"{b}.bn1"))
                o = bn(F.conv2d(o, sd[f"{p}{b}.conv2.weight"], padding=1), f"{b}.bn2")
            se = f"{p}{b}.se_module"
            z = F.relu(F.linear(o.mean((2, 3)), sd[se + ".fc1.weight"], sd[se + ".fc1.bias"]))
            gate = torch.sigmoid(F.linear(torch.cat([z, tagc], 1), sd[se + ".fc2.weight"], sd[se + ".fc2.bias"]))
            o = o * gate[:, :, None, None]
            if f"{p}{b}.downsample.0.weight" in sd:
                res = bn(F.conv2d(h, sd[f"{p}{b}.downsample.0.weight"], stride=stride), f"{b}.downsample.1")
            else:
                res = h
            h = F.relu(o + res)
            i += 1
    pooled = F.avg_pool2d(h, 7, stride=1).flatten(1) if pool7 else h.mean((2, 3))
    code = F.linear(pooled, sd[p + "second_last_linear.weight"], sd[p + "second_last_linear.bias"])
    return F.normalize(code), pooled


def _expected_cse50_keys(embed_dim: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The official CSEResnetModel_KDHashing layout (module names of DSN's senet.py/ResnetModel.py)."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{n}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    o = "original_model."
    out[o + "layer0.conv1.weight"] = (64, 3, 7, 7)
    bn(o + "layer0.bn1", 64)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), start=1):
        for i in range(n):
            b = f"{o}layer{stage}.{i}"
            out[f"{b}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{b}.bn1", planes)
            out[f"{b}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{b}.bn2", planes)
            out[f"{b}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{b}.bn3", planes * 4)
            c = planes * 4
            out[f"{b}.se_module.fc1.weight"] = (c // 16, c)
            out[f"{b}.se_module.fc1.bias"] = (c // 16,)
            out[f"{b}.se_module.fc2.weight"] = (c, c // 16 + 1)
            out[f"{b}.se_module.fc2.bias"] = (c,)
            if i == 0:
                out[f"{b}.downsample.0.weight"] = (c, inplanes, 1, 1)
                bn(f"{b}.downsample.1", c)
            inplanes = c
    out[o + "second_last_linear.weight"] = (embed_dim, 2048)
    out[o + "second_last_linear.bias"] = (embed_dim,)
    out[o + "last_linear.weight"] = (1000, embed_dim)
    out[o + "last_linear.bias"] = (1000,)
    out["linear.weight"] = (num_classes, embed_dim)
    out["linear.bias"] = (num_classes,)
    return out


def test_cse_resnet50_matches_official_layout() -> None:
    model = cse_resnet("cse_resnet50", embed_dim=64, num_classes=100)
    sd = model.state_dict()
    expected = _expected_cse50_keys(64, 100)
    assert sorted(sd) == sorted(expected)
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # SE-ResNet-50 (ImageNet, 1000 classes) has 28,088,024 parameters. The official CSE model drops its
    # 2048x1000 head (-2,049,000), adds one tag column to every fc2 (+sum of block widths:
    # 3*256 + 4*512 + 6*1024 + 3*2048 = 15,104), the 64-d layer (2048*64+64 = 131,136), ImageNet logits
    # from it (64*1000+1000 = 65,000) and the 100-class classifier (64*100+100 = 6,500).
    n = sum(p.numel() for p in model.parameters())
    assert n == 28_088_024 - 2_049_000 + 15_104 + 131_136 + 65_000 + 6_500 == 26_256_764


@pytest.mark.parametrize(("depth", "width", "size"), [("cse_resnet18", 8, 64), ("cse_resnet50", 8, 80)])
def test_cse_matches_functional_reference(depth: str, width: int, size: int) -> None:
    torch.manual_seed(0)
    model = cse_resnet(depth, width=width, embed_dim=16, num_classes=7).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, size, size)
    sd = model.state_dict()
    with torch.no_grad():
        for tags in (torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 1])):
            ref, pooled = official_reference(sd, x, tags)
            out = model(x, tags)
            assert isinstance(out, ModelOutput)
            torch.testing.assert_close(model.embed(x, tags), ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.features, pooled, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(F.normalize(out.embedding), ref, rtol=1e-4, atol=1e-5)
            assert out.logits is not None and out.logits.shape == (2, 7)
            assert out.imagenet_logits is not None and out.imagenet_logits.shape == (2, 1000)
        # The tag is an input: the same images embed differently as photos and as sketches.
        photo = model.embed(x, torch.ones(2, dtype=torch.long))
        sketch = model.embed(x, torch.zeros(2, dtype=torch.long))
        assert not torch.allclose(photo, sketch, atol=1e-4)
        # [N] int64 and the official [N, 1] float column give the same result.
        torch.testing.assert_close(model.embed(x, torch.ones(2, 1)), photo)
        norms = photo.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(2))


def test_cse_resnet50_at_224_equals_official_fixed_pooling() -> None:
    # The only full-size test: at 224x224 our adaptive pooling equals the official AvgPool2d(7).
    torch.manual_seed(3)
    model = cse_resnet("cse_resnet50").eval()
    randomize_batchnorm(model, seed=3)
    x = torch.randn(2, 3, 224, 224)
    tags = torch.tensor([1, 0])
    with torch.no_grad():
        ref, _ = official_reference(model.state_dict(), x, tags, pool7=True)
        torch.testing.assert_close(model.embed(x, tags), ref, rtol=1e-4, atol=1e-5)


def test_cse_rejects_bad_tags() -> None:
    model = cse_resnet("cse_resnet18", width=4, embed_dim=8, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        model.embed(x, torch.tensor([1, 0, 1]))
    with pytest.raises(TypeError, match="tag must be a tensor"):
        model.embed(x, [1, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown CSE-ResNet depth"):
        cse_resnet("cse_resnet101")


def test_embedding_net_ignores_tag_and_loads_torchvision_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", width=8, embed_dim=12, num_classes=5, imagenet_head=True).eval()
    randomize_batchnorm(model)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        a = model.embed(x, torch.tensor([1, 0, 1]))
        b = model.embed(x, torch.tensor([0, 0, 0]))
        out = model(x, None)
        assert torch.equal(a, b)
        assert a.shape == (3, 12)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
        assert model.embedding is not None
        manual = F.normalize(F.linear(model.backbone.features(x), model.embedding.weight, model.embedding.bias))
        torch.testing.assert_close(a, manual)
    assert out.logits is not None and out.logits.shape == (3, 5)
    assert out.imagenet_logits is not None and out.imagenet_logits.shape == (3, 1000)
    assert out.features.shape == (3, 64)
    # A torchvision-format file initialises the backbone (its fc is skipped).
    src = resnet18(width=8)
    path = tmp_path / "tv.pth"
    torch.save(src.state_dict(), path)
    load_pretrained(model.backbone, path, skip_fc=True)
    assert torch.equal(model.backbone.state_dict()["layer3.0.conv1.weight"], src.state_dict()["layer3.0.conv1.weight"])


def test_build_model_from_arch_block() -> None:
    m = build_model({"backbone": "resnet18", "width": 8, "embed_dim": 16, "num_classes": 4})
    assert isinstance(m, EmbeddingNet)
    assert m.arch_config() == {
        "backbone": "resnet18",
        "width": 8,
        "embed_dim": 16,
        "domain_conditioned": False,
        "num_classes": 4,
        "imagenet_head": False,
        "imagenet_classes": 1000,
    }
    c = build_model({"backbone": "resnet18", "width": 8, "domain_conditioned": True, "num_classes": 4})
    assert isinstance(c, CSEResNetModel)
    assert c.arch_config()["backbone"] == "cse_resnet18"
    # The canonical block rebuilds an identical architecture.
    again = build_model(c.arch_config())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
    official = build_model({"backbone": "cse_resnet50", "embed_dim": 64, "num_classes": 100})
    assert sorted(official.state_dict()) == sorted(_expected_cse50_keys(64, 100))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model({"backbone": "vgg16"})
    with pytest.raises(ValueError, match="unknown arch key"):
        build_model({"backbone": "resnet18", "widht": 8})
    with pytest.raises(ValueError, match="domain_conditioned is false"):
        build_model({"backbone": "cse_resnet50", "domain_conditioned": False})
    with pytest.raises(ValueError, match="needs 'backbone'"):
        build_model({"width": 8})


def _fake_se_resnet_imagenet(model: CSEResNetModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SE-ResNet ImageNet state dict in Cadene's layout (SE as 1x1 convs, no tag column) fitting ``model``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if not k.startswith("original_model.layer"):
            continue
        name = k[len("original_model.") :]
        if ".se_module.fc1.weight" in name:
            out[name] = torch.randn(v.shape[0], v.shape[1], 1, 1, generator=g)
        elif ".se_module.fc2.weight" in name:
            out[name] = torch.randn(v.shape[0], v.shape[1] - 1, 1, 1, generator=g)
        elif v.dtype == torch.int64:
            out[name] = v.clone()
        else:
            out[name] = torch.randn(v.shape, generator=g) * 0.1 + (1.0 if "running_var" in name else 0.0)
    feat = model.original_model.feature_dim
    out["last_linear.weight"] = torch.randn(1000, feat, generator=g) * 0.05
    out["last_linear.bias"] = torch.randn(1000, generator=g)
    return out


def test_load_se_resnet50_imagenet(tmp_path: Path) -> None:
    from zsbir_export.models import load_se_resnet50_imagenet

    torch.manual_seed(0)
    # embed_dim = feature_dim (8 * 8 * 4 = 256): the SVD split is then exact.
    model = cse_resnet("cse_resnet50", width=8, embed_dim=256, num_classes=5).eval()
    se = _fake_se_resnet_imagenet(model)
    path = tmp_path / "se_resnet50-ce0d4300.pth"
    torch.save(se, path)
    load_se_resnet50_imagenet(model, path)
    sd = model.state_dict()
    fc2 = sd["original_model.layer3.1.se_module.fc2.weight"]
    assert torch.equal(fc2[:, :-1], se["layer3.1.se_module.fc2.weight"][:, :, 0, 0])
    assert torch.count_nonzero(fc2[:, -1]) == 0  # the tag column starts at zero
    assert torch.equal(sd["original_model.layer0.conv1.weight"], se["layer0.conv1.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # A zero tag column: the network starts out domain-independent.
        torch.testing.assert_close(model.embed(x, torch.tensor([1, 1])), model.embed(x, torch.tensor([0, 0])))
        out = model(x, torch.tensor([1, 0]))
        assert out.imagenet_logits is not None
        expected = F.linear(out.features, se["last_linear.weight"], se["last_linear.bias"])
        torch.testing.assert_close(out.imagenet_logits, expected, rtol=1e-4, atol=1e-4)
    # The SAKE/DSN teacher (no hashing layer) copies the ImageNet head as is.
    teacher = cse_resnet("cse_resnet50", width=8, embed_dim=None, num_classes=0).eval()
    load_se_resnet50_imagenet(teacher, path)
    assert teacher.original_model.last_linear is not None
    assert torch.equal(teacher.original_model.last_linear.weight, se["last_linear.weight"])
    # Weights of another width do not fit.
    with pytest.raises(PretrainedLoadError, match="shape mismatch"):
        load_se_resnet50_imagenet(cse_resnet("cse_resnet50", width=16, embed_dim=64, num_classes=5), path)
    # Bottleneck weights for a basic-block network: the conv3/bn3 tensors have no place.
    with pytest.raises(PretrainedLoadError, match=r"102 unexpected: original_model\.layer1\.0\.conv3\.weight"):
        load_se_resnet50_imagenet(cse_resnet("cse_resnet34", width=8, embed_dim=64, num_classes=5), path)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in se.items() if not k.startswith("layer4.2.")}, partial)
    with pytest.raises(PretrainedLoadError, match=r"missing: original_model\.layer4\.2\.conv1\.weight"):
        load_se_resnet50_imagenet(cse_resnet("cse_resnet50", width=8, embed_dim=64, num_classes=5), partial)
