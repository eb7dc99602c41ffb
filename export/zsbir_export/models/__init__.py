"""Network architectures (torch): torchvision-compatible ResNets, CSE-ResNet (SAKE/DSN), EfficientNet-Lite and
embedding models.

Every embedding model has ``forward(x, tag) -> ModelOutput`` (training) and
``embed(x, tag) -> L2-normalized [N, D]`` (retrieval/export; CONTRACTS §5), plus ``arch_config()``.
"""

from zsbir_export.models.cse_resnet import CSEResNetModel, ModelOutput, cse_resnet, load_se_resnet50_imagenet
from zsbir_export.models.efficientnet import EfficientNetLite, imagenet_weights_path, load_imagenet
from zsbir_export.models.embedding import EmbeddingNet
from zsbir_export.models.factory import EmbeddingModel, build_model
from zsbir_export.models.resnet import ResNet, build_resnet, load_pretrained, resnet18, resnet34, resnet50

__all__ = [
    "CSEResNetModel",
    "EfficientNetLite",
    "EmbeddingModel",
    "EmbeddingNet",
    "ModelOutput",
    "ResNet",
    "build_model",
    "build_resnet",
    "cse_resnet",
    "imagenet_weights_path",
    "load_imagenet",
    "load_pretrained",
    "load_se_resnet50_imagenet",
    "resnet18",
    "resnet34",
    "resnet50",
]
