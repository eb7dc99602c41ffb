"""Training (torch): Tursun et al. (2022), DSN (2021) and photo pre-training as strategies (:mod:`.methods`),
run by one loop (:mod:`.loop`) from ImageNet weights or a pre-training checkpoint (:mod:`.teacher`)."""

from zsbir_export.train.loop import TrainConfig, TrainResult, evaluate_split, hold_out_classes, train
from zsbir_export.train.methods import METHODS, Method, register

__all__ = ["METHODS", "Method", "TrainConfig", "TrainResult", "evaluate_split", "hold_out_classes", "register", "train"]
