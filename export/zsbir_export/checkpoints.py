"""Checkpoints: the project's format (safetensors + JSON) and the official DSN / SAKE ``model_best.pth.tar``.

Our format (CONTRACTS §5) is a pair ``NAME.safetensors`` (weights) + ``NAME.json`` (config); the path
of either file, or ``NAME`` alone, names the pair. :func:`save_checkpoint` writes both atomically
(temporary file + rename; weights first, so a config never points at missing weights) and records the
weights' SHA-256 in the config, which :func:`load_checkpoint` checks (a truncated or modified weights
file is reported as such).

Official checkpoints (``model_best.pth.tar`` of github.com/haowang1992/DSN and github.com/qliu24/SAKE)
are ``torch.save`` pickles of ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}`` whose
``state_dict`` comes from an ``nn.DataParallel`` model (keys prefixed ``module.``). They are read with
``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain containers is
refused rather than executed. Layouts recognised by their keys (after dropping ``module.``):

* ``original_model.layer0.conv1.weight`` + ``original_model.second_last_linear.weight``:
  ``CSEResnetModel_KDHashing`` (DSN, and SAKE's released 64-d models). DSN and SAKE write the same
  keys for this model, so the keys cannot tell them apart: ``official_format`` picks the label, else
  the path (DSN's save-folder markers ``dsn``/``contrastive(``/``memory(`` first, then ``sake``),
  default ``"dsn"``; loading is identical.
* ``original_model.layer0.conv1.weight`` without ``second_last_linear``: SAKE's ``CSEResnetModel_KD``
  (the embedding is the 2048-d pooled feature).
* ``linear.cpars`` instead of ``linear.weight``: the EMS-loss classifier; it is dropped (it does not
  affect the embedding) and noted in ``config["source"]["notes"]``.
* CSE blocks with spatial (``se_module.conv1``) gates (the ``SSE``/``CSSE`` options of DSN's code) are
  refused with a clear message.

Embedding size, class count, width and depth are inferred from tensor shapes. The returned config
carries the official preprocessing (RGB, squash-resize to 224x224 with PIL bilinear, ImageNet
mean/std; CONTRACTS §3) and tags (photo = 1, sketch = 0; CONTRACTS §4). Official checkpoints carry no
class names: ``class_names`` is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zsbir_export.models.cse_resnet import CSE_DEPTHS, CSEResNetModel
from zsbir_export.models.factory import EmbeddingModel, build_model
from zsbir_infer.errors import InputError
from zsbir_infer.fsio import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OFFICIAL_PREPROCESS",
    "CheckpointError",
    "LoadedModel",
    "checkpoint_paths",
    "load_checkpoint",
    "official_preprocess",
    "save_checkpoint",
]

FORMAT_NAME = "zsbir-checkpoint"
FORMAT_VERSION = 1

#: Preprocessing of the official SAKE/DSN code (torchvision ``Resize([224, 224])`` on an RGB PIL image).
OFFICIAL_PREPROCESS: dict[str, Any] = {
    "size": [224, 224],
    "resize": "squash",
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "color": "rgb",
    "background": "white",
}
DOMAIN_TAGS: dict[str, int] = {"photo": 1, "sketch": 0}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


class CheckpointError(InputError, ValueError):
    """A file that is not a usable checkpoint; the message says what is wrong."""


@dataclass
class LoadedModel:
    """A model ready for ``model.embed(images, tag)`` (eval mode) and its config (CONTRACTS §5).

    Attributes:
        model: the torch module (``CSEResNetModel`` or ``EmbeddingNet``), in eval mode, on the CPU.
        config: the checkpoint config (ours as stored; for official files, built from the weights).
        source_format: ``"zsbir"``, ``"dsn"`` or ``"sake"``.
        sha256: hex SHA-256 of the weights file (``.safetensors`` for ours, the ``.pth.tar`` otherwise).
    """

    model: EmbeddingModel
    config: dict[str, Any]
    source_format: str
    sha256: str


def official_preprocess() -> dict[str, dict[str, Any]]:
    """A fresh copy of the official per-domain preprocessing specs."""
    return {"photo": json.loads(json.dumps(OFFICIAL_PREPROCESS)), "sketch": json.loads(json.dumps(OFFICIAL_PREPROCESS))}


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for a path naming either file of the pair, or ``NAME``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` into a temporary file beside ``path``, then rename over it."""
    with atomic_path(path) as tmp:
        write(tmp)


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(model: nn.Module, config: Mapping[str, Any], path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Save ``model`` and ``config`` as ``NAME.safetensors`` + ``NAME.json`` (atomically).

    The stored config is ``config`` with ``format``/``version`` set, ``arch`` taken from
    ``model.arch_config()`` (a differing ``arch`` in ``config`` is an error), ``method`` defaulting to
    ``"none"``, ``preprocess`` defaulting to the official specs, and ``weights_sha256`` added.

    Args:
        model: a model from :mod:`zsbir_export.models` (it must have ``arch_config()``).
        config: the rest of the config: ``class_names``, ``preprocess``, ``train``, ``metrics`` ...
        path: ``NAME``, ``NAME.safetensors`` or ``NAME.json``; the folder must exist.

    Returns:
        The two paths written.
    """
    from safetensors.torch import save_file

    arch_fn = getattr(model, "arch_config", None)
    if not callable(arch_fn):
        raise TypeError(f"{type(model).__name__} has no arch_config(); save models built by zsbir_export.models")
    arch: dict[str, Any] = dict(arch_fn())
    given = config.get("arch")
    if given is not None:
        if not isinstance(given, Mapping):
            raise ValueError("config['arch'] must be a mapping")
        diff = {k: (given[k], arch.get(k)) for k in given if k in arch and given[k] != arch[k]}
        if diff or set(given) - set(arch):
            raise ValueError(
                f"config['arch'] does not describe the model: differing {diff}, "
                f"unknown {sorted(set(given) - set(arch))}"
            )
    weights_path, json_path = checkpoint_paths(path)
    if not weights_path.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {weights_path.parent}")
    cfg: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "method": "none"}
    cfg.update({k: v for k, v in config.items() if k not in ("format", "version")})
    cfg["arch"] = arch
    cfg.setdefault("class_names", [])
    cfg.setdefault("preprocess", official_preprocess())
    n_cls = int(arch.get("num_classes") or 0)
    names = cfg["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("config['class_names'] must be a list of strings")
    if names and n_cls and len(names) != n_cls:
        raise ValueError(f"{len(names)} class names for a classifier over {n_cls} classes")
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config is not JSON-serialisable: {exc}") from exc

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    cfg["weights_sha256"] = _sha256(weights_path)
    text = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return weights_path, json_path


# --------------------------------------------------------------------------------------------- load


def _summarise(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _load_state_strict(
    model: nn.Module, state: Mapping[str, Tensor], where: str, optional: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``model``; on any mismatch raise a CheckpointError naming keys and shapes.

    Keys ending in one of ``optional`` may be missing from ``state`` (e.g. ``num_batches_tracked`` in
    files from old PyTorch versions).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (optional and k.endswith(optional))]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_summarise(mismatched, 4)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
        raise CheckpointError(f"{where}: weights do not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=False)


def _load_ours(weights_path: Path, json_path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {json_path} (the weights {weights_path} need it)")
    try:
        cfg = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path} is not a checkpoint config (invalid JSON: {exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{json_path} is not a zsbir checkpoint config (format is not {FORMAT_NAME!r})")
    version = cfg.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format version {version!r} is not supported "
            f"(this zsbir reads <= {FORMAT_VERSION})"
        )
    if not isinstance(cfg.get("arch"), dict):
        raise CheckpointError(f"{json_path}: config has no 'arch' block")
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {weights_path} (named by {json_path})")
    sha = _sha256(weights_path)
    recorded = cfg.get("weights_sha256")
    if recorded is not None and recorded != sha:
        raise CheckpointError(
            f"{weights_path} does not match its config: SHA-256 {sha[:16]}... != recorded {str(recorded)[:16]}... "
            f"(the weights file is truncated, modified or from another checkpoint)"
        )
    try:
        model = build_model(cfg["arch"])
    except ValueError as exc:
        raise CheckpointError(f"{json_path}: bad 'arch' block: {exc}") from exc
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    _load_state_strict(model, state, str(weights_path))
    model.eval()
    return LoadedModel(model=model, config=cfg, source_format="zsbir", sha256=sha)


def _torch_load(path: Path) -> Any:
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    if not (head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO):
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a zsbir .safetensors/.json pair nor a torch.save file "
            f"(starts with {head!r})"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Whatever torch's wording (it changed in 2.6 and again in 2.13), an UnpicklingError from a
        # weights-only load means the pickle asks for something the restricted unpickler refuses.
        raise CheckpointError(_needs_code_execution(path, str(exc))) from exc
    except RuntimeError as exc:
        if _WEIGHTS_ONLY_RE.search(str(exc)):  # torch versions that raise the weights-only refusal as RuntimeError
            raise CheckpointError(_needs_code_execution(path, str(exc))) from exc
        raise CheckpointError(
            f"{path} cannot be read by torch.load (truncated or corrupt file): {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    except (EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path} cannot be read by torch.load (truncated or corrupt file): {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


_WEIGHTS_ONLY_RE = re.compile(r"weights[_ ]only", re.IGNORECASE)
_GLOBAL_RE = re.compile(r"\bGLOBAL\s+([A-Za-z_][\w.]*[\w])")


def _needs_code_execution(path: Path, torch_message: str) -> str:
    """The complete message for a pickle refused by ``torch.load(weights_only=True)``.

    It never depends on (or quotes) torch's own text, which changes between versions; the name of the
    refused class is added only when torch's message happens to give it (``GLOBAL module.Name``).
    """
    m = _GLOBAL_RE.search(torch_message)
    what = f" (it asks for {m.group(1)})" if m is not None else ""
    return (
        f"{path} needs code execution to load and is refused: it is a pickle that holds Python objects other "
        f"than tensors and plain containers{what}, and zsbir reads torch.save files only with "
        f"torch.load(weights_only=True), which runs no code. (A damaged file can look the same.) "
        f"If you trust the file, convert it once: in a trusted Python session run "
        f"ckpt = torch.load(PATH, map_location='cpu', weights_only=False) and re-save its state dict with "
        f"torch.save({{'state_dict': ckpt['state_dict']}}, 'converted.pth.tar') "
        f"(or torch.save(model.state_dict(), ...) if it holds a whole model), "
        f"then run zsbir export converted.pth.tar."
    )


_BLOCK_RE = re.compile(r"^original_model\.layer([1-4])\.(\d+)\.")


def _official_arch(state: Mapping[str, Tensor], path: Path) -> tuple[dict[str, Any], list[str]]:
    """Infer the arch block of an official CSE-ResNet checkpoint from its tensor shapes."""
    notes: list[str] = []
    if "original_model.layer1.0.se_module.conv1.weight" in state:
        raise CheckpointError(
            f"{path}: CSE blocks with spatial gates (se_module.conv1/conv2: DSN's 'SSE'/'CSSE' options) are not "
            f"supported; only the default channel CSE module (se_module.fc1/fc2) is"
        )
    fc2 = state.get("original_model.layer1.0.se_module.fc2.weight")
    fc1 = state.get("original_model.layer1.0.se_module.fc1.weight")
    if fc2 is None or fc1 is None or fc2.ndim != 2 or fc2.shape[1] != fc1.shape[0] + 1:
        raise CheckpointError(
            f"{path}: original_model.layer1.0.se_module.fc1/fc2 missing or not a tag-conditioned SE module "
            f"(fc2 must take fc1's outputs + 1 tag input)"
        )
    counts = [0, 0, 0, 0]
    for k in state:
        m = _BLOCK_RE.match(k)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    bottleneck = "original_model.layer1.0.conv3.weight" in state
    depth = None
    for name, (kind, layers) in CSE_DEPTHS.items():
        if (kind == "bottleneck") == bottleneck and list(layers) == counts:
            depth = name
    if depth is None:
        raise CheckpointError(
            f"{path}: CSE-ResNet with {'bottleneck' if bottleneck else 'basic'} blocks per stage {counts} is not a "
            f"supported depth ({', '.join(f'{n} {list(v[1])}' for n, v in CSE_DEPTHS.items())})"
        )
    width = int(state["original_model.layer0.conv1.weight"].shape[0])
    reduction = max(1, int(fc1.shape[1]) // int(fc1.shape[0]))
    sll = state.get("original_model.second_last_linear.weight")
    embed_dim = None if sll is None else int(sll.shape[0])
    last = state.get("original_model.last_linear.weight")
    num_classes = 0
    if "linear.weight" in state:
        num_classes = int(state["linear.weight"].shape[0])
    elif "linear.cpars" in state:
        num_classes = 0
        notes.append(
            f"EMS classifier linear.cpars {tuple(state['linear.cpars'].shape)} dropped (it does not affect embeddings)"
        )
    arch = {
        "backbone": depth,
        "width": width,
        "embed_dim": embed_dim,
        "domain_conditioned": True,
        "num_classes": num_classes,
        "imagenet_head": last is not None,
        "imagenet_classes": int(last.shape[0]) if last is not None else 1000,
        "reduction": reduction,
    }
    return arch, notes


def _guess_official_label(path: Path) -> str:
    """``"dsn"`` or ``"sake"`` from a checkpoint path (the keys cannot tell them apart).

    DSN's default save folder is named like ``sketchy_kd(1.0)_kdneg(0.3)_sake(1.0)_dim(64)_contrastive(...)
    _T(0.07)_memory(...)``: it mentions "sake" too, so DSN's markers are checked first.
    """
    text = str(path).lower()
    if "dsn" in text or "contrastive(" in text or "memory(" in text:
        return "dsn"
    return "sake" if "sake" in text else "dsn"


def _load_official(path: Path, official_format: str | None) -> LoadedModel:
    obj = _torch_load(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        raw = obj["state_dict"]
        for key in ("epoch", "arch", "best_acc1"):
            val = obj.get(key)
            if isinstance(val, Tensor) and val.numel() == 1:
                val = val.item()
            if isinstance(val, int | float | str):
                meta[key] = val
    elif isinstance(obj, Mapping):
        raw = obj
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict / state dict")
    if not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: 'state_dict' is empty or holds non-tensor values; not a model checkpoint")
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if "original_model.layer0.conv1.weight" not in state:
        keys = sorted(state)
        if {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= set(keys):
            raise CheckpointError(
                f"{path} is a plain torchvision-style ResNet (ImageNet) state dict, not a ZS-SBIR model; use "
                f"zsbir_export.models.load_pretrained to initialise a backbone with it"
            )
        raise CheckpointError(
            f"{path} is not a recognised checkpoint: expected zsbir, DSN or SAKE keys "
            f"(e.g. module.original_model.layer0.conv1.weight); found {_summarise(keys, 5)}"
        )
    arch, notes = _official_arch(state, path)
    if arch["embed_dim"] is None:
        fmt = "sake"
        notes.append("SAKE CSEResnetModel_KD layout (no hashing layer): the embedding is the pooled feature")
    elif official_format is not None:
        fmt = official_format
    else:
        fmt = _guess_official_label(path)
        notes.append("DSN and SAKE hashing checkpoints have identical keys; label chosen from the path (default dsn)")
    if fmt not in ("dsn", "sake"):
        raise ValueError(f"official_format must be 'dsn' or 'sake', got {official_format!r}")
    state = {k: v for k, v in state.items() if k != "linear.cpars"}
    model = build_model(arch)
    _load_state_strict(model, state, str(path), optional=("num_batches_tracked",))
    model.eval()
    assert isinstance(model, CSEResNetModel)
    config: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "method": fmt,
        "arch": model.arch_config(),
        "class_names": [],
        "preprocess": official_preprocess(),
        "domain_tags": dict(DOMAIN_TAGS),
        "train": {},
        "metrics": {},
        "source": {"path": str(path), "format": fmt, **meta, "notes": notes},
    }
    return LoadedModel(model=model, config=config, source_format=fmt, sha256=_sha256(path))


def load_checkpoint(path: str | os.PathLike[str], official_format: str | None = None) -> LoadedModel:
    """Load a checkpoint of any supported format, auto-detected.

    Args:
        path: ours (``NAME``, ``NAME.safetensors`` or ``NAME.json``) or an official DSN/SAKE
            ``model_best.pth.tar``.
        official_format: ``"dsn"`` or ``"sake"`` to label an official hashing checkpoint (the two
            have identical keys); by default a path containing "sake" means SAKE, anything else DSN.

    Returns:
        A :class:`LoadedModel` whose model is in eval mode and has ``embed(images, tag)``.

    Raises:
        FileNotFoundError: no such file (or half of our pair is missing).
        CheckpointError: not a checkpoint, truncated/corrupt, unsafe pickle, or weights that do not fit
            the architecture (the message lists missing/unexpected keys and shape mismatches).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; name a checkpoint file (NAME.safetensors, NAME.json or *.pth.tar)")
    weights_path, json_path = checkpoint_paths(p)
    if p.suffix in (".safetensors", ".json") or (not p.exists() and (weights_path.exists() or json_path.exists())):
        return _load_ours(weights_path, json_path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return _load_official(p, official_format)
