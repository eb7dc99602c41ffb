"""Write a Triton model repository for a bundle (and a gallery): configs, model files, Python models, README.

Layout (``REPO`` as written by ``zsbir export BUNDLE --triton REPO --gallery G``)::

    REPO/README.md                     what each model is, how to start Triton on it
    REPO/zsbir_search/config.pbtxt     ensemble: IMAGE [, K, DOMAIN] -> SCORES, IDS, PATHS (the entry point)
    REPO/zsbir_preprocess/1/model.py   Python backend: encoded image bytes -> float32 [3, H, W] (+ domain tag)
    REPO/zsbir_encoder/1/model.onnx    platform onnxruntime_onnx (fp32); zsbir_encoder_fp16 / _int8 likewise
    REPO/zsbir_encoder_trt_<prec>/1/   platform tensorrt_plan, one plan per GPU (cc_model_filenames)
    REPO/zsbir_topk/1/model.py         Python backend: the gallery's top-k search (Retriever's, CPU or CUDA)

With ``encoder="python"`` every ``zsbir_encoder*`` model is instead a Python-backend model running ONNX Runtime
on a copy of the bundle (for servers without the ONNX Runtime backend, such as the one in ``nvidia-pytriton``);
its inputs, outputs and batching are those of the standard model, so the ensemble is the same.

The Python models import ``numpy``, ``PIL``, ``onnxruntime`` and ``zsbir_infer`` from the Python environment
Triton's Python backend runs (``pip install zsbir`` there); the entries of ``$ZSBIR_PYTHONPATH`` are added to
their ``sys.path`` first (``zsbir serve --engine triton`` sets it to this environment).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsbir_infer.bundle import Bundle, BundleError, EngineInfo
from zsbir_infer.triton import TritonError

__all__ = [
    "ENCODERS",
    "ENSEMBLE",
    "TensorSpec",
    "TritonRepositoryOptions",
    "encoder_model_name",
    "onnx_signature",
    "write_repository",
]

#: The ensemble clients call.
ENSEMBLE = "zsbir_search"
PREPROCESS = "zsbir_preprocess"
TOPK = "zsbir_topk"
#: Encoder kinds: ONNX Runtime backend, TensorRT plans (+ the ONNX ones), ONNX Runtime in a Python model.
ENCODERS: tuple[str, ...] = ("onnx", "tensorrt", "python")

_MODELS_DIR = Path(__file__).resolve().parent / "models"
_ORT_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model as Triton sees it: name, ``TYPE_*`` data type, dims after the batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # a batch-only tensor ([batch]): dims [1], reshape []
    optional: bool = False

    def pbtxt(self) -> str:
        parts = [f'name: "{self.name}"', f"data_type: {self.data_type}", f"dims: [ {', '.join(map(str, self.dims))} ]"]
        if self.reshape is not None:
            parts.append(f"reshape: {{ shape: [ {', '.join(map(str, self.reshape))} ] }}")
        if self.optional:
            parts.append("optional: true")
        return "{ " + " ".join(parts) + " }"


@dataclass
class TritonRepositoryOptions:
    """How the repository is written (``zsbir export --triton`` options)."""

    #: ``"onnx"`` (platform onnxruntime_onnx), ``"tensorrt"`` (the ensemble uses the TensorRT plans) or ``"python"``.
    encoder: str = "onnx"
    #: Precision of the encoder the ensemble calls (``fp32``, ``fp16`` or ``int8``; must be in the bundle).
    precision: str = "fp32"
    #: Where the encoder instances run: ``"gpu"``, ``"cpu"``, or ``"auto"`` (GPU for onnx/tensorrt, CPU for python).
    device: str = "auto"
    #: Largest batch Triton forms (``max_batch_size`` of every model).
    max_batch: int = 32
    #: How long the dynamic batcher holds a request for others to join it (``None``: 0 when the encoder runs on the
    #: CPU, 1000 on a GPU). Requests that queue while a model is busy are batched with any delay; a delay holds even
    #: a lone request at each of the three steps (on the 2-core CPU, 0 gave the best rate at 1, 8 and 32 clients:
    #: ``benchmarks/results/triton_load.md``).
    max_queue_delay_us: int | None = None
    #: Instances of each CPU (Python-backend) model; separate processes, so decoding runs in parallel.
    instances: int = 1
    #: Where ``zsbir_topk`` searches: ``"cpu"`` or ``"cuda"`` (the fused CUDA kernels where they can run).
    search_device: str = "cpu"
    #: ONNX Runtime intra-op threads of the Python-backend encoder (0: its default).
    threads: int = 0
    #: Default ``K`` when a request gives none.
    default_k: int = 10
    overwrite: bool = False

    def validate(self) -> None:
        """Raise :class:`TritonError` for an impossible combination."""
        if self.encoder not in ENCODERS:
            raise TritonError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.device not in ("auto", "gpu", "cpu"):
            raise TritonError(f"device must be auto, gpu or cpu, got {self.device!r}")
        if self.encoder == "tensorrt" and self.device == "cpu":
            raise TritonError("TensorRT plans run on a GPU only: use device gpu (or auto) with encoder tensorrt")
        if self.search_device not in ("cpu", "cuda"):
            raise TritonError(f"search device must be cpu or cuda, got {self.search_device!r}")
        for name, value, low in (
            ("max batch", self.max_batch, 1),
            ("instances", self.instances, 1),
            ("default k", self.default_k, 1),
            ("max queue delay", self.queue_delay_us, 0),
            ("threads", self.threads, 0),
        ):
            if value < low:
                raise TritonError(f"{name} must be at least {low}, got {value}")

    @property
    def queue_delay_us(self) -> int:
        """``max_queue_delay_microseconds`` once ``None`` is resolved."""
        if self.max_queue_delay_us is not None:
            return self.max_queue_delay_us
        return 1000 if self.encoder_device == "gpu" else 0

    @property
    def encoder_device(self) -> str:
        """``"gpu"`` or ``"cpu"`` once ``auto`` is resolved."""
        if self.device != "auto":
            return self.device
        return "cpu" if self.encoder == "python" else "gpu"


@dataclass
class _Signature:
    image: TensorSpec
    domain: TensorSpec | None
    output: TensorSpec
    max_batch: int


def onnx_signature(bundle: Bundle, precision: str) -> tuple[TensorSpec, TensorSpec | None, TensorSpec]:
    """The Triton view (image, domain or None, embedding) of the bundle's ONNX model at ``precision``.

    Read from the model itself with ONNX Runtime (the manifest's names are checked against it)."""
    import onnxruntime as ort

    path = bundle.model_path(precision)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TritonError(f"ONNX Runtime cannot read {path}: {exc}") from None
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}

    def spec(node: Any, what: str) -> TensorSpec:
        if node.type not in _ORT_TYPES:
            raise TritonError(f"{path}: {what} {node.name!r} has type {node.type}, which this export does not map")
        shape = list(node.shape)
        if not shape or isinstance(shape[0], int):
            raise TritonError(f"{path}: {what} {node.name!r} has no dynamic batch axis (shape {shape})")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        if not dims:  # [batch]: Triton needs at least one dim
            return TensorSpec(node.name, _ORT_TYPES[node.type], (1,), reshape=())
        return TensorSpec(node.name, _ORT_TYPES[node.type], dims)

    if bundle.image_input not in inputs or bundle.output_name not in outputs:
        raise TritonError(
            f"{path}: the model's inputs {sorted(inputs)} / outputs {sorted(outputs)} do not include the manifest's "
            f"{bundle.image_input!r} / {bundle.output_name!r}"
        )
    domain = None
    if bundle.domain_input is not None:
        if bundle.domain_input not in inputs:
            raise TritonError(f"{path}: the model has no domain input {bundle.domain_input!r}")
        domain = spec(inputs[bundle.domain_input], "input")
    return spec(inputs[bundle.image_input], "input"), domain, spec(outputs[bundle.output_name], "output")


