"""Input layouts of reconstruction attention, their checks, and the segment table the kernels
run on.

Targets (the queries) and history (keys and values) each come padded or jagged:
  targets  (B, P, d)                  padded: row b's P targets
           (T, d) + target_offsets    jagged: row b's targets are values[target_offsets[b]:...[b+1]]
           (T, d) + history_index     target t attends over history row history_index[t]
  history  (B, L, d)                  padded (key_padding_mask (B, L), True = padding)
           (S, d) + history_offsets   jagged (key_padding_mask (S,), optional max_history_len)
Every layout is the same computation over segments: target t attends the keys
[key_offsets[r], key_offsets[r+1]) of its row r = target_rows[t]; `order` lists the targets
grouped by row (order[target_offsets[r]:target_offsets[r+1]] are row r's targets), which the
backward's per-key passes need; causal masks compare positions within a row (t - its row's first
target, s - its row's first key). K/V are projected once per history item and never copied.
"""
from typing import NamedTuple, Optional

import torch

from courier_fast import _validate


class Segments(NamedTuple):
    """The segment table (all int64 on the inputs' device; see the module docstring)."""
    target_rows: torch.Tensor  # (T,) row of each target
    key_rows: torch.Tensor  # (S,) row of each history item
    target_offsets: torch.Tensor  # (B+1,) row r's targets are order[target_offsets[r]:...[r+1]]
    key_offsets: torch.Tensor  # (B+1,) row r's keys are [key_offsets[r], key_offsets[r+1])
    order: torch.Tensor  # (T,) targets grouped by row (arange(T) unless history_index)
    key_padding_mask: Optional[torch.Tensor]  # (S,) bool, True = padding
    max_targets: int  # most targets in a row; -1 = not known on the host
    max_keys: int  # most keys in a row (an upper bound)


def check(targets, history, key_padding_mask, mode, history_index, history_offsets, target_offsets,
          max_history_len, lengths):
    """Checks the layout arguments (shapes, dtypes, devices; offsets and indices by value unless
    the data checks are off). Returns B, the number of history rows."""
    v = _validate
    if history.dim() == 3:
        b, length = history.shape[:2]
        for name, arg in (("history_offsets", history_offsets), ("max_history_len", max_history_len)):
            if arg is not None:
                raise ValueError(f"{name} is for a jagged history (S, d); history is padded {tuple(history.shape)}")
        v.optional_mask("key_padding_mask", key_padding_mask, (b, length), "(B, L), True = padding",
                        "history", history)
    elif history.dim() == 2:
        if history_offsets is None:
            raise ValueError(f"history (S, d) = {tuple(history.shape)} is jagged: it needs history_offsets (B+1,)")
        if lengths is not None:
            raise ValueError("lengths is for a padded history (B, L, d); a jagged history has history_offsets")
        v.offsets("history_offsets", history_offsets, history.shape[0], "history items (rows of history)",
                  "history", history)
        b = history_offsets.numel() - 1
        v.optional_mask("key_padding_mask", key_padding_mask, (history.shape[0],),
                        "(S,) over the jagged history, True = padding", "history", history)
        if max_history_len is not None:
            if isinstance(max_history_len, bool) or not isinstance(max_history_len, int) or max_history_len < 0:
                raise ValueError(f"max_history_len must be an int >= 0, got {max_history_len!r}")
            if v._data_checks_on() and b and int((history_offsets[1:] - history_offsets[:-1]).max()) > max_history_len:
                raise ValueError(f"max_history_len={max_history_len} is shorter than the longest history row")
    else:
        raise ValueError(f"history must be 3-D (B, L, d) or 2-D (S, d) with history_offsets, got shape {tuple(history.shape)}")

    if targets.dim() == 3:
        for name, arg in (("history_index", history_index), ("target_offsets", target_offsets)):
            if arg is not None:
                raise ValueError(f"{name} is for flat targets (T, d); targets is {tuple(targets.shape)} (B, P, d)")
        if targets.shape[0] != b:
            raise ValueError(f"history has batch size {b} but targets has {targets.shape[0]}")
    elif targets.dim() == 2:
        if (history_index is None) == (target_offsets is None):
            raise ValueError(f"targets must be 3-D (B, P, d), or 2-D (T, d) with exactly one of history_index (T,) "
                             f"and target_offsets (B+1,); got shape {tuple(targets.shape)}")
        if history_index is not None:
            v.index("history_index", history_index, b, "a history row per target", "targets", targets)
            v.shape("history_index", history_index, (targets.shape[0],), "one history row per target")
            if mode:
                raise ValueError("causal needs targets laid out per history row (padded or target_offsets), "
                                 "not history_index")
        else:
            v.offsets("target_offsets", target_offsets, targets.shape[0], "targets (rows of targets)",
                      "targets", targets, batch=b)
    else:
        raise ValueError(f"targets must be 3-D (B, P, d) or 2-D (T, d), got shape {tuple(targets.shape)}")

    if mode and targets.dim() == 3 and history.dim() == 3 and targets.shape[1] != history.shape[1]:
        raise ValueError(f"causal masks by position in the history: targets needs P == L, "
                         f"got P={targets.shape[1]}, L={history.shape[1]}")
    if mode and v._data_checks_on() and not (targets.dim() == 3 and history.dim() == 3):
        counts = [_counts(targets, target_offsets, b), _counts(history, history_offsets, b)]
        if not torch.equal(*counts):
            raise ValueError("causal masks by position in the history: every row needs as many targets as "
                             "history items (target and history offsets / shapes differ)")
    return b


