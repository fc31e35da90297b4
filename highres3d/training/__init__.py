"""Training: the loop, run folders, checkpoints and resume."""
from highres3d.training.run import RunFolder, RunState
from highres3d.training.trainer import Trainer, TrainResult, train

__all__ = ["RunFolder", "RunState", "TrainResult", "Trainer", "train"]
