"""zsbir_infer.preprocess: decoding of every image mode, EXIF, alpha, parity with a reference, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from zsbir_infer.preprocess import (
    DEFAULT_SPEC,
    DRAFT_MARGIN,
    ImageDecodeError,
    PreprocessSpec,
    as_spec,
    jpeg_scale,
    load_image,
    preprocess,
    preprocess_batch,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def reference(img: Image.Image, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """The straightforward pipeline of the official test code: PIL bilinear squash, /255, ImageNet norm."""
    h, w = size
    arr = np.asarray(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255
    im = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(30):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(2, max(3, w // 6)))
        d.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        d.line([(int(rng.integers(0, w)), int(rng.integers(0, h))), (x, y)], fill=(0, 0, 0), width=3)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ specs


def test_spec_roundtrip_and_defaults() -> None:
    d = DEFAULT_SPEC.to_dict()
    assert d == {
        "size": [224, 224],
        "resize": "squash",
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "color": "rgb",
        "background": "white",
    }
    assert PreprocessSpec.from_dict(d) == DEFAULT_SPEC
    assert as_spec(None) is DEFAULT_SPEC
    assert as_spec({"size": [32, 48]}).size == (32, 48)


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"size": [224]}, "size"),
        ({"size": [0, 224]}, "size"),
        ({"resize": "crop"}, "resize"),
        ({"interpolation": "cubic-ish"}, "interpolation"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"color": "gray"}, "color"),
        ({"background": "pink"}, "background"),
        ({"sise": [224, 224]}, "unknown keys"),
    ],
)
def test_spec_rejects_bad_values(bad: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        PreprocessSpec.from_dict(bad)


# --------------------------------------------------------------------------------------- parity (float)


def test_parity_with_reference_squash() -> None:
    img = textured(300, 200)
    out = preprocess(img, DEFAULT_SPEC)
    assert out.dtype == np.float32 and out.shape == (3, 224, 224) and out.flags.c_contiguous
    np.testing.assert_allclose(out, reference(img), atol=2e-6, rtol=0)


def test_parity_from_png_file(tmp_path: Path) -> None:
    img = textured(257, 131, seed=3)
    path = tmp_path / "x.png"
    img.save(path)
    np.testing.assert_allclose(preprocess(path), reference(img), atol=2e-6, rtol=0)
    np.testing.assert_allclose(preprocess(str(path)), reference(img), atol=2e-6, rtol=0)


def test_non_square_size_is_height_width_and_bgr() -> None:
    img = textured(100, 80)
    spec = {"size": [32, 48], "color": "bgr", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    out = preprocess(img, spec)
    assert out.shape == (3, 32, 48)
    expect = np.asarray(img.resize((48, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    np.testing.assert_allclose(out, expect[:, :, ::-1].transpose(2, 0, 1), atol=1e-7)


def test_pad_mode_keeps_aspect_and_fills_background() -> None:
    # A black 100x50 image padded into 40x40: a 40x20 black band in the middle, white above and below.
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    spec = {"size": [40, 40], "resize": "pad", "mean": [0, 0, 0], "std": [1, 1, 1]}
    out = preprocess(img, spec)
    assert out.shape == (3, 40, 40)
    np.testing.assert_array_equal(out[:, :10], 1.0)
    np.testing.assert_array_equal(out[:, 10:30], 0.0)
    np.testing.assert_array_equal(out[:, 30:], 1.0)
    black_bg = preprocess(Image.new("RGB", (10, 50), (255, 255, 255)), {**spec, "background": "black"})
    np.testing.assert_array_equal(black_bg[:, :, :16], 0.0)
    np.testing.assert_array_equal(black_bg[:, :, 16:24], 1.0)


def test_batch_equals_single_and_empty_batch(tmp_path: Path) -> None:
    imgs = [textured(64 + 10 * i, 50, seed=i) for i in range(3)]
    batch = preprocess_batch(imgs, DEFAULT_SPEC)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], preprocess(img))
    assert preprocess_batch([], {"size": [8, 8]}).shape == (0, 3, 8, 8)


def test_uint8_arrays_accepted_and_floats_refused() -> None:
    img = textured(40, 30)
    arr = np.asarray(img)
    np.testing.assert_array_equal(preprocess(arr), preprocess(img))
    gray = arr[:, :, 0].copy()
    np.testing.assert_array_equal(preprocess(gray), preprocess(Image.fromarray(gray).convert("RGB")))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(arr.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((4, 4, 2), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ image modes


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    g = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8) // 2, mode="L")
    p = tmp_path / "g.png"
    g.save(p)
    rgb = load_image(p)
    assert rgb.mode == "RGB"
    a = np.asarray(rgb)
    np.testing.assert_array_equal(a[:, :, 0], np.asarray(g))
    np.testing.assert_array_equal(a[:, :, 0], a[:, :, 2])
    b = g.point(lambda v: 255 if v > 60 else 0).convert("1")
    b.save(p)
    a = np.asarray(load_image(p))
    assert set(np.unique(a).tolist()) <= {0, 255}


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (4, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2, 1])
    path = tmp_path / "p.png"
    p.save(path)
    assert np.asarray(load_image(path))[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]]
    p.save(path, transparency=1)  # index 1 (green) fully transparent -> white
    assert np.asarray(load_image(path))[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255], [255, 255, 255]]
    gif = tmp_path / "p.gif"
    p.save(gif, transparency=1)
    assert np.asarray(load_image(gif))[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255], [255, 255, 255]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    vals = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(vals).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # depends on the Pillow version; both must work
    out = np.asarray(load_image(path))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]
    # Mode "I" with 16-bit data and a float "F" image in [0, 1].
    spec = {"size": [1, 4], "mean": [0] * 3, "std": [1] * 3}
    i_img = Image.fromarray(vals.astype(np.int32), mode="I")
    np.testing.assert_allclose(preprocess(i_img, spec)[0, 0], [0, 1 / 255, 128 / 255, 1], atol=1e-6)
    # An "I" image whose values all fit in 8 bits is taken as 8-bit, not divided by 257.
    small = Image.fromarray(np.array([[0, 10, 200, 255]], dtype=np.int32), mode="I")
    np.testing.assert_allclose(preprocess(small, spec)[2, 0], [0, 10 / 255, 200 / 255, 1], atol=1e-6)
    f_img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    spec = {"size": [1, 3], "mean": [0] * 3, "std": [1] * 3}
    np.testing.assert_allclose(preprocess(f_img, spec)[1, 0], [0, 128 / 255, 1], atol=1e-6)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (32, 32), (200, 30, 60))
    path = tmp_path / "c.jpg"
    rgb.convert("CMYK").save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = np.asarray(load_image(path), dtype=np.int16)
    assert out.shape == (32, 32, 3)
    assert np.abs(out - np.array([200, 30, 60])).max() <= 6


def test_alpha_composited_over_white(tmp_path: Path) -> None:
    # A transparent sketch: black strokes with alpha 255, background fully transparent (stored black).
    la = np.zeros((10, 10, 2), dtype=np.uint8)
    la[4:6, :, 1] = 255  # opaque black band
    la[8, :, 1] = 128  # half-transparent black row
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    out = np.asarray(load_image(path))
    assert out[0].tolist() == [[255, 255, 255]] * 10
    assert out[4].tolist() == [[0, 0, 0]] * 10
    assert abs(int(out[8, 0, 0]) - 127) <= 1
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[1, 1] = (0, 0, 255, 0)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert np.asarray(load_image(path)).tolist() == [[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 255, 255]]]
    # RGBA PIL images and arrays passed directly follow the same rule.
    spec = {"size": [2, 2], "mean": [0] * 3, "std": [1] * 3}
    assert preprocess(rgba, spec)[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert preprocess(Image.fromarray(rgba, mode="RGBA"), spec)[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("orientation", "transform"), [(3, "rot180"), (6, "rot270"), (8, "rot90"), (2, "flip")])
def test_exif_orientation_applied(tmp_path: Path, orientation: int, transform: str) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; bright top-left quadrant
    arr[:10, :20] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    img.save(path, quality=95, exif=exif)
    expect = {
        "rot180": np.rot90(arr, 2),
        "rot270": np.rot90(arr, -1),  # orientation 6: rotate 90 deg clockwise to display
        "rot90": np.rot90(arr, 1),
        "flip": arr[:, ::-1],
    }[transform]
    got = np.asarray(load_image(path)).astype(np.int16)
    assert got.shape == expect.shape
    assert np.abs(got - expect).mean() < 8  # JPEG noise only


def test_exif_rotation_with_draft_uses_swapped_target(tmp_path: Path) -> None:
    img = textured(1600, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, quality=92, exif=exif)
    full = load_image(path, draft=False)
    assert full.size == (800, 1600)
    # Stored 1600x800, shown 800x1600: for a 200 (h) x 100 (w) target libjpeg can go to 1/8 (200x100
    # stored, 100x200 upright); with the axes not swapped it could only go to 1/4.
    assert load_image(path, target_size=(200, 100)).size == (100, 200)
    spec = {"size": [200, 100]}
    diff = np.abs(preprocess(path, spec) - preprocess(full, spec)) * STD[:, None, None]
    assert diff.mean() < 0.04  # the draft lands on the target: see test_draft_landing_on_target...


# ----------------------------------------------------------------------------------- draft JPEG decoding


def expected_draft_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """PIL's draft size (the fallback path): the smallest scale 1/2, 1/4, 1/8 keeping DRAFT_MARGIN x target."""
    (w, h), (th, tw) = size, target
    fit = min(w // (tw * DRAFT_MARGIN), h // (th * DRAFT_MARGIN))
    s = next(s for s in (8, 4, 2, 1) if fit >= s)
    return -(-w // s), -(-h // s)


def draft_diff(data: bytes, target: tuple[int, int]) -> np.ndarray:
    """|reduced-size decode - full decode|, both through the same preprocessing, in pixel/255 units."""
    spec = {"size": list(target)}
    full = preprocess(load_image(data, draft=False), spec)
    fast = preprocess(data, spec)
    np.testing.assert_array_equal(preprocess(load_image(data, target_size=target, draft=False), spec), full)
    return np.abs(full - fast) * STD[:, None, None]


def test_draft_margin_is_one() -> None:
    assert DRAFT_MARGIN == 1  # the tolerances below and in the module docstring are for this margin


@pytest.mark.parametrize(
    ("size", "target", "n"),
    [
        ((2000, 1500), (224, 224), 2),  # 250 x 188 at 1/8 would not cover 224
        ((1024, 768), (224, 224), 3),
        ((256, 256), (160, 160), 5),
        ((255, 255), (160, 160), 5),  # sides round up: 160 x 160
        ((400, 300), (224, 224), 6),
        ((224, 224), (224, 224), 8),
        ((100, 80), (224, 224), 8),  # smaller than the target: never scaled up
        ((1600, 800), (100, 200), 1),  # (w, h) stored against a (h, w) target
    ],
)
def test_jpeg_scale_is_the_smallest_covering_eighth(size: tuple[int, int], target: tuple[int, int], n: int) -> None:
    assert jpeg_scale(size, target) == n


@pytest.mark.parametrize(
    ("size", "expect"), [((2000, 1500), (500, 375)), ((1800, 1000), (450, 250)), ((1024, 768), (384, 288))]
)
def test_draft_jpeg_within_documented_tolerance(size: tuple[int, int], expect: tuple[int, int]) -> None:
    """The scaled decode leaves a bilinear downscale to do (the usual case for large photos)."""
    data = encode(textured(*size, seed=7), "JPEG", quality=90)
    drafted = load_image(data, target_size=(224, 224))
    assert drafted.size == expect  # N/8 scales: PIL's draft would stop at 1/4 for 2000 x 1500, 1/2 for 1024
    diff = draft_diff(data, (224, 224))
    assert diff.mean() < 0.008
    assert diff.max() < 0.15


@pytest.mark.parametrize(("size", "expect"), [((400, 300), (300, 225)), ((600, 500), (300, 250))])
def test_mild_reduction_within_documented_tolerance(size: tuple[int, int], expect: tuple[int, int]) -> None:
    """Images less than twice the target, which PIL's draft would decode at full size, go to 6/8 or 4/8."""
    data = encode(textured(*size, seed=7), "JPEG", quality=90)
    assert load_image(data, target_size=(224, 224)).size == expect
    diff = draft_diff(data, (224, 224))
    assert diff.mean() < 0.015
    assert diff.max() < 0.25


@pytest.mark.parametrize(("side", "target"), [(512, 64), (256, 64), (128, 64), (448, 224), (256, 160), (256, 96)])
def test_draft_landing_on_target_within_documented_tolerance(side: int, target: int) -> None:
    """The scaled decode lands on the target size (e.g. a 256 px Sketchy photo for a 160 px model): no resize."""
    data = encode(textured(side, side, seed=7), "JPEG", quality=90)
    assert load_image(data, target_size=(target, target)).size == (target, target)
    diff = draft_diff(data, (target, target))
    assert diff.mean() < 0.04
    assert diff.max() < 0.4


def test_scaled_decode_of_grayscale_jpeg_matches_full_decode() -> None:
    img = textured(512, 384, seed=3).convert("L")
    data = encode(img, "JPEG", quality=90)
    got = load_image(data, target_size=(96, 128))
    assert got.mode == "RGB" and got.size == (128, 96)  # 2/8 of 512 x 384
    diff = draft_diff(data, (96, 128))
    assert diff.mean() < 0.04


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_scaled_decode_applies_exif_orientation(tmp_path: Path, orientation: int) -> None:
    """Rotated photos come out upright from the scaled path, pixel for pixel close to the full decode."""
    img = textured(800, 400, seed=5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    img.save(path, quality=92, exif=exif)
    full = load_image(path, draft=False)
    spec = {"size": [100, 100]}
    got = load_image(path, target_size=(100, 100))
    assert got.size == ((100, 200) if orientation in (6, 8) else (200, 100))  # 2/8, upright
    diff = np.abs(preprocess(path, spec) - preprocess(full, spec)) * STD[:, None, None]
    assert diff.mean() < 0.04  # a wrong turn would differ by the texture's full contrast


def test_fallbacks_use_pils_draft() -> None:
    """CMYK JPEGs and open file objects take PIL's draft path (1/2, 1/4, 1/8 only)."""
    cmyk = encode(textured(1024, 768).convert("CMYK"), "JPEG", quality=90)
    assert load_image(cmyk, target_size=(224, 224)).size == expected_draft_size((1024, 768), (224, 224))
    data = encode(textured(1024, 768), "JPEG", quality=90)
    assert load_image(io.BytesIO(data), target_size=(224, 224)).size == (512, 384)
    assert load_image(data, target_size=(224, 224)).size == (384, 288)
    data = encode(textured(400, 300), "JPEG", quality=90)
    assert load_image(io.BytesIO(data), target_size=(224, 224)).size == (400, 300)


def test_truncated_jpeg_still_reported_on_the_scaled_path() -> None:
    data = encode(textured(512, 512), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError):
        load_image(data[: len(data) // 2], target_size=(64, 64))


def test_no_draft_for_other_formats() -> None:
    data = encode(textured(512, 512), "PNG")
    assert load_image(data, target_size=(64, 64)).size == (512, 512)


# ----------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"nope\.png.*cannot open"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a jpeg")
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg.*not a recognised image"):
        preprocess(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode(textured(300, 300), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut"):
        load_image(path)


def test_corrupt_header() -> None:
    data = bytearray(encode(textured(64, 64), "PNG"))
    data[29:33] = b"\x00\x00\x00\x00"  # the IHDR checksum
    with pytest.raises(ImageDecodeError, match="bytes"):
        load_image(bytes(data))


def test_decompression_bomb_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("L", (100, 100)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 10000 px: PIL would only warn
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # > 2x the limit: PIL's own error
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    assert load_image(data).size == (100, 100)


def test_bad_input_type() -> None:
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]


def test_open_file_object_not_closed(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    textured(20, 20).save(path)
    with open(path, "rb") as fh:
        assert load_image(fh).size == (20, 20)
        assert not fh.closed
