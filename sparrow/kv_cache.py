"""A KV cache the runtime owns: preallocated per sequence slot, written in place, rolled back by length.

Layout `[L, S, Hkv, Tmax, D]`: one contiguous `[Tmax, D]` run per (layer, slot, KV head), so the
attention reads each sequence's keys as a plain view and GQA query heads share it with no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepPlan:
    """Where one forward writes: slot b's new tokens land at positions starts[b] .. starts[b] + T."""

    slots: list[int]
    starts: list[int]
    tail_mask: torch.Tensor  # [T, T] bool, True = new token i may attend new token j


class SlotKVCache:
    """Implements the part of transformers' Cache API its attention layers call (`update`)."""

    is_compileable = False

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if min(num_layers, slots, kv_heads, head_dim, max_len) < 1:
            raise ValueError("cache dimensions must be positive")
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, Tmax, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots
        self.max_len = max_len
        self.plan: StepPlan | None = None

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def begin(self, slots: list[int], num_new: int, tail_mask: torch.Tensor) -> StepPlan:
        """Reserve room for `num_new` tokens in each slot; the next forward writes there."""
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise IndexError(f"slot {s} out of range 0..{self.num_slots - 1}")
            if self.lengths[s] + num_new > self.max_len:
                raise ValueError(f"slot {s}: {self.lengths[s]} + {num_new} tokens exceed the cache's "
                                 f"max length {self.max_len}")
        self.plan = StepPlan(list(slots), [self.lengths[s] for s in slots], tail_mask)
        return self.plan

    def commit(self) -> None:
        """The forward finished: the written tokens now count as cached."""
        t = self.plan.tail_mask.shape[0]
        for s in self.plan.slots:
            self.lengths[s] += t
        self.plan = None

    def truncate(self, slot: int, length: int) -> None:
        """Roll back to `length` tokens; what lies beyond is overwritten by the next write."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot truncate to {length}")
        self.lengths[slot] = length

    def keep(self, slot: int, start: int, indices: list[int]) -> None:
        """Keep the tokens at `start + indices[i]` as positions `start + i` and drop the rest.

        After a tree verify only the accepted path survives; it is moved down in place (a few rows).
        """
        n = len(indices)
        if start + n > self.lengths[slot] or any(not 0 <= i < self.lengths[slot] - start for i in indices):
            raise ValueError(f"slot {slot}: indices {indices} after {start} fall outside its {self.lengths[slot]} tokens")
        if list(indices) != list(range(n)):
            idx = torch.tensor(indices, device=self.k.device) + start
            self.k[:, slot, :, start:start + n] = self.k[:, slot, :, idx]  # the gather copies before the write
            self.v[:, slot, :, start:start + n] = self.v[:, slot, :, idx]
        self.lengths[slot] = start + n

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write new K/V `[B, Hkv, T, D]` in place; return this layer's whole buffers `[S, Hkv, Tmax, D]`."""
        t = key.shape[2]
        for b, (s, start) in enumerate(zip(self.plan.slots, self.plan.starts)):
            self.k[layer_idx, s, :, start:start + t] = key[b]
            self.v[layer_idx, s, :, start:start + t] = value[b]
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths)
