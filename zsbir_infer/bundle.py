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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsbir_infer.preprocess import PreprocessSpec

__all__ = [
    "DEFAULT_DOMAIN_TAGS",
    "DOMAINS",
    "FORMAT",
    "FORMAT_VERSION",
    "PRECISIONS",
    "Bundle",
    "BundleError",
    "EngineInfo",
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


class BundleError(ValueError):
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
    """One ONNX model of a bundle (``manifest["models"][precision]``)."""

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


def _req(d: Mapping[str, Any], key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise BundleError(f"manifest: missing field {where}{key!r}")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise BundleError(f"manifest: field {where}{key!r} must be {want}, got {value!r}")
    return value


class Bundle:
    """A validated model bundle. Open with :meth:`Bundle.open`; attributes mirror ``manifest.json``."""

    path: Path
    manifest: dict[str, Any]
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
        fmt = m.get("format")
        if fmt != FORMAT:
            raise BundleError(f"not a zsbir bundle manifest (format is {fmt!r}, expected {FORMAT!r})")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"unsupported bundle format_version {version!r}: this zsbir reads version {FORMAT_VERSION}; "
                "re-export the bundle with this zsbir or upgrade zsbir"
            )
        self.embedding_dim = _req(m, "embedding_dim", "", int)
        if self.embedding_dim <= 0:
            raise BundleError(f"manifest: 'embedding_dim' must be positive, got {self.embedding_dim}")
        self.fingerprint = _req(m, "fingerprint", "", str)
        if not self.fingerprint:
            raise BundleError("manifest: 'fingerprint' is empty")
        self.metric = m.get("metric", "ip")
        if self.metric != "ip":
            raise BundleError(f"manifest: unsupported metric {self.metric!r} (only 'ip' is supported)")
        self.normalized = bool(m.get("normalized", True))
        self.domain_handling = _req(m, "domain_handling", "", str)
        if self.domain_handling not in ("input", "none"):
            raise BundleError(f"manifest: 'domain_handling' must be 'input' or 'none', got {self.domain_handling!r}")

        inputs = _req(m, "inputs", "", dict)
        image = _req(inputs, "image", "inputs.", dict)
        self.image_input = _req(image, "name", "inputs.image.", str)
        shape = image.get("shape", ["batch", 3, None, None])
        if not isinstance(shape, list) or len(shape) != 4 or shape[1] not in (3, "channels"):
            raise BundleError(f"manifest: inputs.image.shape must be [batch, 3, H, W], got {shape!r}")
        dtype = image.get("dtype", "float32")
        if dtype != "float32":
            raise BundleError(f"manifest: inputs.image.dtype must be 'float32', got {dtype!r}")
        h, w = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in shape[2:])
        self.input_size = (h, w)

        self.domain_input = None
        self.domain_tags = dict(DEFAULT_DOMAIN_TAGS)
        if self.domain_handling == "input":
            dom = _req(inputs, "domain", "inputs.", dict)
            self.domain_input = _req(dom, "name", "inputs.domain.", str)
            for d in DOMAINS:
                self.domain_tags[d] = _req(dom, d, "inputs.domain.", int)
            if dom.get("dtype", "int64") != "int64":
                raise BundleError(f"manifest: inputs.domain.dtype must be 'int64', got {dom.get('dtype')!r}")

        outputs = _req(m, "outputs", "", dict)
        emb = _req(outputs, "embedding", "outputs.", dict)
        self.output_name = _req(emb, "name", "outputs.embedding.", str)
        oshape = emb.get("shape")
        odim = oshape[1] if isinstance(oshape, list) and len(oshape) == 2 else None
        if isinstance(odim, int) and odim != self.embedding_dim:
            raise BundleError(
                f"manifest: outputs.embedding.shape[1] = {odim} disagrees with embedding_dim = {self.embedding_dim}"
            )

        pre = _req(m, "preprocess", "", dict)
        self.preprocess = {}
        for d in DOMAINS:
            spec = _req(pre, d, "preprocess.", dict)
            try:
                self.preprocess[d] = PreprocessSpec.from_dict(spec)
            except ValueError as exc:
                raise BundleError(f"manifest: preprocess.{d}: {exc}") from None
            for axis, (want, got) in enumerate(zip(self.input_size, self.preprocess[d].size, strict=True)):
                if want is not None and want != got:
                    raise BundleError(
                        f"manifest: preprocess.{d}.size {list(self.preprocess[d].size)} does not match the "
                        f"model input {shape[2:]} (axis {axis + 2})"
                    )

        models = _req(m, "models", "", dict)
        if not models:
            raise BundleError("manifest: 'models' lists no model")
        self.models = {}
        for prec, entry in models.items():
            if prec not in PRECISIONS:
                raise BundleError(f"manifest: unknown precision {prec!r} in 'models' (known: {list(PRECISIONS)})")
            if not isinstance(entry, dict):
                raise BundleError(f"manifest: models.{prec} must be an object")
            file = _req(entry, "file", f"models.{prec}.", str)
            sha = entry.get("sha256")
            size = entry.get("bytes")
            if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
                raise BundleError(f"manifest: models.{prec}.sha256 must be 64 hex digits, got {sha!r}")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise BundleError(f"manifest: models.{prec}.bytes must be a non-negative int, got {size!r}")
            self.models[prec] = ModelFile(prec, self._inside(file, f"models.{prec}.file"), sha, size)

        self.engines = []
        engines = m.get("engines", [])
        if not isinstance(engines, list):
            raise BundleError("manifest: 'engines' must be a list")
        for i, e in enumerate(engines):
            where = f"engines[{i}]."
            if not isinstance(e, dict):
                raise BundleError(f"manifest: engines[{i}] must be an object")
            prec = _req(e, "precision", where, str)
            if prec not in PRECISIONS:
                raise BundleError(f"manifest: {where}precision {prec!r} unknown (known: {list(PRECISIONS)})")
            info = EngineInfo(
                precision=prec,
                path=self._inside(_req(e, "file", where, str), f"{where}file"),
                gpu=_req(e, "gpu", where, str),
                compute_capability=str(_req(e, "compute_capability", where, (str, int, float))),
                tensorrt=str(_req(e, "tensorrt", where, str)),
                min_batch=_req(e, "min_batch", where, int),
                opt_batch=_req(e, "opt_batch", where, int),
                max_batch=_req(e, "max_batch", where, int),
                sha256=e.get("sha256") if isinstance(e.get("sha256"), str) else None,
            )
            if not 1 <= info.min_batch <= info.opt_batch <= info.max_batch:
                raise BundleError(f"manifest: {where}batch sizes must satisfy 1 <= min <= opt <= max")
            self.engines.append(info)

    def _inside(self, file: str, where: str) -> Path:
        p = Path(file)
        if p.is_absolute() or ".." in p.parts or not file:
            raise BundleError(f"manifest: {where} must be a file name inside the bundle, got {file!r}")
        return self.path / p

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
