"""The ``bnzoo`` command line (:mod:`.main`): LightningCLI's ``fit | validate | test | predict``
(:mod:`.lightning_cli`, with the run folders of :mod:`.runs` and the config checks of :mod:`.config`) and bnzoo's
own ``recalibrate``, ``export``, ``pretrained`` and ``experiment``; every error is reported by :mod:`.errors`.
``bnzoo --help`` and ``--version`` import nothing of Lightning."""

from typing import Any

from .main import main


def __getattr__(name: str) -> Any:
    if name == "BnzooCLI":
        from .lightning_cli import BnzooCLI

        return BnzooCLI
    raise AttributeError(f"module 'bnzoo.cli' has no attribute {name!r}")


__all__ = ["BnzooCLI", "main"]
