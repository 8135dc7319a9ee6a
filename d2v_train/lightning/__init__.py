"""Lightning layer: the pretraining module, its optimizer/schedules and callbacks."""

from .callbacks import CollapseMonitor, ThroughputMonitor, TrainingCollapsedError
from .optim import OptimConfig, build_optimizer, lr_lambda, param_groups
from .pretrain import Data2VecPretraining

__all__ = [
    "CollapseMonitor",
    "Data2VecPretraining",
    "OptimConfig",
    "ThroughputMonitor",
    "TrainingCollapsedError",
    "build_optimizer",
    "lr_lambda",
    "param_groups",
]
