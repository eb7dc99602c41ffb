"""Network architectures (torch): torchvision-compatible ResNets, CSE-ResNet (SAKE/DSN) and embedding models."""

from zsbir_export.models.resnet import ResNet, build_resnet, load_pretrained, resnet18, resnet34, resnet50

__all__ = ["ResNet", "build_resnet", "load_pretrained", "resnet18", "resnet34", "resnet50"]
