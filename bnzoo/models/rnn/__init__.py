"""Deep recurrent classifiers with batch normalization, one module per family:

* :mod:`.ds2` -- Deep Speech 2 stacks (Amodei et al. 2016, Sec. 3.2, Eq. 2): sequence-wise normalization of the
  input term, the recurrence in PyTorch's fused kernel (``ds2_gru``, ``ds2_lstm``).
* :mod:`.bn_lstm` -- the BN-LSTM (Cooijmans et al. 2016, Eq. 6-8): per-time-step statistics on the input and
  hidden terms and the cell read-out (``bn_lstm``).
* :mod:`.classifier` -- :class:`RecurrentClassifier`, the stack and the classifier both share:
  ``forward(x: (B, T, F), lengths: (B,) | None = None) -> (B, num_classes)``; a padded batch is packed once at
  its input (:mod:`.steps`).
"""

from .bn_lstm import BatchNormLSTMLayer, PerStepNorm, bn_lstm
from .classifier import RecurrentClassifier
from .ds2 import FixedInputRecurrence, SequenceWiseNormRNN, ds2_gru, ds2_lstm
from .steps import CELLS, POOLS

__all__ = [
    "CELLS",
    "POOLS",
    "BatchNormLSTMLayer",
    "FixedInputRecurrence",
    "PerStepNorm",
    "RecurrentClassifier",
    "SequenceWiseNormRNN",
    "bn_lstm",
    "ds2_gru",
    "ds2_lstm",
]
