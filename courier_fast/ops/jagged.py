"""Jagged (values + offsets) <-> padded (+ lengths) tensors, the torchrec / FlashAttention-varlen
convention for rows of different lengths.

values (N, *F): the rows' items one after another; offsets (B+1,) int32/int64: row b is
values[offsets[b]:offsets[b+1]] (offsets[0] = 0, non-decreasing, offsets[-1] = N);
lengths (B,) = offsets[1:] - offsets[:-1]. Padded: (B, L, *F) with row b's items at positions
< lengths[b] (right padding). All conversions are differentiable in the values.
"""
import torch

from courier_fast import _validate


def lengths_to_offsets(lengths):
    """(B,) integer lengths >= 0 -> (B+1,) int64 offsets [0, l0, l0 + l1, ...]."""
    _validate.tensor("lengths", lengths, ndim=1, dtypes=_validate.INDEX_DTYPES, allow_empty=True)
    if _validate._data_checks_on() and lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got min {int(lengths.min())}")
    return torch.cat([lengths.new_zeros(1, dtype=torch.int64), lengths.long().cumsum(0)])


def offsets_to_lengths(offsets):
    """(B+1,) offsets -> (B,) int64 lengths."""
    _validate.tensor("offsets", offsets, ndim=1, dtypes=_validate.INDEX_DTYPES)
    return (offsets[1:] - offsets[:-1]).long()


def padded_to_jagged(padded, lengths):
    """padded (B, L, *F) and lengths (B,) in [0, L] -> (values (sum lengths, *F), offsets (B+1,)
    int64). Reads the lengths on the host once (the values' size)."""
    _validate.tensor("padded", padded, dtypes=None, allow_empty=True)
    if padded.dim() < 2:
        raise ValueError(f"padded must be (B, L, ...), got shape {tuple(padded.shape)}")
    b, length = padded.shape[:2]
    _validate.tensor("lengths", lengths, ndim=1, dtypes=_validate.INDEX_DTYPES, allow_empty=True)
    _validate.shape("lengths", lengths, (b,), "one length per padded row")
    _validate.same_device("lengths", lengths, "padded", padded)
    if _validate._data_checks_on() and b and (int(lengths.min()) < 0 or int(lengths.max()) > length):
        raise ValueError(f"lengths must lie in [0, L={length}], got [{int(lengths.min())}, {int(lengths.max())}]")
    valid = torch.arange(length, device=padded.device)[None, :] < lengths[:, None]
    return padded[valid], lengths_to_offsets(lengths)


def jagged_to_padded(values, offsets, max_len=None, padding_value=0):
    """values (N, *F) and offsets (B+1,) -> (padded (B, max_len, *F), lengths (B,) int64).
    max_len: None for the longest row (one host read); a row longer than max_len is a
    ValueError (never truncated silently). Positions >= lengths[b] hold padding_value."""
    _validate.tensor("values", values, dtypes=None, allow_empty=True)
    if values.dim() < 1:
        raise ValueError("values must have at least one dimension (the items)")
    _validate.offsets("offsets", offsets, values.shape[0], "values", "values", values)
    lengths = offsets_to_lengths(offsets)
    longest = int(lengths.max()) if lengths.numel() and (max_len is None or _validate._data_checks_on()) else 0
    if max_len is None:
        max_len = longest
    elif isinstance(max_len, bool) or not isinstance(max_len, (int, torch.SymInt)) or max_len < 0:
        raise ValueError(f"max_len must be an int >= 0, got {max_len!r}")
    elif longest > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the longest row ({longest} items)")
    pos = torch.arange(max_len, device=values.device)
    valid = pos[None, :] < lengths[:, None]  # (B, max_len)
    gather = (offsets[:-1, None].long() + pos[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    rows = values[gather] if values.shape[0] else values.new_zeros(*gather.shape, *values.shape[1:])
    valid = valid.view(*valid.shape, *([1] * (values.dim() - 1)))
    return torch.where(valid, rows, torch.full((), padding_value, dtype=values.dtype, device=values.device)), lengths
