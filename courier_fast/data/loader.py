"""SessionLoader: batches of request rows -> decoded history and page-view images.

Each batch holds B request rows of one session table (see format.py). Rows share items, so
every distinct item of a batch is decoded once and the rows index into that set:
    images       (U, 3, S, S)     the batch's distinct items, ordered by item id
    image_ids    (U,) int64       their ids; image_category (U,) int64 their categories
    history_index, pv_index (B, L) / (B, P) int64  rows of `images`; U where padded
    history_pad  (B, L) bool      True = padding (nn.MultiheadAttention's key_padding_mask)
    pv_pad       (B, P) bool      True = padding
    clicks       (B, P) float32   click labels (0 where padded)
    history_ids, pv_ids (B, L) / (B, P) int64 item ids (-1 where padded); user_id (B,) int64
and, gathered on access: history (B, L, 3, S, S) the newest L clicked items, oldest -> newest,
right-padded with zero images; pv (B, P, 3, S, S) the items shown; history_category /
pv_category (B, L) / (B, P) int64 (-1 where padded). A model should encode `images` once and
index the embeddings (see CourierModel). Images are uint8, or float32 ImageNet-normalised
with normalize=True. Items may carry their images as bytes or as file paths (format.py): only
a batch's own files are read, so memory does not grow with the catalogue. A background thread
prepares the next `prefetch`
batches while the caller computes. Order is a permutation fixed by (seed, epoch); with
world_size > 1 rank r takes positions r, r + W, ... of it: shards are disjoint and together
complete (drop_last=True trims every shard to the same number of full batches, for DDP).
An image the decoder skips (ImageDecoder(on_error="skip")) is left out of `images` and every
slot that shows it becomes padding (id -1, pad True, click 0), so padding may then sit between
valid slots. On a GPU the prefetch thread decodes on the decoder's device (decoder.device).
"""
import queue
import threading
from dataclasses import dataclass, fields

import numpy as np
import torch

from courier_fast.data.decode import ImageDecoder
from courier_fast.data.images import ItemImages


@dataclass
class SessionBatch:
    images: torch.Tensor
    image_ids: torch.Tensor
    image_category: torch.Tensor
    history_index: torch.Tensor
    pv_index: torch.Tensor
    history_pad: torch.Tensor
    pv_pad: torch.Tensor
    clicks: torch.Tensor
    history_ids: torch.Tensor
    pv_ids: torch.Tensor
    user_id: torch.Tensor

    def _gather(self, table, index):
        """table (U, ...) indexed by (B, K) with U = padding -> (B, K, ...), zeros where padded."""
        padded = torch.cat([table, table.new_zeros((1,) + table.shape[1:])])
        return padded[index.to(padded.device)]

    @property
    def history(self):
        return self._gather(self.images, self.history_index)

    @property
    def pv(self):
        return self._gather(self.images, self.pv_index)

    @property
    def history_category(self):
        return torch.where(self.history_pad, -1, self._gather(self.image_category, self.history_index))

    @property
    def pv_category(self):
        return torch.where(self.pv_pad, -1, self._gather(self.image_category, self.pv_index))

    def pin_memory(self):
        """A copy with every CPU tensor in pinned (page-locked) memory, so that
        to(cuda, non_blocking=True) copies without a host sync (GPU tensors are kept)."""
        return SessionBatch(**{f.name: (t.pin_memory() if t.device.type == "cpu" else t)
                               for f in fields(self) for t in (getattr(self, f.name),)})

    def to(self, device, non_blocking=False):
        """A copy with every tensor on `device`."""
        return SessionBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in fields(self)})

    @property
    def num_rows(self):
        return self.pv_index.shape[0]


