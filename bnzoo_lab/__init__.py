"""The claims lab: experiments that reproduce, at small scale on real data, what normalization is claimed to do.

Each experiment is data under ``configs/experiments/<name>/`` (see :mod:`bnzoo_lab.spec`), run through
bnzoo's own CLI (:mod:`bnzoo_lab.runner`) and judged by stated tests (Welch, TOST, Fisher) in a generated report
(:mod:`bnzoo_lab.metrics`, :mod:`bnzoo_lab.report`)::

    bnzoo experiment list
    bnzoo experiment run c1_ics --quick
    bnzoo experiment report

What the experiments need beyond the zoo -- the ``noisy_bn`` norm kind (Santurkar et al. 2018) and the
``input_norm_mlp`` model (claim C13) -- is registered only while the lab runs
(:func:`bnzoo_lab.registrations.lab_registrations`), never by an import.
"""

from .cli import main
from .registrations import lab_registrations

__all__ = ["lab_registrations", "main"]
