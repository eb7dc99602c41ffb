"""Training-time and run-time pipelines agree: the trainer's evaluation tensors are the runtime's, and the
embedded default bundle (ONNX Runtime) embeds files like its torch checkpoint does on those tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zsbir_infer.bundle import Bundle, default_bundle_path
from zsbir_infer.datasets import open_benchmark
from zsbir_infer.datasets.synth import SynthConfig, generate_synthetic
from zsbir_infer.preprocess import load_image, preprocess_batch

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity") / "synth"
    generate_synthetic(
        root, SynthConfig(classes=6, unseen=2, photos_per_class=3, sketches_per_class=3, size=96, seed=3)
    )
    return root


def _samples(root: Path) -> tuple[list[Path], list[Path]]:
    split = open_benchmark(root).split("all")
    return [s.path for s in split.photos], [s.path for s in split.sketches]


# The photos are 96 px JPEGs: at 48 px the runtime decodes them at 4/8 scale straight to the target, at
# 32 px at 3/8 (36 px) and 64 px at 6/8 (72 px) and then resizes, at 96 px at full size.
@pytest.mark.parametrize("size", [32, 48, 64, 96])
def test_trainer_eval_tensors_equal_runtime_preprocessing(tiny_bench: Path, size: int) -> None:
    from zsbir_export.train.data import ImageCache, iter_eval_batches, make_spec

    spec = make_spec(size)
    split = open_benchmark(tiny_bench).split("all")
    photo = split.photos[0].path
    drafted = load_image(photo, target_size=(size, size)).size
    assert drafted == {32: (36, 36), 48: (48, 48), 64: (72, 72), 96: (96, 96)}[size]  # reduced where expected
    for samples in (split.photos, split.sketches):
        for cache in (None, ImageCache()):
            trained = np.concatenate([b.numpy() for b in iter_eval_batches(samples, spec, cache, batch_size=4)])
            runtime = preprocess_batch([s.path for s in samples], spec)
            np.testing.assert_array_equal(trained, runtime)


def test_default_bundle_embeds_like_its_checkpoint(tiny_bench: Path) -> None:
    import torch
    from zsbir_export.checkpoints import load_checkpoint
    from zsbir_export.train.data import iter_eval_batches

    from zsbir_infer.encoder import Encoder

    bundle_dir = default_bundle_path()
    if not (bundle_dir / "manifest.json").exists():
        pytest.skip("the embedded default bundle is not built")
    bundle = Bundle.open(bundle_dir)
    loaded = load_checkpoint(bundle_dir / "checkpoint.safetensors")
    # The bundle was exported from this very checkpoint, with its preprocessing.
    assert bundle.manifest["source"]["sha256"] == loaded.sha256
    assert bundle.manifest["preprocess"] == loaded.config["preprocess"]

    split = open_benchmark(tiny_bench).split("all")
    encoder = Encoder.open(bundle_dir, backend="ort-cpu")
    try:
        for domain, samples, tag in (("photo", split.photos, 1), ("sketch", split.sketches, 0)):
            spec = loaded.config["preprocess"][domain]
            x = torch.cat(list(iter_eval_batches(samples, spec, None, batch_size=8)))
            with torch.no_grad():
                ref = loaded.model.embed(x, torch.full((x.shape[0],), tag, dtype=torch.int64)).numpy()
            got = encoder.embed([s.path for s in samples], domain)
            cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
            assert cos.min() >= 0.99999, (domain, float(cos.min()))
    finally:
        encoder.close()
