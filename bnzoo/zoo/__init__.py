"""The pretrained zoo: list checkpoints, verify them, download them, load them -- safely.

One module per job: :mod:`.index` (``index.json``), :mod:`.fetch` (locate, download, sha256), :mod:`.checkpoint`
(load and check), :mod:`.compatibility` (the one checkpoint-vs-request comparison), :mod:`.trust` (what stored
hyperparameters may say), :mod:`.networks` (``create_model(..., pretrained=...)``), :mod:`.export` (safetensors,
the README's table). The LightningModule of a checkpoint is :func:`bnzoo.load_pretrained`'s (:mod:`bnzoo.tasks`).

    >>> import bnzoo
    >>> bnzoo.list_pretrained("fashion_mnist-resnet20-*")
    ['fashion_mnist-resnet20-bn', 'fashion_mnist-resnet20-none', 'fashion_mnist-resnet20-renorm']
    >>> task = bnzoo.load_pretrained("fashion_mnist-resnet20-bn")       # the LightningModule
    >>> net = bnzoo.create_model("resnet20", norm="bn", pretrained=True)  # the bare network

The zoo is ``checkpoints/index.json`` and the files it lists (``BNZOO_CHECKPOINT_DIR`` points elsewhere). Every
load follows the same three rules:

1. **Verify before loading.** A file of the zoo's folder -- named by its registered name, by a path (symlinks
   resolved) or by a ``file://`` URL -- is hashed and compared with the sha256 in the index before anything is
   unpickled; a mismatch is a :class:`ChecksumError` naming the file, and a file of the folder that the index does
   not list is refused. An index entry's ``file`` must be a plain file name (no folder, no ``..``, not absolute).
   A path or URL outside the zoo is verified against ``sha256=`` when given.
2. **Never run code from a file.** The verified bytes go to :func:`bnzoo.io.safe_torch_load`
   (``torch.load(weights_only=True)``, passed explicitly): tensors and plain types only (hyperparameters are
   plain types for this reason). A file whose pickle would import or call anything is refused with an
   :class:`UnsafeCheckpointError`, a file that is no checkpoint with an :class:`UnreadableCheckpointError`, and
   nothing in it runs. Its hyperparameters pass :func:`bnzoo.zoo.trust.check_stored_hyperparameters` (class
   paths of bnzoo, Lightning and torch only; no ``model_options.pretrained``), and the task class is chosen from
   bnzoo's own tasks, never imported from a name in the file.
3. **Refuse a checkpoint of another network.** Asking for one architecture or norm and getting a checkpoint of
   another is an :class:`IncompatibleCheckpointError` naming both (:mod:`bnzoo.zoo.compatibility`; Batch Renorm keeps
   BatchNorm's state-dict keys, so a bn checkpoint would otherwise load silently into a renorm network).

URLs (``http``, ``https``, ``file``) are downloaded with ``urllib`` into a cache directory (``cache_dir=``, else
``$BNZOO_CACHE_DIR``, else ``<torch.hub.get_dir()>/bnzoo``), verified (when a sha256 is known) before they are
written, and written atomically: the cache never holds a partial file, nor one that failed its sha256. An index
entry may carry a ``url``: when its file is not in the folder it is downloaded from there, and verified against
the entry's sha256.
"""

from ..io import UnreadableCheckpointError, UnsafeCheckpointError
from .checkpoint import Checkpoint, check_compatible, load_checkpoint, resolve_ckpt_path
from .compatibility import IncompatibleCheckpointError, network_options
from .export import export_safetensors, zoo_table
from .fetch import ChecksumError, download, file_sha256, is_url
from .index import (
    CHECKPOINT_SUFFIX,
    INDEX_FORMAT,
    checkpoint_dir,
    entry_path,
    index_lock,
    is_pretrained,
    list_pretrained,
    pretrained_info,
    read_index,
    write_index,
)
from .networks import create_model, default_pretrained, pretrained_model

__all__ = [
    "CHECKPOINT_SUFFIX",
    "INDEX_FORMAT",
    "Checkpoint",
    "ChecksumError",
    "IncompatibleCheckpointError",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "check_compatible",
    "checkpoint_dir",
    "create_model",
    "default_pretrained",
    "download",
    "entry_path",
    "export_safetensors",
    "file_sha256",
    "index_lock",
    "is_pretrained",
    "is_url",
    "list_pretrained",
    "load_checkpoint",
    "network_options",
    "pretrained_info",
    "pretrained_model",
    "read_index",
    "resolve_ckpt_path",
    "write_index",
    "zoo_table",
]