def _ragged(column):
    """(flat int64 values, offsets) of a pyarrow list column."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy().astype(np.int64), arr.offsets.to_numpy().astype(np.int64)


def _pad_rows(flat, offsets, rows, width, newest):
    """(len(rows), width) int64 of the ragged rows `rows`, -1 where padded; the last `width`
    values of a longer row when newest, else the first."""
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    for k, r in enumerate(rows):
        seq = flat[offsets[r]:offsets[r + 1]]
        seq = seq[-width:] if newest else seq[:width]
        ids[k, :len(seq)] = seq
    return ids


def padded_column(column, width=None, newest=False):
    """A pyarrow list<int> column -> (rows, width) int64, -1 where padded (width None: the longest row)."""
    flat, offsets = _ragged(column)
    if width is None:
        width = int(np.diff(offsets).max(initial=0))
    return _pad_rows(flat, offsets, np.arange(len(offsets) - 1), width, newest)


def _use_device_of(decoder):
    """Make the decoder's CUDA device current in this thread (a new thread starts on GPU 0)."""
    device = getattr(decoder, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.set_device(device)


class SessionLoader:
    def __init__(self, items, sessions, *, batch_size, image_size=None, history_len=5, pv_len=None,
                 decoder=None, shuffle=True, seed=0, rank=0, world_size=1, drop_last=False,
                 prefetch=2, device="cpu", normalize=False, pin_memory=False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if history_len <= 0:
            raise ValueError(f"history_len must be > 0, got {history_len}")
        self.batch_size, self.history_len, self.shuffle, self.seed = batch_size, history_len, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.prefetch = rank, world_size, drop_last, prefetch
        self.pin_memory = pin_memory  # batches' CPU tensors pinned (in the prefetch thread)
        self.decoder = decoder or ImageDecoder(device=device, size=image_size, normalize=normalize)
        self.epoch = 0
        ids = items.column("item_id").to_numpy()
        self._order = np.argsort(ids)
        self._sorted_ids = ids[self._order]
        self._images = ItemImages(items)  # bytes in the table, or files read per batch
        self._categories = items.column("category").to_numpy().astype(np.int64)
        self._hist, self._hist_off = _ragged(sessions.column("history"))
        self._pv, self._pv_off = _ragged(sessions.column("pv_items"))
        self._clicks, _ = _ragged(sessions.column("clicks"))
        self._users = sessions.column("user_id").to_numpy()
        self.num_rows = sessions.num_rows
        self.pv_len = pv_len or int(np.diff(self._pv_off).max())

    def set_epoch(self, epoch):
        """Choose the epoch whose permutation the next iteration uses (like DistributedSampler)."""
        self.epoch = int(epoch)

    def shard(self):
        """Row indices this rank reads this epoch, in order."""
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
                 if self.shuffle else np.arange(self.num_rows))
        mine = order[self.rank::self.world_size]
        if self.drop_last:
            per_rank = (self.num_rows // self.world_size) // self.batch_size * self.batch_size
            mine = mine[:per_rank]
        return mine

    def __len__(self):
        n = len(self.shard())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start=0):
        """This epoch's batches from batch number `start` on (a resumed run skips the rest unread)."""
        rows = self.shard()
        chunks = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.drop_last:
            chunks = [c for c in chunks if len(c) == self.batch_size]
        chunks = chunks[start:]
        if self.prefetch <= 0:
            return (self.make_batch(c) for c in chunks)
        return self._prefetched(chunks)

    def _prefetched(self, chunks):
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                _use_device_of(self.decoder)
                for c in chunks:
                    if stop.is_set():
                        return
                    q.put(("batch", self.make_batch(c)))
                q.put(("done", None))
            except BaseException as exc:  # surfaced in the consumer, with its traceback
                q.put(("error", exc))

        worker = threading.Thread(target=produce, daemon=True, name="courier-fast-prefetch")
        worker.start()
        try:
            while True:
                kind, value = q.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    # ------------------------------------------------------------------ one batch
    def make_batch(self, rows):
        hist_ids = _pad_rows(self._hist, self._hist_off, rows, self.history_len, newest=True)
        pv_ids = _pad_rows(self._pv, self._pv_off, rows, self.pv_len, newest=False)
        clicks = _pad_rows(self._clicks, self._pv_off, rows, self.pv_len, newest=False)
        unique = np.unique(np.concatenate([hist_ids.ravel(), pv_ids.ravel()]))
        unique = unique[unique >= 0]
        pos = self._order[np.searchsorted(self._sorted_ids, unique)]
        images = self.decoder(self._images.read(pos), item_ids=unique)
        skipped = list(getattr(self.decoder, "last_skipped", None) or ())
        if skipped:  # those items' slots become padding; `unique` keeps the decoded ones, in order
            gone = unique[skipped]
            hist_ids = np.where(np.isin(hist_ids, gone), -1, hist_ids)
            pv_ids = np.where(np.isin(pv_ids, gone), -1, pv_ids)
            keep = np.ones(len(unique), dtype=bool)
            keep[skipped] = False
            unique, pos = unique[keep], pos[keep]
        if images.shape[0] != len(unique):
            raise ValueError(f"decoder returned {images.shape[0]} images for {len(unique)} items "
                             f"(and reported {len(skipped)} skipped in .last_skipped)")

        def index(ids):  # position in `unique`, len(unique) for padding
            return torch.from_numpy(np.where(ids >= 0, np.searchsorted(unique, ids), len(unique)))

        batch = SessionBatch(
            images=images, image_ids=torch.from_numpy(unique), image_category=torch.from_numpy(self._categories[pos]),
            history_index=index(hist_ids), pv_index=index(pv_ids),
            history_pad=torch.from_numpy(hist_ids < 0), pv_pad=torch.from_numpy(pv_ids < 0),
            clicks=torch.from_numpy(np.where(pv_ids >= 0, clicks, 0).astype(np.float32)),
            history_ids=torch.from_numpy(hist_ids), pv_ids=torch.from_numpy(pv_ids),
            user_id=torch.from_numpy(self._users[rows].astype(np.int64)))
        return batch.pin_memory() if self.pin_memory else batch
