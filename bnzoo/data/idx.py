"""A reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

The format (LeCun et al., "The MNIST database", http://yann.lecun.com/exdb/mnist/): a big-endian header of
two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions ``d``, then ``d`` big-endian
uint32 sizes, then the data in row-major order. torchvision's reader only takes uncompressed files; this one
also reads the ``.gz`` files as shipped (Debian's ``dataset-fashion-mnist`` installs only those), so one code
path serves every copy a user may have.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

__all__ = ["read_idx"]

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (``.gz`` or uncompressed) into a ``torch.uint8`` tensor.

    Args:
        path: the file; gzip compression is detected from the content, not the name.
        ndim: the number of dimensions the file must have (1 for labels, 3 for images); ``None`` accepts any.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the content is not a complete IDX file of unsigned bytes (the message names ``path``).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # truncated or damaged gzip stream
            raise ValueError(f"{path}: damaged gzip data ({err})") from err
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (header {raw[:4].hex() or 'empty'})")
    dtype_code, dims = raw[2], raw[3]
    if dtype_code != _UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{dtype_code:02x}, expected 0x08 (unsigned byte)")
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header_size = 4 + 4 * dims
    if len(raw) < header_size:
        raise ValueError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{dims}I", raw[4:header_size])
    expected = header_size + math.prod(shape)
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes for an IDX array of shape {shape} ({expected} bytes expected)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_size).view(shape)
