"""How the attention backward's dK/dV pass splits a row's targets across programs (host side, torch
only; issue 27 item 6), and the work model that shows the balance.

dK[s] and dV[s] sum over every target of key s's row. Walked by one program per key (or key tile),
a history row shared by 10^5 targets (history_index with a skewed index) is 10^5 serial steps on
L x h programs. Instead each row's targets (order[target_offsets[r]:target_offsets[r+1]]) are cut
into chunks of `target_chunk(T, B)` targets; a *piece* is (row, chunk):

  phase 1  programs over pieces (x key tiles / keys, x heads) sum their chunk's targets for their
           row's keys. A row with one piece writes dK/dV directly; a row with m > 1 pieces writes
           fp32 partials into a workspace, at row ws_offsets[r] + c * L_r + slot for chunk c
           (chunk-major: a piece's partials are L_r consecutive rows).
  phase 2  every key of a multi-piece row sums its m partials in chunk order c = 0 .. m-1:
           deterministic, no atomics.

The chunk size is CHUNK = clamp(T // B, DKDV_MIN_CHUNK, DKDV_MAX_CHUNK): shapes only, so the
split needs no host read of the device (the tables below are device tensors; the grid and the
workspace use host-side upper bounds). With P = sum_r ceil(n_r / CHUNK) <= T / CHUNK + B pieces,
the mean piece has T / P >= CHUNK / (1 + CHUNK B / T) targets, so when T // B >= DKDV_MIN_CHUNK
the longest piece (CHUNK targets) is at most 2x the mean; below that, no piece exceeds
DKDV_MIN_CHUNK targets. DKDV_MAX_CHUNK bounds a program's serial length when rows are uniformly
long (one row of 10^5 targets: 391 pieces).

Mirrored in C++ for the CUDA backend: csrc/attention_core.h (kDkdvMinChunk, kDkdvMaxChunk,
dkdv_target_chunk, dkdv_workspace_rows); tests/ops/test_dkdv_split.py checks the constants agree.
The Triton launcher (kernels/reconstruction_attention.py) calls split_plan; dkdv_work enumerates
the programs that launch runs (and the CUDA backend's warps) from the same plan.
"""
from typing import NamedTuple

import torch

DKDV_MIN_CHUNK = 32  # targets: rows of at most this many stay one piece (COURIER's P ~ 5-10: no split)
DKDV_MAX_CHUNK = 256  # targets: the longest serial walk of one dK/dV program


