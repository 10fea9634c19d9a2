"""Stable hashing of categorical ids.

An id's hash depends only on its text (its UTF-8 bytes), never on the process, the run, the
Python version or the order of arrival: ``h(v) = int64(blake2b(utf8(v), digest_size=8)) `` with
the missing value (null or empty string) mapped to 0 and a real hash of 0 moved to 1. Integer ids
hash as their decimal text, so ``123`` and ``"123"`` agree.

Datasets store the 64-bit hash; the reader maps it to a bucket of a table of ``B`` rows::

    bucket(h) = 0                       if h == 0   (missing / padding)
              = 1 + (h mod (B - 1))     otherwise, with the floor modulo (result in [0, B-2])

so the bucket count can change without re-ingesting.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import torch

MISSING_HASH = 0


def _hash_texts(texts: list[str]) -> np.ndarray:
    """``[N]`` int64 hashes of ids' texts: blake2b-64 of the UTF-8 bytes, read little-endian."""
    blake2b = hashlib.blake2b
    digests = b"".join(blake2b(text.encode(), digest_size=8).digest() for text in texts)
    hashes = np.frombuffer(digests, dtype="<i8").astype(np.int64)
    hashes[hashes == MISSING_HASH] = 1
    hashes[[not text for text in texts]] = MISSING_HASH
    return hashes


def hash_text(value: str) -> int:
    """The stable signed 64-bit hash of one id's text (0 only for the empty string)."""
    return int(_hash_texts([value])[0])


def stable_hash(values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
    """Hash an array of ids (strings or integers; nulls allowed) to int64 ``[N]``.

    Each distinct value is hashed once (dictionary encoding), so cost scales with the number of
    distinct ids rather than rows.
    """
    if isinstance(values, (np.ndarray, list)):
        values = pa.array(values)
    array = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
    out = np.empty(len(array), dtype=np.int64)
    start = 0
    for chunk in array.chunks:
        encoded = pc.dictionary_encode(chunk)
        dictionary = encoded.dictionary.to_pylist()
        table = _hash_texts(dictionary)
        indices = encoded.indices
        codes = table[pc.fill_null(indices, 0).to_numpy()] if len(table) else np.zeros(len(chunk), np.int64)
        if indices.null_count:
            codes[indices.is_null().to_numpy(zero_copy_only=False)] = MISSING_HASH
        out[start : start + len(chunk)] = codes
        start += len(chunk)
    return out


def bucketize(hashes: torch.Tensor, buckets: int) -> torch.Tensor:
    """Map stored int64 hashes ``[...]`` to bucket ids in ``[0, buckets)`` (0 = missing)."""
    import torch  # here, so that ingest and synth do not pay torch's import

    ids = torch.remainder(hashes, buckets - 1).add_(1)
    return ids.masked_fill_(hashes == MISSING_HASH, 0)
