"""Inputs shared by the attention tests."""

import torch


def random_tree_mask(t: int, g: torch.Generator) -> torch.Tensor:
    """`[t, t]` bool mask of a random token tree: each node attends to itself and its ancestors
    (each node's parent is drawn among the earlier nodes)."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    mask = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask
