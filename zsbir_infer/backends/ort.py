"""ONNX Runtime backends: ``ort-cpu`` (CPUExecutionProvider) and ``ort-cuda`` (CUDAExecutionProvider)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from zsbir_infer.backends.base import Backend, BackendUnavailable, default_threads
from zsbir_infer.bundle import BundleError

if TYPE_CHECKING:
    from zsbir_infer.bundle import Bundle

__all__ = ["OrtBackend", "ort_session_options"]

log = logging.getLogger("zsbir.backends.ort")

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return ort


def ort_session_options(threads: int | None = None, *, spinning: bool = False) -> Any:
    """Session options used by the runtime: all graph optimizations, ``threads`` intra-op threads
    (default :func:`default_threads`), one inter-op thread, sequential execution, warnings silenced.

    Spinning is off by default: the encoder decodes images on other threads while the model runs, and
    spinning intra-op threads would steal their cores.
    """
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads if threads is not None else default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtBackend(Backend):
    """Runs ``models[precision]`` of a bundle with ONNX Runtime on the CPU or with CUDA."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        *,
        provider: str = "cpu",
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        """Create the session; raises :class:`BackendUnavailable` when the provider cannot run here."""
        if provider not in ("cpu", "cuda"):
            raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
        ort = _import_ort()
        self.name = f"ort-{provider}"
        if provider == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(
                    "this onnxruntime has no CUDA execution provider (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu (pip install 'zsbir[gpu]')"
                )
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        path = bundle.model_path(precision)
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=ort_session_options(threads), providers=providers
            )
        except Exception as exc:
            if provider == "cuda":
                raise BackendUnavailable(f"ONNX Runtime could not start CUDA: {exc}") from None
            raise BundleError(f"ONNX Runtime cannot load {path}: {exc}") from None
        if provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(
                "ONNX Runtime fell back to the CPU: the CUDA execution provider did not load "
                "(no GPU, or CUDA/cuDNN libraries missing)"
            )
        self.device_id = device_id
        self.precision = precision
        self._bind(bundle, path)
        if provider == "cpu" and precision == "fp16":
            log.warning("fp16 models run on the CPU through float16 emulation; fp32 is usually faster there")

    def _bind(self, bundle: Bundle, path: object) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if bundle.image_input not in inputs:
            raise BundleError(f"{path}: the model has no input {bundle.image_input!r} (it has {sorted(inputs)})")
        if bundle.output_name not in outputs:
            raise BundleError(f"{path}: the model has no output {bundle.output_name!r} (it has {sorted(outputs)})")
        expected = {bundle.image_input} | ({bundle.domain_input} if bundle.domain_input else set())
        if set(inputs) != expected:
            raise BundleError(
                f"{path}: the model's inputs {sorted(inputs)} disagree with the manifest ({sorted(expected)}, "
                f"domain_handling={bundle.domain_handling!r})"
            )
        itype = inputs[bundle.image_input].type
        if itype not in _ORT_DTYPES:
            raise BundleError(f"{path}: unsupported image input type {itype} (need float or float16)")
        self._image_name = bundle.image_input
        self._image_dtype = _ORT_DTYPES[itype]
        self._domain_name = bundle.domain_input
        self._output_name = bundle.output_name

    def run(self, images: np.ndarray, tags: np.ndarray | None) -> np.ndarray:
        """Embed one float32 NCHW batch (tags: int64 [N] for domain-conditioned models)."""
        feed: dict[str, np.ndarray] = {self._image_name: images.astype(self._image_dtype, copy=False)}
        if self._domain_name is not None:
            if tags is None:
                raise ValueError("this model needs domain tags")
            feed[self._domain_name] = tags.astype(np.int64, copy=False)
        out = self.session.run([self._output_name], feed)[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> str:
        """Backend name, providers and precision."""
        session = self.__dict__.get("session")
        providers = ", ".join(session.get_providers()) if session is not None else "closed"
        return f"{self.name} ({providers}, {self.precision})"

    def close(self) -> None:
        """Drop the session."""
        self.__dict__.pop("session", None)