def _counts(x, offsets, b):
    if offsets is None:
        return torch.full((b,), x.shape[1], dtype=torch.int64, device=x.device)
    return (offsets[1:] - offsets[:-1]).long()


def _rows_of(offsets, n):
    """(n,) row of each of n flat items under (B+1,) offsets (empty rows skipped)."""
    return torch.searchsorted(offsets, torch.arange(n, device=offsets.device), right=True) - 1


def segments(targets, history, key_padding_mask=None, history_index=None, history_offsets=None,
             target_offsets=None, max_history_len=None):
    """The Segments of a checked layout. No host reads, except for a jagged history without
    max_history_len (its longest row)."""
    dev = targets.device
    if history.dim() == 3:
        b, length = history.shape[:2]
        key_offsets = torch.arange(b + 1, device=dev) * length
        key_rows = torch.arange(b * length, device=dev) // max(length, 1)
        max_keys = length
        mask = None if key_padding_mask is None else key_padding_mask.reshape(-1)
    else:
        key_offsets = history_offsets.long()
        b = key_offsets.numel() - 1
        key_rows = _rows_of(key_offsets, history.shape[0])
        if max_history_len is None:
            max_history_len = int((key_offsets[1:] - key_offsets[:-1]).max()) if b else 0
        max_keys = max_history_len
        mask = key_padding_mask
    n = targets.shape[0] if targets.dim() == 2 else targets.shape[0] * targets.shape[1]
    if history_index is not None:
        target_rows = history_index.long()
        order = torch.argsort(target_rows, stable=True)
        target_offsets = torch.searchsorted(target_rows[order], torch.arange(b + 1, device=dev))
        max_targets = -1
    elif targets.dim() == 3:
        p = targets.shape[1]
        target_offsets = torch.arange(b + 1, device=dev) * p
        target_rows = torch.arange(n, device=dev) // max(p, 1)
        order, max_targets = torch.arange(n, device=dev), p
    else:
        target_offsets = target_offsets.long()
        target_rows = _rows_of(target_offsets, n)
        order, max_targets = torch.arange(n, device=dev), -1
    return Segments(target_rows, key_rows, target_offsets, key_offsets, order, mask, max_targets, max_keys)
