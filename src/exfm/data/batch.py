"""Training batches in torchrec's layout.

Sparse features follow torchrec's ``KeyedJaggedTensor``: ``keys`` (F names), ``values`` (all ids,
key-major: every id of key 0 for the B examples, then key 1, ...) and ``lengths`` (``[F * B]``,
ids per key and example). Single-valued categorical features come first (length 1 each), then
sequence features; so the categorical block is a zero-copy ``[B, F_cat]`` view. ``to_torchrec``
turns it into a real ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor`` when torchrec is installed.

Ids are bucket ids within each feature's own table (0 = missing / padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class KeyedJagged:
    """Keys + values + lengths of a batch of B examples (torchrec's KeyedJaggedTensor layout).

    Attributes:
        keys: F feature names; the first ``num_single`` have exactly one id per example.
        values: ``[sum(lengths)]`` int64 ids, key-major.
        lengths: ``[F * B]`` int32 ids per (key, example).
        stride: B, the batch size.
        num_single: how many leading keys are single-valued.
    """

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    stride: int
    num_single: int

    def single_ids(self) -> torch.Tensor:
        """The single-valued block as ``[B, num_single]`` int64 (a view, no copy)."""
        return self.values[: self.num_single * self.stride].view(self.num_single, self.stride).t()

    def jagged(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [n], lengths [B])`` of one key."""
        index = self.keys.index(key)
        per_key = self.lengths.view(len(self.keys), self.stride).sum(dim=1)
        start = int(per_key[:index].sum())
        return (
            self.values[start : start + int(per_key[index])],
            self.lengths[index * self.stride : (index + 1) * self.stride],
        )

    def padded(self, key: str, max_len: int) -> torch.Tensor:
        """One key as a right-padded ``[B, max_len]`` id matrix (0 = padding), oldest first."""
        values, lengths = self.jagged(key)
        lengths = lengths.long()
        positions = torch.arange(max_len, device=values.device).expand(self.stride, max_len)
        mask = positions < lengths.unsqueeze(1)
        out = torch.zeros(self.stride, max_len, dtype=values.dtype, device=values.device)
        out[mask] = values
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KeyedJagged:
        return replace(
            self,
            values=self.values.to(device, non_blocking=non_blocking),
            lengths=self.lengths.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> KeyedJagged:
        return replace(self, values=self.values.pin_memory(), lengths=self.lengths.pin_memory())

    def to_torchrec(self):  # pragma: no cover - needs the optional torchrec extra
        """A ``torchrec`` ``KeyedJaggedTensor`` with the same content."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=self.keys, values=self.values, lengths=self.lengths)


@dataclass
class Batch:
    """One batch of B examples, in time order.

    Attributes:
        sparse: categorical and sequence ids (:class:`KeyedJagged`).
        dense: ``[B, F_num]`` float32 transformed numeric features (schema order).
        labels: ``[B, T]`` float32 0/1 labels, one column per task (schema order).
        time_us: ``[B]`` int64 event times (µs, UTC).
        domain: ``[B]`` int64 index into the dataset's sorted domain list (-1 without domains).
        day: the day these rows belong to (a batch never spans two days).
        index_in_day: this batch's number within its day (0, 1, ...), for checkpoints.
        fm_predictions: ``[B, T]`` float32 logged FM probabilities, NaN where missing; or None.
        passthrough: extra ``[B]`` float32 columns (e.g. true probabilities), by name.
    """

    sparse: KeyedJagged
    dense: torch.Tensor
    labels: torch.Tensor
    time_us: torch.Tensor
    domain: torch.Tensor
    day: int
    index_in_day: int = 0
    fm_predictions: torch.Tensor | None = None
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def _map(self, fn) -> Batch:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, dict):
                changes[f.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        moved.sparse = self.sparse.to(device, non_blocking=non_blocking)
        return moved

    def pin_memory(self) -> Batch:
        pinned = self._map(lambda t: t.pin_memory())
        pinned.sparse = self.sparse.pin_memory()
        return pinned
