"""Lightning callbacks for normalization, one per module: recalibration after training (:mod:`.recalibrate`),
the Batch Renorm schedule (:mod:`.renorm_schedule`), the run's checkpoints (:mod:`.checkpoints`), predictions to
a CSV file (:mod:`.predictions`) and the diagnostics for TensorBoard (:mod:`.activations`, :mod:`.norm_statistics`,
:mod:`.landscape`, which log through :mod:`._logging`). Norm layers are found with :mod:`bnzoo.norms.introspect`;
the loss is the task's ``batch_loss``."""

from .activations import ActivationPercentiles
from .checkpoints import BestCheckpoint, LastCheckpoint
from .landscape import LandscapeProbe
from .norm_statistics import NormStatistics
from .predictions import PredictionWriter
from .recalibrate import RecalibrateNormStats
from .renorm_schedule import RenormSchedule, renorm_bounds

__all__ = [
    "ActivationPercentiles",
    "BestCheckpoint",
    "LandscapeProbe",
    "LastCheckpoint",
    "NormStatistics",
    "PredictionWriter",
    "RecalibrateNormStats",
    "RenormSchedule",
    "renorm_bounds",
]
