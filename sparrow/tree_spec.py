"""Static draft trees as typed on a command line; torch-free, so configs check them where they are made.

A tree is a set of paths of child ranks from the root (Medusa's notation): `(0,)` is the draft's top-1
first token, `(1,)` its runner-up, `(0, 1)` the runner-up after the top-1 first token. A spec names one:
`K` is a chain of K drafted tokens (with `width` w > 1: the top-1 chain with the next w - 1 candidates
at every depth), `K+b/b/...` adds branches, each a path written as digits (`7+1/01/10`: a chain of 7, the
first token's runner-up and what the draft puts after it, and the runner-up at depth 2).
"""

from __future__ import annotations

Path = tuple[int, ...]


def base_paths(k: int, width: int = 1) -> list[Path]:
    """The top-1 chain of depth k with the next `width - 1` candidates at every depth."""
    if k < 1:
        raise ValueError(f"draft length K must be at least 1, got {k}")
    if width < 1:
        raise ValueError(f"tree width must be at least 1, got {width}")
    return [(0,) * (d - 1) + (r,) for d in range(1, k + 1) for r in range(width)]


def tree_paths(spec: int | str, width: int = 1) -> list[Path]:
    """Every path of the tree that `spec` names (see the module docstring), each prefix listed first."""
    head, plus, tail = str(spec).strip().partition("+")
    try:
        k = int(head)
    except ValueError:
        raise ValueError(f"tree spec {spec!r}: expected K or K+branch/branch..., e.g. 7 or 7+1/01/10") from None
    if plus and not tail:
        raise ValueError(f"tree spec {spec!r}: no branches after '+'")
    paths = base_paths(k, width)
    have = set(paths)
    for text in tail.split("/") if tail else ():
        if not text.isdigit():
            raise ValueError(f"tree spec {spec!r}: branch {text!r} is not a path of child ranks (digits)")
        branch = tuple(int(c) for c in text)
        if branch[:-1] and branch[:-1] not in have:
            raise ValueError(f"tree spec {spec!r}: branch {text} hangs off {text[:-1]}, which is not in the tree")
        if branch not in have:
            paths.append(branch)
            have.add(branch)
    return paths


def spec_key(spec: int | str, width: int = 1) -> int | str:
    """A spec checked and in the form rows carry: K as an int for a plain chain or spine, else the text."""
    tree_paths(spec, width)
    text = str(spec).strip()
    return int(text) if "+" not in text else text


def spec_keys(specs: int | str | tuple | list, width: int = 1) -> tuple[int | str, ...]:
    """One spec or several, each checked and in row form (`spec_key`)."""
    return tuple(spec_key(k, width) for k in ((specs,) if isinstance(specs, (int, str)) else specs))
