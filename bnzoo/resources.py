"""Where the files bnzoo ships are: its YAML configs and its pretrained zoo (``index.json`` and the checkpoints).

Both are package data under ``bnzoo/_resources/`` -- in the repository, links to its top-level ``configs/`` and
``checkpoints/``; in a wheel, copies -- so an installed bnzoo (``pip install .``, not only ``-e``) has the same
configs and zoo as a checkout. ``BNZOO_CHECKPOINT_DIR`` points the zoo elsewhere. Nothing is found through
``__file__``'s parents.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

__all__ = ["CHECKPOINT_DIR_ENV", "checkpoint_dir", "config_dir"]

#: the environment variable that points the zoo at another folder (with its own ``index.json``)
CHECKPOINT_DIR_ENV = "BNZOO_CHECKPOINT_DIR"


def _resource(name: str) -> Path:
    return Path(str(files("bnzoo") / "_resources" / name))


def config_dir() -> Path:
    """The shipped ``configs/`` folder (``configs/experiments/`` holds the claims lab's experiments)."""
    return _resource("configs")


def checkpoint_dir() -> Path:
    """The zoo's folder: ``$BNZOO_CHECKPOINT_DIR``, else the shipped ``checkpoints/``."""
    env = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(env).expanduser() if env else _resource("checkpoints")