def encoder_model_name(precision: str, encoder: str = "onnx") -> str:
    """``zsbir_encoder`` (fp32), ``zsbir_encoder_fp16``, ...; TensorRT: ``zsbir_encoder_trt_<precision>``."""
    if encoder == "tensorrt":
        return f"zsbir_encoder_trt_{precision}"
    return "zsbir_encoder" if precision == "fp32" else f"zsbir_encoder_{precision}"


def _cc_key(cc: str) -> str:
    """Triton's compute-capability key: "8.6" (a manifest may say "86" or "8.6")."""
    cc = cc.strip()
    if "." in cc:
        return cc
    return f"{cc[:-1]}.{cc[-1]}" if len(cc) >= 2 and cc.isdigit() else cc


def _param(key: str, value: str | int) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(str(value))} }} }}'


def _instances(kind: str, count: int) -> str:
    return f"instance_group [ {{ kind: {kind} count: {count} }} ]"


def _batching(opts: TritonRepositoryOptions, preferred: Sequence[int] = ()) -> str:
    pref = f" preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
    return f"dynamic_batching {{{pref} max_queue_delay_microseconds: {opts.queue_delay_us} }}"


def _config(
    name: str,
    head: Sequence[str],
    max_batch: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    tail: Sequence[str],
) -> str:
    lines = [f'name: "{name}"', *head, f"max_batch_size: {max_batch}", "input ["]
    lines += [f"  {t.pbtxt()}{',' if i < len(inputs) - 1 else ''}" for i, t in enumerate(inputs)]
    lines += ["]", "output ["]
    lines += [f"  {t.pbtxt()}{',' if i < len(outputs) - 1 else ''}" for i, t in enumerate(outputs)]
    lines += ["]", *tail]
    return "\n".join(lines) + "\n"


