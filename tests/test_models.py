"""Tests for zsbir_export.models: torchvision-compatible ResNets, CSE-ResNet (DSN/SAKE), embedding models."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from zsbir_export.models.resnet import (  # noqa: E402
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
