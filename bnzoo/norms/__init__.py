"""bnzoo's norm layers, the factory that builds them from a plain string, what a model's norm layers are
(:mod:`.introspect`), the recalibration of their statistics (:mod:`.recalibration`), the conversion of any
model's BatchNorm-like layers to any kind (:func:`convert_norms`, :mod:`.conversion`) and their folding into
the layer before them for inference (:mod:`.fusion`).

>>> from bnzoo.norms import make_norm, list_norms
>>> make_norm("renorm", 64, "2d", r_max=2.0)
BatchRenorm2d(64, eps=1e-05, momentum=0.01, affine=True, bias=True, track_running_stats=True, r_max=2.0, d_max=5.0)
"""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .channel import ChannelGroupNorm, ChannelLayerNorm, default_num_groups
from .conversion import convert_norms, replace_modules, revert_norms, select_norm_layers
from .convert import convert_sync_norms, freeze_norms, revert_sync_norms
from .factory import (
    BUILTIN_NORMS,
    LAYOUTS,
    NORM_KINDS,
    KindLayer,
    NormFactory,
    NormKind,
    check_norm_config,
    list_norms,
    make_norm,
    norm_factory,
    norm_layer,
    register_norm,
    register_with_timm,
)
from .frozen import FrozenBatchNorm
from .fusion import FoldReport, add_conv_biases_, fold_norms, fuse_norms
from .norm_act import NormAct, create_activation, with_activation
from .recalibration import RecalibrationResult, recalibrate_norm_stats
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, batch_renorm_corrections
from .sequence import (
    SequenceBatchNorm,
    SequenceBatchRenorm,
    SequenceFrozenBatchNorm,
    SequenceGroupNorm,
    SequenceIdentity,
    SequenceLayerNorm,
    SequenceNorm,
    lengths_to_mask,
    sequence_mask,
    with_packed_data,
)
from .sync import SyncableNorm, all_reduce_sum, global_batch_moments, is_distributed, normalize_with_moments

__all__ = [
    "BUILTIN_NORMS",
    "LAYOUTS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelGroupNorm",
    "ChannelLayerNorm",
    "FoldReport",
    "FrozenBatchNorm",
    "KindLayer",
    "NormAct",
    "NORM_KINDS",
    "NormFactory",
    "NormKind",
    "RecalibrationResult",
    "SequenceBatchNorm",
    "SequenceBatchRenorm",
    "SequenceFrozenBatchNorm",
    "SequenceGroupNorm",
    "SequenceIdentity",
    "SequenceLayerNorm",
    "SequenceNorm",
    "SyncableNorm",
    "add_conv_biases_",
    "all_reduce_sum",
    "batch_renorm_corrections",
    "create_activation",
    "default_num_groups",
    "check_norm_config",
    "convert_norms",
    "convert_sync_norms",
    "fold_norms",
    "freeze_norms",
    "fuse_norms",
    "revert_sync_norms",
    "select_norm_layers",
    "global_batch_moments",
    "is_distributed",
    "lengths_to_mask",
    "list_norms",
    "make_norm",
    "norm_factory",
    "norm_layer",
    "normalize_with_moments",
    "recalibrate_norm_stats",
    "register_norm",
    "register_with_timm",
    "replace_modules",
    "revert_norms",
    "sequence_mask",
    "with_activation",
    "with_packed_data",
]