def _copy_model_py(template: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MODELS_DIR / template, dst / "model.py")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _engine_groups(bundle: Bundle) -> dict[str, list[EngineInfo]]:
    groups: dict[str, list[EngineInfo]] = {}
    for e in bundle.engines:
        groups.setdefault(e.precision, []).append(e)
    return groups


def write_repository(
    bundle: Bundle | str | os.PathLike[str],
    repo: str | os.PathLike[str],
    gallery: str | os.PathLike[str] | None = None,
    options: TritonRepositoryOptions | None = None,
    *,
    log: Callable[[str], Any] | None = None,
) -> Path:
    """Write the Triton model repository ``repo`` for ``bundle`` (see the module docstring); returns its path.

    ``gallery``: the gallery ``zsbir_topk`` searches (recorded as an absolute path; ``$ZSBIR_GALLERY`` on the
    server when not given). The repository is built in a temporary folder beside ``repo`` and renamed into place,
    so a failed export leaves nothing half-written.

    Raises:
        TritonError: bad options, an existing ``repo`` without ``overwrite``, a precision or engine the bundle
            lacks, a gallery built with another model.
    """
    opts = options or TritonRepositoryOptions()
    opts.validate()
    say = log or (lambda _msg: None)
    try:
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(Path(bundle))
        b.verify()
    except BundleError as exc:
        raise TritonError(str(exc)) from None
    if opts.precision not in b.models:
        raise TritonError(
            f"bundle {b.path} has no {opts.precision} model (it has {', '.join(b.precisions)}); "
            f"re-export it with --precision {opts.precision}"
        )
    groups = _engine_groups(b)
    if opts.encoder == "tensorrt" and opts.precision not in groups:
        have = ", ".join(sorted(groups)) or "none"
        raise TritonError(
            f"bundle {b.path} has no TensorRT plan for {opts.precision} (plans: {have}); build them with "
            "`zsbir export ... --trt` on the GPU that will serve, or use --triton-encoder onnx"
        )
    sizes = {spec.size for spec in b.preprocess.values()}
    if len(sizes) != 1:
        raise TritonError(
            f"bundle {b.path}: the photo and sketch preprocessing give different sizes {sorted(sizes)}; one Triton "
            "encoder input cannot take both"
        )
    height, width = sizes.pop()
    gallery_path = _check_gallery(gallery, b)

    dst = Path(repo)
    if dst.exists() and not opts.overwrite:
        raise TritonError(f"{dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        sig = _write_encoders(b, tmp, opts, groups, say)
        if sig.image.data_type != "TYPE_FP32":
            raise TritonError(
                f"the {opts.precision} model takes {sig.image.data_type} images; the preprocessing model gives "
                "float32: pick a precision whose model has a float32 interface (zsbir export keeps fp16 models so)"
            )
        if tuple(d for d in sig.image.dims) not in ((3, height, width), (3, -1, -1)):
            raise TritonError(f"the model's image input {list(sig.image.dims)} does not match the preprocessing")
        _write_preprocess(b, tmp, opts, (height, width))
        _write_topk(b, tmp, opts, gallery_path, sig.output.dims[0])
        _write_ensemble(b, tmp, opts, sig, (height, width))
        _write(tmp / "README.md", _readme(b, opts, gallery_path, sorted(p.name for p in tmp.iterdir() if p.is_dir())))
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote Triton repository {dst}")
    return dst


def _check_gallery(gallery: str | os.PathLike[str] | None, b: Bundle) -> Path | None:
    if gallery is None:
        return None
    from zsbir_infer.gallery import GalleryError
    from zsbir_infer.gallery.shards import open_gallery

    path = Path(gallery).resolve()
    try:
        g = open_gallery(path, readonly=True)
    except (GalleryError, OSError) as exc:
        raise TritonError(f"cannot open the gallery {path}: {exc}") from None
    try:
        g._check_model(b.fingerprint)
    except Exception as exc:
        raise TritonError(f"{exc}") from None
    finally:
        g.close()
    return path


def _write_encoders(
    b: Bundle,
    tmp: Path,
    opts: TritonRepositoryOptions,
    groups: dict[str, list[EngineInfo]],
    say: Callable[[str], Any],
) -> _Signature:
    chosen: _Signature | None = None
    kind = "KIND_GPU" if opts.encoder_device == "gpu" else "KIND_CPU"
    for prec in b.precisions:
        image, domain, output = onnx_signature(b, prec)
        inputs = [image] + ([domain] if domain is not None else [])
        name = encoder_model_name(prec)
        folder = tmp / name
        params = [_param("zsbir_fingerprint", b.fingerprint), _param("zsbir_precision", prec)]
        if opts.encoder == "python":
            bundle_dir = folder / "1" / "bundle"
            bundle_dir.mkdir(parents=True)
            manifest = dict(b.manifest)
            manifest["models"] = {p: b.manifest["models"][p] for p in ("fp32", prec)}
            manifest["engines"] = []
            (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            for p in {"fp32", prec}:
                shutil.copyfile(b.model_path(p), bundle_dir / b.models[p].path.name)
            _copy_model_py("encoder.py", folder / "1")
            params += [
                _param("zsbir_device", opts.encoder_device),
                _param("zsbir_threads", opts.threads),
            ]
            head = ['backend: "python"']
        else:
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(b.model_path(prec), folder / "1" / "model.onnx")
            head = ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
        tail = [_instances(kind, 1 if opts.encoder != "python" else opts.instances), _batching(opts), *params]
        _write(folder / "config.pbtxt", _config(name, head, opts.max_batch, inputs, [output], tail))
        say(f"  {name}: {prec} {'(ONNX Runtime in the Python backend)' if opts.encoder == 'python' else ''}".rstrip())
        if prec == opts.precision:
            chosen = _Signature(image, domain, output, opts.max_batch)
        if opts.encoder != "python" and prec in groups:
            trt_batch = _write_tensorrt(b, tmp, opts, prec, groups[prec], inputs, output)
            if prec == opts.precision and opts.encoder == "tensorrt":
                chosen = _Signature(image, domain, output, trt_batch)
            say(f"  {encoder_model_name(prec, 'tensorrt')}: {len(groups[prec])} TensorRT plan(s)")
    assert chosen is not None  # opts.precision is in b.models (checked by the caller)
    return chosen


def _write_tensorrt(
    b: Bundle,
    tmp: Path,
    opts: TritonRepositoryOptions,
    prec: str,
    engines: list[EngineInfo],
    inputs: Sequence[TensorSpec],
    output: TensorSpec,
) -> int:
    """Write the TensorRT model of ``prec``; returns its max_batch_size (at most the engines' profiles allow)."""
    name = encoder_model_name(prec, "tensorrt")
    folder = tmp / name / "1"
    folder.mkdir(parents=True)
    cc_files: dict[str, str] = {}
    for e in engines:
        key = _cc_key(e.compute_capability)
        if key in cc_files:
            raise TritonError(
                f"bundle {b.path} has two {prec} plans for compute capability {key} ({cc_files[key]}, {e.path.name}); "
                "Triton picks a plan by compute capability only: keep one"
            )
        shutil.copyfile(b.engine_path(e), folder / e.path.name)
        cc_files[key] = e.path.name
    max_batch = min(opts.max_batch, *(e.max_batch for e in engines))
    opt_batch = min(max_batch, *(e.opt_batch for e in engines))
    cc = " ".join(f'cc_model_filenames {{ key: "{k}" value: "{v}" }}' for k, v in sorted(cc_files.items()))
    tail = [
        cc,
        _instances("KIND_GPU", 1),
        _batching(opts, [opt_batch] if opt_batch > 1 else []),
        _param("zsbir_fingerprint", b.fingerprint),
        _param("zsbir_precision", prec),
        _param("zsbir_tensorrt", ",".join(sorted({e.tensorrt for e in engines}))),
    ]
    _write(tmp / name / "config.pbtxt", _config(name, ['platform: "tensorrt_plan"'], max_batch, inputs, [output], tail))
    return max_batch


def _write_preprocess(b: Bundle, tmp: Path, opts: TritonRepositoryOptions, size: tuple[int, int]) -> None:
    folder = tmp / PREPROCESS
    _copy_model_py("preprocess.py", folder / "1")
    spec = {
        "fingerprint": b.fingerprint,
        "preprocess": {d: s.to_dict() for d, s in b.preprocess.items()},
        "domain_tags": b.domain_tags if b.domain_conditioned else None,
    }
    (folder / "1" / "preprocess.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    inputs = [TensorSpec("IMAGE", "TYPE_STRING", (1,)), TensorSpec("DOMAIN", "TYPE_STRING", (1,), optional=True)]
    outputs = [TensorSpec("PIXELS", "TYPE_FP32", (3, *size))]
    if b.domain_conditioned:
        outputs.append(TensorSpec("DOMAIN_TAG", "TYPE_INT64", (1,)))
    tail = [_instances("KIND_CPU", opts.instances), _batching(opts), _param("zsbir_fingerprint", b.fingerprint)]
    _write(folder / "config.pbtxt", _config(PREPROCESS, ['backend: "python"'], opts.max_batch, inputs, outputs, tail))


def _write_topk(b: Bundle, tmp: Path, opts: TritonRepositoryOptions, gallery: Path | None, dim: int) -> None:
    from zsbir_infer.expansion import recommended_expand

    folder = tmp / TOPK
    _copy_model_py("topk.py", folder / "1")
    inputs = [TensorSpec("EMBEDDING", "TYPE_FP32", (dim,)), TensorSpec("K", "TYPE_INT32", (1,), optional=True)]
    outputs = [
        TensorSpec("SCORES", "TYPE_FP32", (-1,)),
        TensorSpec("IDS", "TYPE_INT64", (-1,)),
        TensorSpec("PATHS", "TYPE_STRING", (-1,)),
    ]
    tail = [
        _instances("KIND_CPU", 1),
        _batching(opts),
        _param("zsbir_fingerprint", b.fingerprint),
        _param("zsbir_gallery", str(gallery) if gallery is not None else ""),
        _param("zsbir_device", opts.search_device),
        _param("zsbir_default_k", opts.default_k),
        _param("zsbir_expand", recommended_expand(b.manifest)),  # as Retriever.search with this bundle
    ]
    _write(folder / "config.pbtxt", _config(TOPK, ['backend: "python"'], opts.max_batch, inputs, outputs, tail))


def _write_ensemble(
    b: Bundle, tmp: Path, opts: TritonRepositoryOptions, sig: _Signature, size: tuple[int, int]
) -> None:
    folder = tmp / ENSEMBLE
    (folder / "1").mkdir(parents=True)  # an ensemble has no model file, but Triton wants its version folder
    inputs = [
        TensorSpec("IMAGE", "TYPE_STRING", (1,)),
        TensorSpec("K", "TYPE_INT32", (1,), optional=True),
        TensorSpec("DOMAIN", "TYPE_STRING", (1,), optional=True),
    ]
    outputs = [
        TensorSpec("SCORES", "TYPE_FP32", (-1,)),
        TensorSpec("IDS", "TYPE_INT64", (-1,)),
        TensorSpec("PATHS", "TYPE_STRING", (-1,)),
    ]
    enc = encoder_model_name(opts.precision, "tensorrt" if opts.encoder == "tensorrt" else "onnx")

    def step(model: str, ins: dict[str, str], outs: dict[str, str]) -> str:
        im = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in ins.items())
        om = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
        return f'    {{ model_name: "{model}" model_version: -1 {im} {om} }}'

    pre_out = {"PIXELS": "pixels"}
    enc_in = {sig.image.name: "pixels"}
    if sig.domain is not None:
        pre_out["DOMAIN_TAG"] = "domain_tag"
        enc_in[sig.domain.name] = "domain_tag"
    steps = [
        step(PREPROCESS, {"IMAGE": "IMAGE", "DOMAIN": "DOMAIN"}, pre_out),
        step(enc, enc_in, {sig.output.name: "embedding"}),
        step(TOPK, {"EMBEDDING": "embedding", "K": "K"}, {"SCORES": "SCORES", "IDS": "IDS", "PATHS": "PATHS"}),
    ]
    tail = [
        "ensemble_scheduling {",
        "  step [",
        ",\n".join(steps),
        "  ]",
        "}",
        _param("zsbir_fingerprint", b.fingerprint),
    ]
    # an ensemble may not take larger batches than any of its steps
    _write(folder / "config.pbtxt", _config(ENSEMBLE, ['platform: "ensemble"'], sig.max_batch, inputs, outputs, tail))


def _readme(b: Bundle, opts: TritonRepositoryOptions, gallery: Path | None, models: list[str]) -> str:
    enc = encoder_model_name(opts.precision, "tensorrt" if opts.encoder == "tensorrt" else "onnx")
    kinds = {
        "onnx": "platform `onnxruntime_onnx` (Triton's ONNX Runtime backend)",
        "tensorrt": "platform `tensorrt_plan`, one plan per GPU kind (`cc_model_filenames`)",
        "python": "the Python backend running ONNX Runtime on `1/bundle/` (no ONNX Runtime backend needed)",
    }
    where = f"`{gallery}`" if gallery else "`$ZSBIR_GALLERY` on the server (no gallery was given at export)"
    lines = [
        "# zsbir Triton model repository",
        "",
        f"Model fingerprint `{b.fingerprint}` (bundle `{b.path}`), embedding dimension {b.embedding_dim}, written by",
        "`zsbir export ... --triton`. Call **`zsbir_search`**; the other models are its steps.",
        "",
        "| model | what |",
        "| --- | --- |",
        "| `zsbir_search` | ensemble, the entry point: `IMAGE` (BYTES `[batch, 1]`, an encoded image file), optional "
        f"`K` (INT32 `[batch, 1]`, default {opts.default_k}) and `DOMAIN` (BYTES `[batch, 1]`, `sketch` (default) or "
        "`photo`) -> `SCORES` (FP32 `[batch, k]`, cosine), `IDS` (INT64, gallery row ids), `PATHS` (BYTES, relative "
        f"to the photo folder); its encoder step is `{enc}` |",
        "| `zsbir_preprocess` | Python backend: decodes the image and applies the bundle's preprocessing for its "
        "domain -> `PIXELS` (FP32 `[3, H, W]`)"
        + (" and `DOMAIN_TAG` (INT64)" if b.domain_conditioned else "")
        + "; a file that is not an image fails its request only |",
    ]
    for m in models:
        if m.startswith("zsbir_encoder_trt_"):
            lines.append(f"| `{m}` | {kinds['tensorrt']} |")
        elif m.startswith("zsbir_encoder"):
            lines.append(
                f"| `{m}` | the {m.removeprefix('zsbir_encoder_') if m != 'zsbir_encoder' else 'fp32'} "
                f"encoder: {kinds['python' if opts.encoder == 'python' else 'onnx']} |"
            )
    lines += [
        f"| `zsbir_topk` | Python backend: the gallery's top-k search ({opts.search_device}) over {where}, the same "
        "search as `zsbir_infer.Retriever.search`; it sees later `zsbir index` runs without a restart |",
        "",
        "Every model batches requests dynamically (`max_batch_size` "
        f"{opts.max_batch}, `max_queue_delay_microseconds` {opts.queue_delay_us}).",
        "",
        "## Starting Triton",
        "",
        "The Python models import `numpy`, `PIL`, `onnxruntime` and `zsbir_infer`: install zsbir into the Python",
        "environment of Triton's Python backend (`pip install zsbir`), or list the folders that hold them in",
        "`$ZSBIR_PYTHONPATH` (the backend's stub ignores `$PYTHONPATH`). The gallery path must exist on the server.",
        "",
        "```bash",
        "tritonserver --model-repository $PWD   # in the NGC image nvcr.io/nvidia/tritonserver:<version>-py3",
        "```",
        "",
        "or, on a machine with this zsbir installed, `zsbir serve --engine triton --gallery G` (the server from the",
        "`nvidia-pytriton` wheel: `python -m zsbir_infer.triton install`; HTTP on P, gRPC on P+1, metrics on P+2).",
        "",
        "```python",
        "import numpy as np, tritonclient.http as http",
        "c = http.InferenceServerClient('127.0.0.1:8000')",
        "img = http.InferInput('IMAGE', [1, 1], 'BYTES')",
        "img.set_data_from_numpy(np.array([[open('s.png', 'rb').read()]], dtype=object))",
        "r = c.infer('zsbir_search', [img])",
        "print(r.as_numpy('SCORES'), r.as_numpy('PATHS'))",
        "```",
        "",
    ]
    return "\n".join(lines)
