"""Image decoding and preprocessing shared by training, export and the runtime (CONTRACTS §3).

A *spec* describes how one domain (photo or sketch) turns an image file into the network input::

    {"size": [224, 224], "resize": "squash", "interpolation": "bilinear",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "color": "rgb", "background": "white"}

``size`` is ``[height, width]`` (the torchvision convention). ``resize`` is ``"squash"`` (resize to
``size`` ignoring the aspect ratio, as the official SAKE/DSN test code does) or ``"pad"`` (fit inside
``size`` keeping the aspect ratio, centre, fill the rest with ``background``). The output is a float32
``[3, H, W]`` array, channel order ``color`` (``"rgb"`` or ``"bgr"``), normalized as
``(pixel / 255 - mean) / std``.

Decoding (:func:`load_image`) always yields an 8-bit RGB image: EXIF orientation applied, grayscale /
palette / 16-bit / CMYK converted, and any transparency composited over **white** (so a transparent
sketch becomes black strokes on white paper, which is what sketch models are trained on).

JPEGs larger than the target are decoded at a reduced scale: with ``simplejpeg`` (libjpeg-turbo, a
dependency) at the smallest of the scales 1/8, 2/8, ..., 7/8 that keeps the target size in each dimension,
from paths and bytes of baseline/progressive RGB or grayscale JPEGs; otherwise (CMYK, open file objects,
data libjpeg-turbo refuses, simplejpeg missing) with PIL's draft mode at 1/2, 1/4 or 1/8. The bilinear
resize then makes up the rest. ``draft=False`` gives the bit-exact full decode. Every decode first
reserves its estimated memory in :data:`DECODE_BUDGET` (``ZSBIR_DECODE_MEMORY_MB``), so decoding threads
take turns on huge images. The measurements behind these choices are in ``docs/preprocessing.md``.

Training decodes at full size for augmentation, but the trainer's evaluation path calls
:func:`load_image` with the same ``target_size`` as the runtime, so its evaluation tensors equal the
runtime's exactly (``tests/test_parity.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo with its N/8 DCT scaling; PIL's draft mode (1/2, 1/4, 1/8) stands in without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a declared dependency; absent only on platforms without a wheel
    _simplejpeg = None

from zsbir_infer.errors import InputError

__all__ = [
    "DEFAULT_SPEC",
    "DRAFT_MARGIN",
    "ImageDecodeError",
    "ImageInput",
    "PreprocessSpec",
    "as_spec",
    "jpeg_scale",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "preprocess_into",
    "to_pil",
]

#: A path, an open binary file, raw encoded bytes, a PIL image or a uint8 pixel array (HxW or HxWxC).
ImageInput = Union[str, "os.PathLike[str]", IO[bytes], bytes, Image.Image, np.ndarray]

#: JPEG reduced-size decoding keeps at least this many times the target size in each dimension.
DRAFT_MARGIN = 1

#: EXIF orientation -> the transpose that makes the stored pixels upright (as ``ImageOps.exif_transpose``).
_ORIENT_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
_EXIF_ORIENTATION = 0x0112

# Image.open emits DecompressionBombWarning between MAX_IMAGE_PIXELS and 2x that; we turn it into an
# error. warnings.catch_warnings is process-global state, so our own threads take turns around it.
_OPEN_LOCK = threading.Lock()


class ImageDecodeError(InputError, ValueError):
    """An input could not be decoded into an image (missing, truncated, corrupt, not an image, too large)."""


class DecodeBudget:
    """A byte budget shared by the threads of a process that decode images (the indexer's workers).

    A small compressed file can hold a huge image (a 171 KB PNG of 9400 x 9400 LA pixels needs about 0.8 GB
    while it is decoded and converted); eight workers decoding such files at once took 4.6 GB. Each decode
    reserves its estimated size first and waits while the others hold the budget; an image larger than
    the whole budget is decoded alone. So decoding never holds much more than ``max(budget, the largest
    image)`` at once, whatever the number of workers.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total = int(total_bytes)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        n = max(0, int(n))
        with self._cond:
            while self.used and self.used + n > self.total:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _budget_from_env() -> int:
    try:
        mb = float(os.environ.get("ZSBIR_DECODE_MEMORY_MB", "") or 1024)
    except ValueError:
        mb = 1024
    return int(max(mb, 1) * 1024 * 1024)


#: The process-wide decoding budget (default 1 GiB; ``ZSBIR_DECODE_MEMORY_MB`` sets it).
DECODE_BUDGET = DecodeBudget(_budget_from_env())


def decode_bytes_estimate(im: Image.Image) -> int:
    """Bytes that decoding ``im`` (at its current, possibly reduced, size) and converting it to RGB take at
    most: the decoded pixels, an RGBA copy for transparency, the RGB result (float64 work arrays for
    16-bit and float modes)."""
    w, h = im.size
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        per_pixel = 4 + 8 + 1 + 3
    else:
        per_pixel = len(im.getbands()) + 4 + 3
    return int(w) * int(h) * per_pixel


#: Largest accepted model input side, in pixels: a spec asking for more is damaged or edited (a batch of
#: 32 inputs of 4096 x 4096 already takes 6.4 GB as float32).
MAX_INPUT_SIDE = 4096


@dataclass(frozen=True)
class PreprocessSpec:
    """A validated preprocessing spec (CONTRACTS §3). Build one with :meth:`from_dict` or :func:`as_spec`."""

    size: tuple[int, int] = (224, 224)
    resize: str = "squash"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = "rgb"
    background: str = "white"
    _lut: np.ndarray = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.size):
            raise ValueError(f"preprocess spec: 'size' must be [height, width] of positive ints, got {self.size!r}")
        if max(self.size) > MAX_INPUT_SIDE:
            raise ValueError(
                f"preprocess spec: 'size' {list(self.size)} is absurd (at most {MAX_INPUT_SIDE} pixels a side: a batch "
                "of such inputs would not fit in memory); the manifest is damaged or was edited: re-export the bundle"
            )
        if self.resize not in ("squash", "pad"):
            raise ValueError(f"preprocess spec: 'resize' must be 'squash' or 'pad', got {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"preprocess spec: 'interpolation' must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for key in ("mean", "std"):
            vals = getattr(self, key)
            if len(vals) != 3 or not all(isinstance(v, (int, float)) for v in vals):
                raise ValueError(f"preprocess spec: {key!r} must be 3 numbers, got {vals!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"preprocess spec: 'std' must be positive, got {self.std!r}")
        if self.color not in ("rgb", "bgr"):
            raise ValueError(f"preprocess spec: 'color' must be 'rgb' or 'bgr', got {self.color!r}")
        if self.background not in _BACKGROUNDS:
            raise ValueError(f"preprocess spec: 'background' must be one of {sorted(_BACKGROUNDS)}")
        # Per-channel lookup table: uint8 value -> normalized float32, computed in float64 then rounded.
        levels = np.arange(256, dtype=np.float64) / 255.0
        mean = np.asarray(self.mean, dtype=np.float64)[:, None]
        std = np.asarray(self.std, dtype=np.float64)[:, None]
        object.__setattr__(self, "_lut", ((levels[None, :] - mean) / std).astype(np.float32))

    @property
    def height(self) -> int:
        """Output height in pixels."""
        return self.size[0]

    @property
    def width(self) -> int:
        """Output width in pixels."""
        return self.size[1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        """Validate a JSON spec; missing keys take the defaults (224x224 squash bilinear ImageNet RGB white)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocess spec must be a JSON object, got {type(d).__name__}")
        known = {"size", "resize", "interpolation", "mean", "std", "color", "background"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"preprocess spec: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        kwargs: dict[str, Any] = {}
        for key in known & set(d):
            value = d[key]
            if key in ("size", "mean", "std"):
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"preprocess spec: {key!r} must be a list, got {value!r}")
                value = tuple(value)
            elif not isinstance(value, str):
                raise ValueError(f"preprocess spec: {key!r} must be a string, got {value!r}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists, not tuples), suitable for manifests and checkpoint configs."""
        return {
            "size": list(self.size),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "color": self.color,
            "background": self.background,
        }


#: The official SAKE/DSN test-time preprocessing: 224x224 squash, PIL bilinear, ImageNet mean/std, RGB.
DEFAULT_SPEC = PreprocessSpec()


def as_spec(spec: PreprocessSpec | Mapping[str, Any] | None) -> PreprocessSpec:
    """Return ``spec`` as a :class:`PreprocessSpec` (``None`` -> :data:`DEFAULT_SPEC`)."""
    if spec is None:
        return DEFAULT_SPEC
    if isinstance(spec, PreprocessSpec):
        return spec
    return PreprocessSpec.from_dict(spec)


# --------------------------------------------------------------------------------------------- decoding


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, str) else f"<{type(src).__name__}>"


def _open(fp: IO[bytes], what: str) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(
                f"{what}: image too large ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS (now {limit}) if it is trusted"
            ) from None
        except UnidentifiedImageError:
            raise ImageDecodeError(f"{what}: not a recognised image file") from None
        except Exception as exc:  # PIL raises a zoo of types on corrupt headers
            raise ImageDecodeError(f"{what}: cannot decode image: {exc}") from None
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF must not make a good image unreadable
        return 1


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Map I;16*/I/F grayscale to 8-bit L by scaling the value range (PIL's convert would clip)."""
    arr = np.asarray(im)
    if im.mode == "F":
        a = arr.astype(np.float64)
        finite_max = float(np.nanmax(a)) if a.size else 0.0
        a = a * 255.0 if finite_max <= 1.0 else a
    elif im.mode == "I":
        a = arr.astype(np.float64)
        # 32-bit integer images from 16-bit files: treat as 16-bit unless every value already fits 8 bits.
        a = a / 257.0 if a.size and float(a.max()) > 255 else a
    else:  # I;16, I;16L, I;16B, I;16N
        a = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparency composited over white."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _sixteen_bit_to_l(im).convert("RGB")
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    try:
        if not has_alpha:  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...
            return im.convert("RGB")
        rgba = im.convert("RGBA")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"cannot convert image mode {im.mode!r} to RGB: {exc}") from None
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def load_image(
    src: str | os.PathLike[str] | IO[bytes] | bytes,
    *,
    target_size: tuple[int, int] | None = None,
    draft: bool = True,
) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, upright and with transparency over white.

    Args:
        src: a path, an open binary file, or the encoded bytes.
        target_size: ``(height, width)`` the image will be resized to; lets JPEGs decode at reduced
            size (see the module docstring for the tolerance). ``None`` decodes at full size.
        draft: set ``False`` to disable reduced-size decoding even when ``target_size`` is given.

    Raises:
        ImageDecodeError: missing file, not an image, truncated (unless the process set PIL's
            ``ImageFile.LOAD_TRUNCATED_IMAGES``) or corrupt data, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression-bomb guard; raise that limit for trusted data).

    Decoding reserves its memory in :data:`DECODE_BUDGET` first, so threads decoding huge images at once
    take turns instead of multiplying the memory they need.
    """
    what = _describe(src)
    if isinstance(src, (bytes, bytearray)):
        fp: IO[bytes] = io.BytesIO(src)
        owned = True
    elif isinstance(src, (str, os.PathLike)):
        try:
            fp = open(src, "rb")  # noqa: SIM115 - closed below, after the pixels are loaded
        except OSError as exc:
            raise ImageDecodeError(f"{what}: cannot open: {exc.strerror or exc}") from None
        owned = True
    elif hasattr(src, "read"):
        fp = src
        owned = False
    else:
        raise TypeError(f"load_image expects a path, bytes or binary file, got {type(src).__name__}")
    try:
        im = _open(fp, what)
        orientation = _orientation(im)
        if draft and target_size is not None and im.format == "JPEG":
            th, tw = target_size
            if orientation in (5, 6, 7, 8):  # stored transposed: the target applies to swapped axes
                th, tw = tw, th
            if owned:
                scaled = _scaled_jpeg(fp, im, (th * DRAFT_MARGIN, tw * DRAFT_MARGIN))
                if scaled is not None:
                    turn = _ORIENT_TRANSPOSE.get(orientation)
                    return scaled if turn is None else scaled.transpose(turn)
            im.draft(None, (tw * DRAFT_MARGIN, th * DRAFT_MARGIN))
        with DECODE_BUDGET.reserve(decode_bytes_estimate(im)):
            try:
                im.load()
            except Exception as exc:
                raise ImageDecodeError(f"{what}: cannot decode image data: {exc}") from None
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    finally:
        if owned:
            fp.close()


def jpeg_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The numerator N of the reduced JPEG decode scale N/8 for a stored ``(width, height)`` and a
    ``(height, width)`` target: the smallest N whose output (libjpeg rounds each side up) still covers
    the target in both dimensions; 8 (full size) when the image is not larger than the target."""
    (w, h), (th, tw) = size, target
    for n in range(1, 8):
        if -(-w * n // 8) >= tw and -(-h * n // 8) >= th:
            return n
    return 8


def _scaled_jpeg(fp: IO[bytes], im: Image.Image, target: tuple[int, int]) -> Image.Image | None:
    """Decode the JPEG ``im`` was opened from at its N/8 scale for ``target`` ((height, width), stored
    axes) with libjpeg-turbo; ``None`` where PIL's path must do it (no simplejpeg, no reduction, CMYK, or
    data libjpeg-turbo refuses: PIL then reports or tolerates the damage as it always has)."""
    if _simplejpeg is None or im.mode not in ("RGB", "L"):
        return None
    n = jpeg_scale(im.size, target)
    if n == 8:
        return None
    w, h = im.size
    out_w, out_h = -(-w * n // 8), -(-h * n // 8)
    if isinstance(fp, io.BytesIO):
        data = fp.getvalue()
    else:
        try:
            fp.seek(0)
            data = fp.read()
        except (OSError, ValueError):
            return None
    with DECODE_BUDGET.reserve(out_w * out_h * 3 + len(data)):
        try:
            arr = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=out_h, min_width=out_w)
        except ValueError:
            return None
    if arr.shape[:2] != (out_h, out_w):  # a scale other than the one planned: keep PIL's behaviour
        return None
    return Image.fromarray(arr)


def to_pil(image: ImageInput, *, target_size: tuple[int, int] | None = None, draft: bool = True) -> Image.Image:
    """Turn any supported input into an RGB PIL image.

    Paths, files and bytes go through :func:`load_image`; PIL images are converted like decoded files
    (alpha over white, 16-bit scaled); numpy arrays must be uint8 ``HxW``, ``HxWx1``, ``HxWx3`` (RGB) or
    ``HxWx4`` (RGBA) raw pixels (already-preprocessed float NCHW batches go to ``Encoder.embed`` as one 4-D array).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ValueError(
                f"pixel arrays must be uint8 HxW/HxWx3/HxWx4, got dtype {arr.dtype}; "
                "pass a preprocessed float32 NCHW batch to Encoder.embed as one 4-D array instead"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")
        if arr.ndim == 3 and arr.shape[2] == 3:
            return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
        if arr.ndim == 3 and arr.shape[2] == 4:
            return _to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode="RGBA"))
        raise ValueError(f"pixel arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    return load_image(image, target_size=target_size, draft=draft)


# ------------------------------------------------------------------------------------------ preprocessing


def _resize(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    h, w = spec.size
    resample = _INTERPOLATIONS[spec.interpolation]
    if spec.resize == "squash":
        return img if img.size == (w, h) else img.resize((w, h), resample)
    iw, ih = img.size
    scale = min(w / iw, h / ih)
    nw, nh = max(1, min(w, round(iw * scale))), max(1, min(h, round(ih * scale)))
    inner = img if (nw, nh) == img.size else img.resize((nw, nh), resample)
    if (nw, nh) == (w, h):
        return inner
    canvas = Image.new("RGB", (w, h), _BACKGROUNDS[spec.background])
    canvas.paste(inner, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def preprocess_into(
    image: ImageInput, spec: PreprocessSpec | Mapping[str, Any] | None, out: np.ndarray, *, draft: bool = True
) -> np.ndarray:
    """Preprocess one image into ``out`` (a writable float32 ``[3, H, W]`` view, e.g. a batch row)."""
    s = as_spec(spec)
    if out.shape != (3, s.height, s.width) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(3, s.height, s.width)}, got {out.dtype} {out.shape}")
    img = _resize(to_pil(image, target_size=s.size, draft=draft), s)
    pixels = np.asarray(img, dtype=np.uint8)  # H, W, 3
    order = (0, 1, 2) if s.color == "rgb" else (2, 1, 0)
    for dst, src in enumerate(order):
        np.take(s._lut[src], pixels[:, :, src], out=out[dst])
    return out


def preprocess(image: ImageInput, spec: PreprocessSpec | Mapping[str, Any] | None = None) -> np.ndarray:
    """Decode (if needed), resize and normalize one image: float32 ``[3, H, W]`` (see the module docstring)."""
    s = as_spec(spec)
    out = np.empty((3, s.height, s.width), dtype=np.float32)
    return preprocess_into(image, s, out)


def preprocess_batch(
    images: Iterable[ImageInput] | Sequence[ImageInput], spec: PreprocessSpec | Mapping[str, Any] | None = None
) -> np.ndarray:
    """Preprocess several images into one float32 ``[N, 3, H, W]`` array (N may be 0)."""
    s = as_spec(spec)
    items = list(images)
    out = np.empty((len(items), 3, s.height, s.width), dtype=np.float32)
    for i, image in enumerate(items):
        preprocess_into(image, s, out[i])
    return out
