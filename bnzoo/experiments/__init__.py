"""The claims lab: experiments that reproduce, at small scale on real data, what normalization is claimed to do.

Each experiment is data under ``configs/experiments/<name>/`` (see :mod:`bnzoo.experiments.spec`), run through
bnzoo's own CLI (:mod:`bnzoo.experiments.runner`) and judged by explicit rules in a generated report
(:mod:`bnzoo.experiments.metrics`, :mod:`bnzoo.experiments.report`)::

    bnzoo experiment list
    bnzoo experiment run c1_ics --quick
    bnzoo experiment report

Importing this package registers what the experiments need beyond the zoo: the ``noisy_bn`` norm kind
(Santurkar et al. 2018) and the ``input_norm_mlp`` model (claim C13).
"""

from . import models, norms  # noqa: F401  (registrations)
from .cli import main

__all__ = ["main"]
