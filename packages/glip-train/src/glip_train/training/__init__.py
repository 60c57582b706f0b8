"""Training GLIP: typed run configs, the trainer (one process or ``torchrun``; a small loop of steps with hooks),
data pipeline, optimizer and checkpoints. ``glip train`` is the command line; ``docs/training.md`` the guide."""
from .checkpointing import ResumeError
from .config import ConfigError, DataConfig, DatasetConfig, FreezeConfig, OptimConfig, ScheduleConfig, TrainConfig
from .config import load_train_config
from .hooks import HookBase
from .monitor import StabilityMonitor
from .trainer import Trainer, TrainingDiverged, TrainResult

__all__ = [
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "FreezeConfig",
    "HookBase",
    "OptimConfig",
    "ResumeError",
    "ScheduleConfig",
    "StabilityMonitor",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "load_train_config",
]
