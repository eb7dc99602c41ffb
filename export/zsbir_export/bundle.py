"""Write a deployable bundle (CONTRACTS §6): ONNX fp32/fp16/int8, optional TensorRT plans, manifest.json.

:func:`export_bundle` does the whole export: fp32 graph, fp16 conversion, INT8 calibration, verification
against the torch model, TensorRT engines and the manifest. The bundle is assembled in a sibling folder
``BUNDLE.tmp-XXXX`` and renamed into place only after every check passed, so a reader never sees a
half-written bundle. A bundle that fails verification is kept, for inspection only, as ``BUNDLE.failed``
(its manifest says ``"verification": {"passed": false, ...}``) and :class:`VerificationFailed` says which
check failed by how much.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsbir_export.calibration import (
    HOLDOUT_FRACTION,
    CalibrationError,
    DataSource,
    HoldoutSplit,
    ImageSet,
    load_images,
    open_source,
    pick,
    random_images,
    split_holdout,
)
from zsbir_export.onnx_export import DEFAULT_OPSET, DOMAIN_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, Exporter
from zsbir_export.quantize import CALIB_METHODS, FLOAT_POLICIES, CalibMethod, FloatPolicy, Measure
from zsbir_export.verify import CheckResult, Tolerances
from zsbir_infer.bundle import PRECISIONS, BundleManifest, sha256_file
from zsbir_infer.errors import InputError, ModelError
from zsbir_infer.fsio import atomic_write_json

MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# The INT8 sensitivity fallback stops when the *lower prediction bound* of the top-10 overlap on the holdout
# (held-out seen classes; see calibration.split_holdout and verify.overlap_estimate) is at least this far
# above the verification's overlap limit, and the holdout |delta mAP@all| is within its limit. The bound
# already allows for another set of classes behaving differently; the margin only absorbs rounding.
FALLBACK_MARGIN = 0.005
Log = Callable[[str], None]


class ExportOptionsError(InputError, RuntimeError):
    """Unusable export options or inputs (nothing is written). A bundle that is itself bad is
    :class:`zsbir_infer.bundle.BundleError`."""


class VerificationFailed(ModelError, RuntimeError):
    """Raised when an exported model misses its tolerance; ``failed_dir`` holds the rejected attempt."""

    def __init__(self, checks: Sequence[CheckResult], failed_dir: Path | None) -> None:
        self.checks = list(checks)
        self.failed_dir = failed_dir
        bad = "; ".join(c.describe() for c in checks if not c.passed)
        where = f" (the rejected bundle is kept for inspection in {failed_dir})" if failed_dir else ""
        super().__init__(f"export verification failed: {bad}{where}")


@dataclass
class ExportOptions:
    """Everything ``zsbir export`` can be asked for (see the command's help)."""

    precisions: Sequence[str] = ("fp32",)
    calib_dir: Path | None = None
    calib_count: int = 512
    calib_method: CalibMethod = "mse"
    int8_fallback: int = 8
    int8_float_policy: FloatPolicy = "first-last"
    holdout_fraction: float = HOLDOUT_FRACTION
    holdout_count: int | None = 1000
    verify_count: int = 32
    eval_count: int | None = 1000
    trt: bool = False
    opt_batch: int = 32
    max_batch: int = 256
    trt_optimization_level: int = 3
    timing_cache: Path | None = None
    exporter: Exporter = "dynamo"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    keep_failed: bool = True
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)

    def normalized_precisions(self) -> list[str]:
        """The requested precisions in canonical order, fp32 always included (model.onnx is mandatory)."""
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ExportOptionsError(f"unknown precision {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
        return [p for p in PRECISIONS if p == "fp32" or p in self.precisions]

    def validate(self) -> list[str]:
        """Check the options before any work is done; return the precisions to build."""
        precisions = self.normalized_precisions()
        if "int8" in precisions and self.calib_dir is None:
            raise ExportOptionsError(
                "INT8 needs calibration images: pass --calib DIR (a benchmark folder, or a folder with photo/ and "
                "sketch/ subfolders)"
            )
        if self.calib_dir is not None and not Path(self.calib_dir).is_dir():
            raise ExportOptionsError(f"calibration folder does not exist: {self.calib_dir}")
        if self.calib_method not in CALIB_METHODS:
            raise ExportOptionsError(
                f"unknown calibration method {self.calib_method!r}; choose {', '.join(CALIB_METHODS)}"
            )
        if self.int8_float_policy not in FLOAT_POLICIES:
            raise ExportOptionsError(
                f"unknown INT8 float policy {self.int8_float_policy!r}; choose {', '.join(FLOAT_POLICIES)}"
            )
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ExportOptionsError(f"the holdout fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.holdout_count is not None and self.holdout_count < 1:
            raise ExportOptionsError(f"the holdout image count must be positive, got {self.holdout_count}")
        if self.int8_fallback < 0:
            raise ExportOptionsError(
                f"--int8-fallback must be 0 (off) or a positive number of layers, got {self.int8_fallback}"
            )
        if self.calib_count < 2:
            raise ExportOptionsError(f"--calib-count must be at least 2 (one image per domain), got {self.calib_count}")
        if self.verify_count < 1:
            raise ExportOptionsError(f"the verification sample count must be positive, got {self.verify_count}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ExportOptionsError(
                f"batch sizes must satisfy 1 <= --opt-batch <= --max-batch, got {self.opt_batch} and {self.max_batch}"
            )
        if self.trt:
            from zsbir_export.tensorrt_build import TensorRTUnavailable, tensorrt_module

            try:
                tensorrt_module()
            except TensorRTUnavailable as exc:
                raise ExportOptionsError(str(exc)) from exc
        return precisions


def _versions(exporter: str, opset: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import zsbir_export

    return {
        "zsbir": zsbir_export.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "opset": opset,
        "exporter": f"torch.onnx ({exporter})",
    }


def _preprocess_specs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    from zsbir_infer.preprocess import PreprocessSpec

    specs = config.get("preprocess")
    if not isinstance(specs, Mapping) or not all(d in specs for d in ("photo", "sketch")):
        raise ExportOptionsError("the checkpoint config has no preprocess spec for both 'photo' and 'sketch'")
    out: dict[str, dict[str, Any]] = {}
    for domain in ("photo", "sketch"):
        try:
            out[domain] = PreprocessSpec.from_dict(specs[domain]).to_dict()
        except ValueError as exc:
            raise ExportOptionsError(f"the checkpoint's {domain} preprocess spec is invalid: {exc}") from exc
    if out["photo"]["size"] != out["sketch"]["size"]:
        raise ExportOptionsError(
            f"photo and sketch input sizes differ ({out['photo']['size']} vs {out['sketch']['size']}); "
            "one graph needs one input size"
        )
    return out


def _arch(config: Mapping[str, Any]) -> dict[str, Any]:
    arch = config.get("arch")
    if not isinstance(arch, Mapping):
        raise ExportOptionsError("the checkpoint config has no 'arch' section")
    if not isinstance(arch.get("domain_conditioned", False), bool):
        raise ExportOptionsError("arch.domain_conditioned must be true or false")
    return dict(arch)


def _new_tmp_dir(out: Path) -> Path:
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def _is_bundle_file(name: str) -> bool:
    return name in ("manifest.json", *MODEL_FILES.values()) or (name.startswith("model.") and name.endswith(".plan"))


def _place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` bundle to ``dest``.

    A new ``dest`` (or one holding only bundle files) is swapped in whole with renames. A ``dest`` that also
    holds other files (the embedded default bundle sits beside its training checkpoint) keeps them: its old
    manifest is removed first, the new files are renamed in, stale bundle files are deleted and the new
    manifest is renamed in last, so a reader never sees a manifest that does not match its files.
    """
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if not overwrite:
        raise ExportOptionsError(f"{dest} already exists (pass --overwrite to replace it)")
    others = [p.name for p in dest.iterdir() if not _is_bundle_file(p.name)]
    if not others:
        old = dest.parent / f"{dest.name}.old-{secrets.token_hex(4)}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    (dest / "manifest.json").unlink(missing_ok=True)
    new_files = {p.name for p in tmp.iterdir()}
    for name in sorted(new_files - {"manifest.json"}):
        os.replace(tmp / name, dest / name)
    for p in dest.iterdir():
        if _is_bundle_file(p.name) and p.name not in new_files and p.is_file():
            p.unlink()
    os.replace(tmp / "manifest.json", dest / "manifest.json")
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ExportResult:
    """A written bundle: its folder and manifest."""

    path: Path
    manifest: dict[str, Any]
    checks: list[CheckResult]


def export_bundle(
    model: Any,
    config: Mapping[str, Any],
    out: str | Path,
    options: ExportOptions,
    *,
    source: Mapping[str, Any],
    log: Log | None = None,
) -> ExportResult:
    """Export ``model`` (an eval-mode torch module with ``embed(images, tag)``) to the bundle folder ``out``.

    ``config`` is the checkpoint config (CONTRACTS §5: ``arch.domain_conditioned``, ``preprocess``);
    ``source`` is the manifest's ``source`` entry (path, sha256, format, method). Raises :class:`ExportOptionsError`
    for bad options or inputs, :class:`VerificationFailed` when a model misses its tolerances.
    """
    say: Log = log or (lambda _msg: None)
    out = Path(out)
    precisions = options.validate()
    if out.exists() and not options.overwrite:
        raise ExportOptionsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportOptionsError(f"{out} exists and is not a bundle folder")
    preprocess = _preprocess_specs(config)
    arch = _arch(config)
    conditioned = bool(arch.get("domain_conditioned", False))
    size = tuple(preprocess["photo"]["size"])
    input_size = (int(size[0]), int(size[1]))

    # Read the calibration folder before the (slow) export so that a bad folder fails fast.
    data: DataSource | None = None
    if options.calib_dir is not None:
        try:
            data = open_source(options.calib_dir)
        except CalibrationError as exc:
            raise ExportOptionsError(str(exc)) from exc

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp_dir(out)
    try:
        result = _build(
            model, config, out, tmp, options, precisions, preprocess, conditioned, input_size, data, source, say
        )
    except VerificationFailed as exc:
        failed: Path | None = None
        if options.keep_failed:
            failed = out.parent / f"{out.name}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise VerificationFailed(exc.checks, failed) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _build(
    model: Any,
    config: Mapping[str, Any],
    out: Path,
    tmp: Path,
    options: ExportOptions,
    precisions: list[str],
    preprocess: dict[str, dict[str, Any]],
    conditioned: bool,
    input_size: tuple[int, int],
    data: DataSource | None,
    source: Mapping[str, Any],
    say: Log,
) -> ExportResult:
    from zsbir_export.fp16 import convert_file_to_fp16
    from zsbir_export.onnx_export import export_onnx
    from zsbir_export.quantize import quantize_int8
    from zsbir_export.verify import OnnxEmbedder, torch_embedder, verify_models

    say(f"exporting fp32 ONNX ({options.exporter} exporter, opset {options.opset}) ...")
    info = export_onnx(
        model,
        tmp / MODEL_FILES["fp32"],
        domain_conditioned=conditioned,
        input_size=input_size,
        opset=options.opset,
        exporter=options.exporter,
    )
    if "fp16" in precisions:
        say("converting to fp16 ...")
        convert_file_to_fp16(tmp / MODEL_FILES["fp32"], tmp / MODEL_FILES["fp16"])

    calibration_entry: dict[str, Any] | None = None
    evaluation: ImageSet | None = None
    evaluation_source = ""
    split: HoldoutSplit | None = None
    if data is not None:
        trained = config.get("class_names")
        split = split_holdout(
            data,
            fraction=options.holdout_fraction,
            seed=options.seed,
            trained_classes=[str(c) for c in trained] if isinstance(trained, list) else None,
        )
        evaluation, evaluation_source = _evaluation_set(data, split, preprocess, options)
    if "int8" in precisions:
        assert data is not None and split is not None  # validate() guarantees --calib with int8
        per_domain = max(1, options.calib_count // 2)
        say(f"loading up to {per_domain} calibration images per domain from {data.root} ...")
        calib = load_images(split.calibration, preprocess, per_domain, seed=options.seed)
        holdout: ImageSet | None = None
        if split.usable():
            holdout = load_images(split.holdout, preprocess, options.holdout_count, seed=options.seed + 2)
        _check_disjoint(calib, holdout, evaluation)
        check = _holdout_check(tmp / MODEL_FILES["fp32"], holdout, options.tolerances)
        holdout_source = f"holdout: {split.rule}" if check is not None else ""
        say(f"calibrating INT8 ({options.calib_method}) on {len(calib)} images ...")
        report = quantize_int8(
            tmp / MODEL_FILES["fp32"],
            tmp / MODEL_FILES["int8"],
            calib,
            method=options.calib_method,
            max_float_layers=options.int8_fallback,
            target_overlap=min(1.0, options.tolerances.int8_min_top10_overlap + FALLBACK_MARGIN),
            check=check,
            check_source=(
                f"{holdout_source} ({len(holdout)} images), lower prediction bound of the top-10 overlap"
                if holdout is not None and check is not None
                else ""
            ),
            float_policy=options.int8_float_policy,
        )
        if report.fallback_nodes:
            say(f"  kept {len(report.fallback_nodes)} sensitive layer(s) in float: {', '.join(report.fallback_nodes)}")
        calibration_entry = {
            **report.to_dict(),
            "source": data.describe(),
            "seed": options.seed,
            "split": {
                **split.describe(),
                "calibration_images": {"photo": calib.count("photo"), "sketch": calib.count("sketch")},
                "holdout_images": {
                    "photo": holdout.count("photo") if holdout is not None else 0,
                    "sketch": holdout.count("sketch") if holdout is not None else 0,
                },
                "evaluation": evaluation_source,
                "disjoint": "calibration, holdout and evaluation images are pairwise disjoint"
                if data.evaluation is not None
                else "the holdout is disjoint from calibration and evaluation images",
                "used_for": {
                    "calibration": "activation ranges; ranking of layers by sensitivity",
                    "holdout": "the sensitivity fallback's stop criterion",
                    "evaluation": "the verification report only",
                },
            },
        }

    if data is not None and evaluation is not None and len(evaluation) >= 2:
        samples = _subsample(evaluation, options.verify_count, options.seed)
        sample_source = evaluation_source
    else:
        samples = random_images(options.verify_count, input_size, seed=options.seed)
        sample_source = "random normal inputs (no --calib folder given)"

    say("verifying the exported models against torch ...")
    models = {p: OnnxEmbedder(tmp / MODEL_FILES[p]) for p in precisions}
    verification, checks = verify_models(
        torch_embedder(model),
        dict(models),
        samples,
        options.tolerances,
        evaluation=evaluation if "int8" in precisions or "fp16" in precisions else None,
        sample_source=sample_source,
        evaluation_source=evaluation_source,
    )
    manifest = _manifest(
        tmp,
        precisions,
        info.embedding_dim,
        conditioned,
        input_size,
        preprocess,
        source,
        calibration_entry,
        verification,
        options,
        engines=[],
        retrieval=config.get("retrieval"),
    )
    _write_manifest(tmp, manifest)
    if not verification["passed"]:
        raise VerificationFailed(checks, None)
    for c in checks:
        say(f"  {c.describe()}")

    if options.trt:
        engines = _build_engines(tmp, precisions, conditioned, input_size, options, say)
        manifest = BundleManifest.from_dict({**manifest, "engines": engines}).to_dict()
        _write_manifest(tmp, manifest)
    _place(tmp, out, options.overwrite)
    return ExportResult(out, manifest, checks)


def _holdout_check(fp32_path: Path, holdout: ImageSet | None, tolerances: Tolerances) -> _HoldoutCheck | None:
    """The sensitivity fallback's measure on the holdout; None without a holdout of both domains."""
    if holdout is None or holdout.count("photo") == 0 or holdout.count("sketch") == 0:
        return None
    return _HoldoutCheck(fp32_path, holdout, tolerances)


class _HoldoutCheck:
    """``check(path) -> Measure``: a lower prediction bound of the int8 top-10 overlap with fp32 on the holdout
    (see :func:`zsbir_export.verify.overlap_estimate`), and, with labels, the holdout |delta mAP@all|."""

    def __init__(self, fp32_path: Path, data: ImageSet, tolerances: Tolerances) -> None:
        from zsbir_export.verify import OnnxEmbedder, embed_all, retrieval_metrics

        self.data = data
        self.tolerances = tolerances
        self.labelled = bool((data.labels >= 0).all())
        self.base = embed_all(OnnxEmbedder(fp32_path), data)
        self.base_map = retrieval_metrics(self.base, data)["map_all"] if self.labelled else None

    def __call__(self, path: Path) -> Measure:
        from zsbir_export.verify import OnnxEmbedder, embed_all, overlap_estimate, retrieval_metrics

        emb = embed_all(OnnxEmbedder(path), self.data)
        details: dict[str, Any] = dict(overlap_estimate(self.base, emb, self.data))
        ok = True
        if self.base_map is not None:
            delta = float(retrieval_metrics(emb, self.data)["map_all"] - self.base_map)
            details["delta_map_all"] = delta
            ok = abs(delta) <= self.tolerances.int8_max_map_delta
        return Measure(float(details["lower_bound"]), ok, details)


def _check_disjoint(calib: ImageSet, holdout: ImageSet | None, evaluation: ImageSet | None) -> None:
    """Refuse to go on if the holdout shares an image with calibration or evaluation (a bug, never expected)."""
    if holdout is None:
        return
    held = set(holdout.paths)
    for name, other in (("calibration", calib), ("evaluation", evaluation)):
        if other is not None and held & set(other.paths):
            raise ExportOptionsError(f"internal error: the INT8 holdout shares images with the {name} set")


def _subsample(data: ImageSet, per_domain: int, seed: int) -> ImageSet:
    """A seeded random subset of up to ``per_domain`` images of each domain (spread over the classes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = []
    for tag in (1, 0):
        idx = np.flatnonzero(data.domains == tag)
        parts.append(np.sort(rng.choice(idx, size=min(per_domain, len(idx)), replace=False)))
    return data.take(np.concatenate(parts))


def _evaluation_set(
    data: DataSource, split: HoldoutSplit, preprocess: dict[str, dict[str, Any]], options: ExportOptions
) -> tuple[ImageSet, str]:
    """The images of the retrieval checks and where they come from; never the holdout's.

    Benchmark: the unseen split (classes calibration never saw), up to ``eval_count`` images per domain.
    Plain folder: the images neither calibration nor the holdout uses, or, when the folder is too small for
    that, all non-holdout images (the description says so).
    """
    if data.evaluation is not None:
        images = load_images(data.evaluation, preprocess, options.eval_count, seed=options.seed + 1)
        return images, f"benchmark {data.root}, unseen split"
    per_domain = max(1, options.calib_count // 2)
    rest: dict[str, list[Any]] = {}
    held_out = True
    for domain, items in split.calibration.items():
        chosen = {str(it.path) for it in pick(items, per_domain, options.seed, domain)}
        rest[domain] = [it for it in items if str(it.path) not in chosen]
        if not rest[domain]:
            rest[domain] = list(items)
            held_out = False
    images = load_images(rest, preprocess, options.eval_count, seed=options.seed + 1)
    what = (
        "images not used for calibration or the holdout"
        if held_out
        else "all non-holdout images, including calibration ones (too few)"
    )
    return images, f"folder {data.root}, {what}"


def _build_engines(
    tmp: Path,
    precisions: list[str],
    conditioned: bool,
    input_size: tuple[int, int],
    options: ExportOptions,
    say: Log,
) -> list[dict[str, Any]]:
    from zsbir_export.tensorrt_build import EngineSpec, build_engine, current_gpu, plan_file_name

    gpu = current_gpu()
    cache = options.timing_cache or Path.home() / ".cache" / "zsbir" / f"tensorrt-{gpu.slug}.timing-cache"
    engines = []
    for precision in precisions:
        source = MODEL_FILES["int8" if precision == "int8" else "fp32"]
        spec = EngineSpec(
            precision=precision,
            onnx_path=tmp / source,
            plan_path=tmp / plan_file_name(precision, gpu),
            image_shape=(3, input_size[0], input_size[1]),
            has_domain_input=conditioned,
            min_batch=1,
            opt_batch=options.opt_batch,
            max_batch=options.max_batch,
            optimization_level=options.trt_optimization_level,
            timing_cache=cache,
        )
        say(f"building the TensorRT {precision} engine for {gpu.name} ...")
        entry = build_engine(spec, gpu)
        entry["sha256"] = sha256_file(spec.plan_path)
        entry["bytes"] = spec.plan_path.stat().st_size
        engines.append(entry)
    return engines


def _manifest(
    folder: Path,
    precisions: list[str],
    embedding_dim: int,
    conditioned: bool,
    input_size: tuple[int, int],
    preprocess: dict[str, dict[str, Any]],
    source: Mapping[str, Any],
    calibration: dict[str, Any] | None,
    verification: dict[str, Any],
    options: ExportOptions,
    engines: list[dict[str, Any]],
    retrieval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    # The checkpoint's recommended search settings (e.g. {"expand": 10}, chosen on held-out classes) travel
    # into the manifest, where the runtime reads them (zsbir_infer.expansion.recommended_expand).
    if retrieval is not None:
        from zsbir_infer.expansion import recommended_expand

        try:
            recommended_expand({"retrieval": retrieval})
        except ValueError as exc:
            raise ExportOptionsError(f"the checkpoint's retrieval settings are invalid: {exc}") from None
    manifest = BundleManifest.create(
        folder,
        models={p: MODEL_FILES[p] for p in precisions},
        embedding_dim=embedding_dim,
        domain_conditioned=conditioned,
        input_size=input_size,
        preprocess=preprocess,
        engines=engines,
        image_input=IMAGE_INPUT,
        domain_input=DOMAIN_INPUT,
        output_name=EMBEDDING_OUTPUT,
        extra={
            "source": dict(source),
            "calibration": calibration,
            "verification": verification,
            "versions": _versions(options.exporter, options.opset),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"retrieval": dict(retrieval)} if retrieval is not None else {}),
        },
    )
    return manifest.to_dict()


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(folder / "manifest.json", manifest, sort_keys=False)
