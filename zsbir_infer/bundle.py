"""Reading and validating model bundles (CONTRACTS §6): ``manifest.json`` plus ONNX models and TensorRT plans.

A bundle is a folder written by ``zsbir export``::

    BUNDLE/manifest.json
    BUNDLE/model.onnx                fp32, dynamic batch, L2-normalized output
    BUNDLE/model.fp16.onnx           optional
    BUNDLE/model.int8.onnx           optional (QDQ)
    BUNDLE/model.<prec>.<gpu>.plan   optional TensorRT engines

:meth:`Bundle.open` validates the manifest eagerly (clear errors for a missing folder or manifest, an
unknown ``format_version``, missing or ill-typed fields) and checks model files lazily: the first
:meth:`Bundle.model_path` call for a precision checks that the file exists and that its size and
SHA-256 match the manifest; :meth:`Bundle.verify` checks everything at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsbir_infer.errors import InputError
from zsbir_infer.preprocess import PreprocessSpec

__all__ = [
    "DEFAULT_DOMAIN_TAGS",
    "DOMAINS",
    "FORMAT",
    "FORMAT_VERSION",
    "PRECISIONS",
    "Bundle",
    "BundleError",
    "BundleManifest",
    "EngineEntry",
    "EngineInfo",
    "ModelEntry",
    "ModelFile",
    "canonical_preprocess_json",
    "check_domain",
    "compute_fingerprint",
    "default_bundle_path",
    "sha256_file",
    "synthetic_bundle_path",
]

FORMAT = "zsbir-bundle"
FORMAT_VERSION = 1
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
DOMAINS: tuple[str, ...] = ("photo", "sketch")
#: Domain tags of CONTRACTS §4, used when a manifest gives none.
DEFAULT_DOMAIN_TAGS: dict[str, int] = {"photo": 1, "sketch": 0}

_CHUNK = 1 << 20


class BundleError(InputError, ValueError):
    """A bundle is missing, malformed, of an unknown version, or its files do not match the manifest."""


def default_bundle_path() -> Path:
    """The embedded default bundle, ``zsbir_infer/assets/default`` (CONTRACTS §7)."""
    return Path(__file__).resolve().parent / "assets" / "default"


def synthetic_bundle_path() -> Path:
    """The bundle of the model trained on the synthetic benchmark, ``zsbir_infer/assets/synthetic``.

    ``zsbir demo`` uses it for its synthetic shapes; the default model (:func:`default_bundle_path`) is
    trained on real sketches and photos (CONTRACTS §7).
    """
    return Path(__file__).resolve().parent / "assets" / "synthetic"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_preprocess_json(preprocess: Mapping[str, Any]) -> str:
    """Canonical JSON of the per-domain specs: each spec normalized (defaults filled), keys sorted, no spaces."""
    norm = {
        str(domain): PreprocessSpec.from_dict(spec).to_dict()
        if not isinstance(spec, PreprocessSpec)
        else spec.to_dict()
        for domain, spec in preprocess.items()
    }
    return json.dumps(norm, sort_keys=True, separators=(",", ":"))


def compute_fingerprint(fp32_model: str | Path | bytes, preprocess: Mapping[str, Any]) -> str:
    """The bundle fingerprint: first 16 hex digits of SHA-256(fp32 model bytes + canonical preprocess JSON).

    ``fp32_model`` is the path of ``model.onnx`` or its bytes. Two bundles with the same fingerprint
    embed images identically (up to precision), so galleries use it to refuse mismatched queries.
    """
    h = hashlib.sha256()
    if isinstance(fp32_model, bytes):
        h.update(fp32_model)
    else:
        with open(fp32_model, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    h.update(canonical_preprocess_json(preprocess).encode("utf-8"))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelFile:
    """One ONNX model of a bundle (``manifest["models"][precision]``), its path resolved."""

    precision: str
    path: Path
    sha256: str | None
    bytes: int | None


@dataclass(frozen=True)
class EngineInfo:
    """One TensorRT engine (``manifest["engines"][i]``): built for one GPU model and TensorRT version."""

    precision: str
    path: Path
    gpu: str
    compute_capability: str
    tensorrt: str
    min_batch: int
    opt_batch: int
    max_batch: int
    sha256: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """``manifest["models"][precision]``: a file name inside the bundle, its SHA-256 and size."""

    file: str
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class EngineEntry:
    """``manifest["engines"][i]``; ``extra`` keeps the builder's other fields (written back unchanged)."""

    precision: str
    file: str
    gpu: str
    compute_capability: str
    tensorrt: str
    min_batch: int
    opt_batch: int
    max_batch: int
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def _req(d: Mapping[str, Any], key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise BundleError(f"manifest: missing field {where}{key!r}")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise BundleError(f"manifest: field {where}{key!r} must be {want}, got {value!r}")
    return value


def _file_name(file: str, where: str) -> str:
    p = Path(file)
    if p.is_absolute() or ".." in p.parts or not file:
        raise BundleError(f"manifest: {where} must be a file name inside the bundle, got {file!r}")
    return file


_MANIFEST_KEYS = frozenset(
    {"format", "format_version", "embedding_dim", "fingerprint", "metric", "normalized", "domain_handling"}
    | {"inputs", "outputs", "preprocess", "models", "engines"}
)


@dataclass(frozen=True)
class BundleManifest:
    """``manifest.json``, the contract between export (which writes it) and the runtime (which reads it).

    :meth:`from_dict` is the one validator (every reader goes through it); :meth:`to_dict` is what every
    writer stores; :meth:`create` fills sizes, hashes and the fingerprint from the files of a folder.
    ``extra`` carries the descriptive sections (``source``, ``calibration``, ``verification``,
    ``versions``, ``created``, ...) that the runtime shows but does not interpret.
    """

    embedding_dim: int
    domain_handling: str  # "input": the model takes a domain tag; "none": it does not
    preprocess: Mapping[str, PreprocessSpec]
    models: Mapping[str, ModelEntry]
    fingerprint: str
    input_size: tuple[int | None, int | None] = (None, None)
    image_input: str = "image"
    domain_input: str | None = None
    domain_tags: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_DOMAIN_TAGS))
    output_name: str = "embedding"
    metric: str = "ip"
    normalized: bool = True
    engines: tuple[EngineEntry, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def domain_conditioned(self) -> bool:
        """True when the model takes the domain tag as an input."""
        return self.domain_handling == "input"

    # ------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, m: Mapping[str, Any]) -> BundleManifest:
        """Validate a parsed ``manifest.json``; :class:`BundleError` names the first bad field."""
        fmt = m.get("format")
        if fmt != FORMAT:
            raise BundleError(f"not a zsbir bundle manifest (format is {fmt!r}, expected {FORMAT!r})")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"unsupported bundle format_version {version!r}: this zsbir reads version {FORMAT_VERSION}; "
                "re-export the bundle with this zsbir or upgrade zsbir"
            )
        embedding_dim = _req(m, "embedding_dim", "", int)
        if embedding_dim <= 0:
            raise BundleError(f"manifest: 'embedding_dim' must be positive, got {embedding_dim}")
        fingerprint = _req(m, "fingerprint", "", str)
        if not fingerprint:
            raise BundleError("manifest: 'fingerprint' is empty")
        metric = m.get("metric", "ip")
        if metric != "ip":
            raise BundleError(f"manifest: unsupported metric {metric!r} (only 'ip' is supported)")
        normalized = bool(m.get("normalized", True))
        domain_handling = _req(m, "domain_handling", "", str)
        if domain_handling not in ("input", "none"):
            raise BundleError(f"manifest: 'domain_handling' must be 'input' or 'none', got {domain_handling!r}")

        inputs = _req(m, "inputs", "", dict)
        image = _req(inputs, "image", "inputs.", dict)
        image_input = _req(image, "name", "inputs.image.", str)
        shape = image.get("shape", ["batch", 3, None, None])
        if not isinstance(shape, list) or len(shape) != 4 or shape[1] not in (3, "channels"):
            raise BundleError(f"manifest: inputs.image.shape must be [batch, 3, H, W], got {shape!r}")
        dtype = image.get("dtype", "float32")
        if dtype != "float32":
            raise BundleError(f"manifest: inputs.image.dtype must be 'float32', got {dtype!r}")
        h, w = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in shape[2:])
        input_size = (h, w)

        domain_input = None
        domain_tags = dict(DEFAULT_DOMAIN_TAGS)
        if domain_handling == "input":
            dom = _req(inputs, "domain", "inputs.", dict)
            domain_input = _req(dom, "name", "inputs.domain.", str)
            for d in DOMAINS:
                domain_tags[d] = _req(dom, d, "inputs.domain.", int)
            if dom.get("dtype", "int64") != "int64":
                raise BundleError(f"manifest: inputs.domain.dtype must be 'int64', got {dom.get('dtype')!r}")

        outputs = _req(m, "outputs", "", dict)
        emb = _req(outputs, "embedding", "outputs.", dict)
        output_name = _req(emb, "name", "outputs.embedding.", str)
        oshape = emb.get("shape")
        odim = oshape[1] if isinstance(oshape, list) and len(oshape) == 2 else None
        if isinstance(odim, int) and odim != embedding_dim:
            raise BundleError(
                f"manifest: outputs.embedding.shape[1] = {odim} disagrees with embedding_dim = {embedding_dim}"
            )

        pre = _req(m, "preprocess", "", dict)
        preprocess: dict[str, PreprocessSpec] = {}
        for d in DOMAINS:
            spec = _req(pre, d, "preprocess.", dict)
            try:
                preprocess[d] = PreprocessSpec.from_dict(spec)
            except ValueError as exc:
                raise BundleError(f"manifest: preprocess.{d}: {exc}") from None
            for axis, (want, got) in enumerate(zip(input_size, preprocess[d].size, strict=True)):
                if want is not None and want != got:
                    raise BundleError(
                        f"manifest: preprocess.{d}.size {list(preprocess[d].size)} does not match the "
                        f"model input {shape[2:]} (axis {axis + 2})"
                    )

        models_in = _req(m, "models", "", dict)
        if not models_in:
            raise BundleError("manifest: 'models' lists no model")
        models: dict[str, ModelEntry] = {}
        for prec, entry in models_in.items():
            if prec not in PRECISIONS:
                raise BundleError(f"manifest: unknown precision {prec!r} in 'models' (known: {list(PRECISIONS)})")
            if not isinstance(entry, dict):
                raise BundleError(f"manifest: models.{prec} must be an object")
            file = _file_name(_req(entry, "file", f"models.{prec}.", str), f"models.{prec}.file")
            sha = entry.get("sha256")
            size = entry.get("bytes")
            if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
                raise BundleError(f"manifest: models.{prec}.sha256 must be 64 hex digits, got {sha!r}")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise BundleError(f"manifest: models.{prec}.bytes must be a non-negative int, got {size!r}")
            models[prec] = ModelEntry(file, sha, size)

        engines: list[EngineEntry] = []
        engines_in = m.get("engines", [])
        if not isinstance(engines_in, list):
            raise BundleError("manifest: 'engines' must be a list")
        for i, e in enumerate(engines_in):
            where = f"engines[{i}]."
            if not isinstance(e, dict):
                raise BundleError(f"manifest: engines[{i}] must be an object")
            prec = _req(e, "precision", where, str)
            if prec not in PRECISIONS:
                raise BundleError(f"manifest: {where}precision {prec!r} unknown (known: {list(PRECISIONS)})")
            known = EngineEntry.__dataclass_fields__.keys() - {"extra"}
            info = EngineEntry(
                precision=prec,
                file=_file_name(_req(e, "file", where, str), f"{where}file"),
                gpu=_req(e, "gpu", where, str),
                compute_capability=str(_req(e, "compute_capability", where, (str, int, float))),
                tensorrt=str(_req(e, "tensorrt", where, str)),
                min_batch=_req(e, "min_batch", where, int),
                opt_batch=_req(e, "opt_batch", where, int),
                max_batch=_req(e, "max_batch", where, int),
                sha256=e.get("sha256") if isinstance(e.get("sha256"), str) else None,
                extra={k: v for k, v in e.items() if k not in known},
            )
            if not 1 <= info.min_batch <= info.opt_batch <= info.max_batch:
                raise BundleError(f"manifest: {where}batch sizes must satisfy 1 <= min <= opt <= max")
            engines.append(info)

        return cls(
            embedding_dim=embedding_dim,
            domain_handling=domain_handling,
            preprocess=preprocess,
            models=models,
            fingerprint=fingerprint,
            input_size=input_size,
            image_input=image_input,
            domain_input=domain_input,
            domain_tags=domain_tags,
            output_name=output_name,
            metric=metric,
            normalized=normalized,
            engines=tuple(engines),
            extra={k: v for k, v in m.items() if k not in _MANIFEST_KEYS},
        )

    # ------------------------------------------------------------------------------------- writing

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``manifest.json`` (``from_dict(to_dict())`` gives this manifest back)."""
        inputs: dict[str, Any] = {
            "image": {"name": self.image_input, "shape": ["batch", 3, *self.input_size], "dtype": "float32"}
        }
        if self.domain_conditioned:
            inputs["domain"] = {
                "name": self.domain_input or "domain",
                "shape": ["batch"],
                "dtype": "int64",
                **{d: int(self.domain_tags[d]) for d in DOMAINS},
            }
        models: dict[str, Any] = {}
        for prec in PRECISIONS:
            if prec in self.models:
                entry = self.models[prec]
                models[prec] = {"file": entry.file, "sha256": entry.sha256, "bytes": entry.bytes}
        engines = []
        for e in self.engines:
            fields = {k: getattr(e, k) for k in EngineEntry.__dataclass_fields__ if k not in ("extra", "sha256")}
            if e.sha256 is not None:
                fields["sha256"] = e.sha256
            engines.append({**fields, **e.extra})
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "embedding_dim": self.embedding_dim,
            "metric": self.metric,
            "normalized": self.normalized,
            "domain_handling": self.domain_handling,
            "inputs": inputs,
            "outputs": {
                "embedding": {"name": self.output_name, "shape": ["batch", self.embedding_dim], "dtype": "float32"}
            },
            "preprocess": {d: self.preprocess[d].to_dict() for d in DOMAINS},
            "models": models,
            "engines": engines,
            "fingerprint": self.fingerprint,
            **self.extra,
        }

    @classmethod
    def create(
        cls,
        folder: str | Path,
        *,
        models: Mapping[str, str],
        embedding_dim: int,
        domain_conditioned: bool,
        input_size: tuple[int, int],
        preprocess: Mapping[str, PreprocessSpec | Mapping[str, Any]],
        engines: Sequence[Mapping[str, Any]] = (),
        image_input: str = "image",
        domain_input: str = "domain",
        output_name: str = "embedding",
        normalized: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> BundleManifest:
        """The manifest of the bundle files in ``folder``: ``models`` maps precision -> file name (fp32 is
        required: the fingerprint is computed from it); sizes and SHA-256 are read from the files, and the
        result is validated as :meth:`from_dict` would."""
        root = Path(folder)
        if "fp32" not in models:
            raise BundleError("a bundle needs an fp32 model (its fingerprint is computed from it)")
        specs = {
            d: spec if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec)
            for d, spec in preprocess.items()
        }
        entries = {
            prec: ModelEntry(file, sha256_file(root / file), (root / file).stat().st_size)
            for prec, file in models.items()
        }
        draft = cls(
            embedding_dim=embedding_dim,
            domain_handling="input" if domain_conditioned else "none",
            preprocess=specs,
            models=entries,
            fingerprint=compute_fingerprint(root / models["fp32"], specs),
            input_size=input_size,
            image_input=image_input,
            domain_input=domain_input if domain_conditioned else None,
            output_name=output_name,
            normalized=normalized,
            extra=dict(extra or {}),
        )
        as_dict = draft.to_dict()
        as_dict["engines"] = [dict(e) for e in engines]
        return cls.from_dict(as_dict)


class Bundle:
    """A validated model bundle. Open with :meth:`Bundle.open`; attributes mirror ``manifest.json``."""

    path: Path
    manifest: dict[str, Any]
    #: The validated manifest.
    spec: BundleManifest
    embedding_dim: int
    fingerprint: str
    metric: str
    normalized: bool
    domain_handling: str
    image_input: str
    domain_input: str | None
    output_name: str
    input_size: tuple[int | None, int | None]
    domain_tags: dict[str, int]
    preprocess: dict[str, PreprocessSpec]
    models: dict[str, ModelFile]
    engines: list[EngineInfo]

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        """Validate ``manifest`` (already parsed) for the bundle folder ``path``; prefer :meth:`open`."""
        self.path = path
        self.manifest = manifest
        self._verified: set[Path] = set()
        self._lock = threading.Lock()
        self._parse(manifest)

    # ---------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | Path | None = None) -> Bundle:
        """Open the bundle folder ``path`` (or its ``manifest.json``); ``None`` opens the default bundle."""
        if path is None:
            root = default_bundle_path()
            if not (root / "manifest.json").is_file():
                raise BundleError(
                    f"the default model bundle is missing ({root}); pass --model BUNDLE, or create it with "
                    "`zsbir export CHECKPOINT -o zsbir_infer/assets/default`"
                )
        else:
            root = Path(path)
            if root.is_file() and root.name == "manifest.json":
                root = root.parent
            elif root.is_file():
                raise BundleError(
                    f"{root} is a file; a model bundle is a folder holding manifest.json (made by `zsbir export`)"
                )
        if not root.exists():
            raise BundleError(f"model bundle not found: {root}")
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a model bundle: it has no manifest.json (make one with `zsbir export`)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path}: the manifest must be a JSON object")
        try:
            bundle = cls(root, manifest)
        except BundleError as exc:
            raise BundleError(f"{manifest_path}: {exc}") from None
        bundle._check_fingerprint()
        return bundle

    def _check_fingerprint(self) -> None:
        """Recompute the fingerprint from the fp32 model file and the preprocessing, never take the manifest's
        word for it: galleries trust it to decide whether embeddings are comparable, so a bundle with changed
        weights (or preprocessing) but a copied fingerprint must be refused. The same read checks the file's
        SHA-256 when the manifest gives one (it is then not hashed again on first use)."""
        mf = self.models.get("fp32")
        if mf is None:
            raise BundleError(
                f"bundle {self.path} has no fp32 model, so its fingerprint cannot be checked; re-export the bundle"
            )
        if not mf.path.is_file():
            raise BundleError(f"bundle file missing: {mf.path} (listed in {self.path / 'manifest.json'})")
        if mf.bytes is not None and mf.path.stat().st_size != mf.bytes:
            return  # every use of the model fails on its size (model_path), with that message
        fp, sha = hashlib.sha256(), hashlib.sha256()
        with open(mf.path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                fp.update(chunk)
                sha.update(chunk)
        fp.update(canonical_preprocess_json(self.manifest["preprocess"]).encode("utf-8"))
        actual = fp.hexdigest()[:16]
        if actual != self.fingerprint:
            raise BundleError(
                f"bundle {self.path}: the manifest says fingerprint {self.fingerprint}, but its model and preprocess "
                f"give {actual}: the files were changed after export (or the manifest was edited), and galleries "
                "could mix embeddings of different models. Re-export the bundle with `zsbir export`"
            )
        if mf.sha256 is not None and sha.hexdigest() == mf.sha256.lower():
            with self._lock:
                self._verified.add(mf.path)

    def _parse(self, m: Mapping[str, Any]) -> None:
        spec = BundleManifest.from_dict(m)
        self.spec = spec
        self.embedding_dim = spec.embedding_dim
        self.fingerprint = spec.fingerprint
        self.metric = spec.metric
        self.normalized = spec.normalized
        self.domain_handling = spec.domain_handling
        self.image_input = spec.image_input
        self.input_size = spec.input_size
        self.domain_input = spec.domain_input
        self.domain_tags = dict(spec.domain_tags)
        self.output_name = spec.output_name
        self.preprocess = dict(spec.preprocess)
        self.models = {prec: ModelFile(prec, self.path / e.file, e.sha256, e.bytes) for prec, e in spec.models.items()}
        self.engines = [
            EngineInfo(
                precision=e.precision,
                path=self.path / e.file,
                gpu=e.gpu,
                compute_capability=e.compute_capability,
                tensorrt=e.tensorrt,
                min_batch=e.min_batch,
                opt_batch=e.opt_batch,
                max_batch=e.max_batch,
                sha256=e.sha256,
            )
            for e in spec.engines
        ]

    # ---------------------------------------------------------------------------------------- queries

    @property
    def precisions(self) -> list[str]:
        """Precisions with an ONNX model, in the order fp32, fp16, int8."""
        return [p for p in PRECISIONS if p in self.models]

    @property
    def domain_conditioned(self) -> bool:
        """True when the model takes the domain tag as an input."""
        return self.domain_handling == "input"

    def preprocess_spec(self, domain: str) -> PreprocessSpec:
        """The preprocessing spec for ``domain`` (``"photo"`` or ``"sketch"``)."""
        return self.preprocess[check_domain(domain)]

    def domain_tag(self, domain: str) -> int:
        """The integer tag of ``domain`` fed to conditioned models (photo 1, sketch 0 by default)."""
        return self.domain_tags[check_domain(domain)]

    def engines_for(self, precision: str) -> list[EngineInfo]:
        """TensorRT engines listed for ``precision``."""
        return [e for e in self.engines if e.precision == precision]

    def model_path(self, precision: str = "fp32", *, verify: bool = True) -> Path:
        """Path of the ONNX model for ``precision``, checked against the manifest on first use.

        Raises:
            BundleError: the precision is not in the bundle, the file is missing, or its size or
                SHA-256 differs from the manifest (``verify=False`` skips the hash).
        """
        if precision not in self.models:
            raise BundleError(
                f"bundle {self.path} has no {precision} model (available: {', '.join(self.precisions)}); "
                f"re-export with `zsbir export ... --precision {precision}`"
            )
        mf = self.models[precision]
        self._check_file(mf.path, mf.sha256, mf.bytes, verify=verify)
        return mf.path

    def engine_path(self, engine: EngineInfo, *, verify: bool = True) -> Path:
        """Path of a TensorRT plan, checked like :meth:`model_path` (hash only when the manifest gives one)."""
        self._check_file(engine.path, engine.sha256, None, verify=verify)
        return engine.path

    def _check_file(self, path: Path, sha: str | None, size: int | None, *, verify: bool) -> None:
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path} (listed in {self.path / 'manifest.json'})")
        if size is not None and path.stat().st_size != size:
            raise BundleError(
                f"bundle file {path} has {path.stat().st_size} bytes, the manifest says {size}: "
                "the file is corrupt or was replaced; re-export the bundle"
            )
        if not verify or sha is None:
            return
        with self._lock:
            if path in self._verified:
                return
            actual = sha256_file(path)
            if actual != sha.lower():
                raise BundleError(
                    f"bundle file {path} does not match the manifest (sha256 {actual[:16]}..., expected "
                    f"{sha[:16]}...): the file is corrupt or was replaced; re-export the bundle"
                )
            self._verified.add(path)

    def verify(self) -> None:
        """Check every model and engine file listed in the manifest (existence, size, SHA-256)."""
        for prec in self.precisions:
            self.model_path(prec)
        for e in self.engines:
            self.engine_path(e)

    def describe(self) -> dict[str, Any]:
        """A short JSON-able summary (for ``zsbir info``-style output)."""
        return {
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "embedding_dim": self.embedding_dim,
            "domain_handling": self.domain_handling,
            "input_size": list(self.input_size),
            "precisions": self.precisions,
            "engines": [
                {
                    "precision": e.precision,
                    "gpu": e.gpu,
                    "compute_capability": e.compute_capability,
                    "tensorrt": e.tensorrt,
                }
                for e in self.engines
            ],
            "source": self.manifest.get("source"),
        }

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, fingerprint={self.fingerprint!r}, dim={self.embedding_dim})"


def check_domain(domain: str) -> str:
    """Return ``domain`` if it is ``"photo"`` or ``"sketch"``, else raise ``ValueError``."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be 'photo' or 'sketch', got {domain!r}")
    return domain
