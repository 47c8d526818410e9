"""Training: the guarded maximum-likelihood engine, schedules, EMA, MMD and checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedTrainer
from .ema import EMA
from .engine import NonFiniteTraining, TrainConfig, Trainer, TrainResult
from .mmd import mmd2_rbf
from .schedule import warmup_cosine

__all__ = [
    "EMA",
    "DistributedTrainer",
    "NonFiniteTraining",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "mmd2_rbf",
    "save_checkpoint",
    "warmup_cosine",
]
