"""Training (torch): Tursun et al. (2022), DSN (2021) and photo pre-training; see :mod:`.loop`."""

from zsbir_export.train.loop import METHODS, TrainConfig, TrainResult, evaluate_split, hold_out_classes, train

__all__ = ["METHODS", "TrainConfig", "TrainResult", "evaluate_split", "hold_out_classes", "train"]
