"""Lightning callbacks for normalization: recalibration, the Batch Renorm schedule, diagnostics."""

from .checkpoints import LastCheckpoint
from .diagnostics import ActivationPercentiles, LandscapeProbe, NormStatistics
from .recalibrate import RecalibrateNormStats, RecalibrationResult, recalibrate_norm_stats, stat_norm_layers
from .renorm_schedule import RenormSchedule, renorm_bounds, renorm_layers

__all__ = [
    "ActivationPercentiles",
    "LandscapeProbe",
    "NormStatistics",
    "LastCheckpoint",
    "RecalibrateNormStats",
    "RecalibrationResult",
    "RenormSchedule",
    "recalibrate_norm_stats",
    "renorm_bounds",
    "renorm_layers",
    "stat_norm_layers",
]