def target_chunk(n_targets, n_rows):
    """Targets per dK/dV piece for T targets over B rows: the mean row, clamped."""
    return max(DKDV_MIN_CHUNK, min(DKDV_MAX_CHUNK, n_targets // max(n_rows, 1)))


def piece_bound(n_targets, n_rows, chunk, max_targets=-1):
    """Upper bound on sum_r ceil(n_r / chunk) (the phase-1 grid), from shapes: each row adds at most
    chunk - 1 targets of rounding; every piece holds a target; max_targets >= 0 bounds each row."""
    bound = min(n_targets, (n_targets + n_rows * (chunk - 1)) // chunk)
    if max_targets >= 0:
        bound = min(bound, n_rows * -(-max_targets // chunk))
    return bound


def workspace_rows(n_targets, n_keys, chunk, max_keys, max_targets=-1):
    """Upper bound on the partial rows, sum over multi-piece rows (n_r > chunk) of m_r * L_r with
    L_r <= max_keys: at most T // (chunk + 1) such rows, each adding < 1 piece of rounding, so
    max_keys * (T + (T // (chunk + 1)) (chunk - 1)) // chunk; and sum_r m_r L_r <= (T max_keys +
    (chunk - 1) S) // chunk for S keys. 0 when no row can exceed one chunk (T <= chunk, or a known
    max_targets <= chunk)."""
    if n_targets <= chunk or 0 <= max_targets <= chunk:
        return 0
    pieces = (n_targets + (n_targets // (chunk + 1)) * (chunk - 1)) // chunk
    return min(pieces * max_keys, (n_targets * max_keys + (chunk - 1) * n_keys) // chunk)


class SplitPlan(NamedTuple):
    """The dK/dV split of one call. Host ints: chunk, n_pieces (phase-1 programs per head and key
    tile; pieces past the real count find row B and exit), ws_rows (workspace rows; 0: no phase 2).
    Device int64 tensors: piece_offsets (B+1,) (row r's pieces are [piece_offsets[r],
    piece_offsets[r+1])), piece_rows (n_pieces,) (each piece's row, B past the last),
    ws_offsets (B+1,) (row r's partials start there when it has more than one piece)."""
    chunk: int
    n_pieces: int
    ws_rows: int
    piece_offsets: torch.Tensor
    piece_rows: torch.Tensor
    ws_offsets: torch.Tensor


def _exclusive_cumsum(x):
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])


def split_plan(target_offsets, key_offsets, n_targets, n_keys, max_keys, max_targets=-1):
    """The SplitPlan for (B+1,) int64 target / key offsets over T targets and S keys, max_keys >=
    every row's key count (rows are clamped to it: the workspace bound relies on it), max_targets
    (-1: unknown). Device ops only (no host read)."""
    n_rows = target_offsets.numel() - 1
    chunk = target_chunk(n_targets, n_rows)
    n = target_offsets[1:] - target_offsets[:-1]
    keys = (key_offsets[1:] - key_offsets[:-1]).clamp(max=max_keys)
    m = (n + chunk - 1) // chunk
    piece_offsets = _exclusive_cumsum(m)
    n_pieces = piece_bound(n_targets, n_rows, chunk, max_targets)
    arange = torch.arange(n_pieces, device=target_offsets.device)
    piece_rows = torch.searchsorted(piece_offsets, arange, right=True) - 1
    ws_offsets = _exclusive_cumsum(torch.where(m > 1, m * keys, torch.zeros_like(m)))
    return SplitPlan(chunk, n_pieces, workspace_rows(n_targets, n_keys, chunk, max_keys, max_targets),
                     piece_offsets, piece_rows, ws_offsets)


def dkdv_work(plan, target_offsets, key_offsets, max_keys, family, key_tile=None):
    """The work model: (targets, slots, pairs) per phase-1 program of the dK/dV pass that does work,
    as int64 tensors. targets: the targets the program walks (its chunk); slots: the key slots it
    computes per target (CUDA: 1 key per warp; Triton short: the key_tile slots of its row;
    Triton flash: one key tile of key_tile); pairs: the real (target, key) pairs among them.
    Work in target x key units is targets * slots (what the program executes); heads multiply
    every program alike and are left out. family: "cuda" (a warp per (piece, key)), "short"
    (a program per piece), "flash" (a program per (piece, key tile))."""
    n_rows = target_offsets.numel() - 1
    total = int(plan.piece_offsets[-1])
    rows = plan.piece_rows[:total]
    chunk_idx = torch.arange(total) - plan.piece_offsets[rows]
    n = (target_offsets[1:] - target_offsets[:-1])[rows]
    targets = torch.clamp(n - chunk_idx * plan.chunk, max=plan.chunk)
    keys = (key_offsets[1:] - key_offsets[:-1]).clamp(max=max_keys)[rows]
    assert rows.numel() == 0 or int(rows.max()) < n_rows
    if family == "cuda":
        per_key = torch.repeat_interleave(targets, keys)
        return per_key, torch.ones_like(per_key), per_key
    if family == "short":
        return targets, torch.full_like(targets, key_tile), targets * keys
    if family == "flash":
        tiles = (keys + key_tile - 1) // key_tile
        t = torch.repeat_interleave(targets, tiles)
        first = torch.repeat_interleave(_exclusive_cumsum(tiles)[:-1], tiles)
        j = torch.arange(t.numel()) - first
        in_tile = torch.clamp(torch.repeat_interleave(keys, tiles) - j * key_tile, max=key_tile)
        return t, torch.full_like(t, key_tile), t * in_tile
    raise ValueError(f"family must be 'cuda', 'short' or 'flash', got {family!r}")
