"""Pre-training methods, all on the same ImageEncoder and the same SessionBatch stream.

Every method is an nn.Module with `.encoder` (the ImageEncoder whose embeddings are exported)
and `forward(batch, generator) -> dict` of losses ("loss" is optimised), which draws the batch's
augmentation once (Augment.draw) and calls the encoder through `encode(images, augment)` (where
train_step's encoder micro-batching, courier_fast.training.grad_cache, takes over and augments chunk by
chunk), and
`images_per_step(batch)`: encoder image passes of one step (the budget unit; a method with two
views counts both). `build_method(name, items, **kwargs)` makes one:

* courier: CourierModel (the reconstruction losses), light augmentation.
* simclr: two SimCLR-augmented views of each distinct item of the batch, a 2-layer projection
  head, symmetric InfoNCE (our contrastive_loss, temperature 0.1).
Contrastive methods use every rank's items as negatives when torch.distributed is running
(all-gathered, or passed around a ring with ring=True; the item ids are candidate_ids, so an item
on two ranks is not a negative of itself) and take backend= for their loss and
batch_rows= (the most rows of any rank's SessionBatch, the same on every rank, with fixed slot
widths: the loss then gathers with no device-to-host read; train() passes its batch_size).
* category_supervised: a linear classifier on the embedding, cross-entropy on the category.
* clip_titles: image-title InfoNCE (our symmetric loss, temperature 0.07); titles are encoded
  by a bag of word embeddings, the vocabulary taken from the item table.
* random_encoder: the untrained encoder (its training runs zero steps).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from courier_fast._validate import positive_int
from courier_fast.models.augment import Augment, AugmentDraw, to_float
from courier_fast.ops.contrastive import contrastive_loss
from courier_fast.models.courier import CourierModel, gather_capacity
from courier_fast.models.encoder import ImageEncoder

METHODS = ("courier", "simclr", "category_supervised", "clip_titles", "random_encoder")


def _global_group():
    """The default process group when running distributed (negatives from every rank), else None."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _ids(batch, like):
    """The batch's item ids as candidate_ids on like's device: a rank's items are distinct, but the
    same item on two ranks would be a false negative of itself."""
    return batch.image_ids.to(like.device)


class _Method(nn.Module):
    batch_rows = None
    grad_cache = None  # a courier_fast.training.grad_cache.GradCache while train_step micro-batches the encoder

    def encode(self, images, augment=None):
        """Embeddings (n, embed_dim) of images (n, 3, S, S) (uint8, or normalised float), each
        augmented by `augment` (None, or an AugmentDraw over the n images): one encoder forward,
        or pass 1 of the attached GradCache (a leaf whose gradient it sends into the encoder
        afterwards), which converts and augments chunk by chunk."""
        prepare = None if augment is None else (lambda x, start: augment(to_float(x), start))
        if self.grad_cache is None:
            return self.encoder(images if prepare is None else prepare(images, 0))
        return self.grad_cache.encode(self.encoder, images, prepare)

    def encode_augmented(self, images, generator=None):
        """encode(images, augment): each image augmented by `self.augment`, drawn once for the
        batch from `generator`."""
        return self.encode(images, self.augment.draw(len(images), generator))

    def images_per_step(self, batch):
        """Encoder image passes of one step: each distinct item of the batch once."""
        return batch.images.shape[0]

    def item_capacity(self, batch):
        """Gather capacity of a loss over the batch's distinct items: batch_rows x (history +
        page-view slots per row), the most distinct items such a batch can hold (None without
        batch_rows: the loss reads the ranks' largest size back once per call)."""
        rows, pv_slots = batch.pv_index.shape
        return gather_capacity(self.batch_rows, rows, pv_slots + batch.history_index.shape[1])


class CourierMethod(_Method):
    def __init__(self, items=None, **kw):
        super().__init__()
        self.model = CourierModel(**kw)
        self.encoder = self.model.encoder
        self.augment = Augment.light()

    def forward(self, batch, generator=None):
        return self.model(batch, embeddings=self.encode_augmented(batch.images, generator))


class SimCLRMethod(_Method):
    def __init__(self, items=None, temperature=0.1, backend="auto", ring=False, batch_rows=None, **kw):
        super().__init__()
        self.batch_rows = None if batch_rows is None else positive_int("batch_rows", batch_rows)
        self.encoder = ImageEncoder(**kw)
        d = self.encoder.embed_dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.augment, self.temperature = Augment.simclr(), temperature
        self.loss_options = {"backend": backend, "ring": ring}

    def images_per_step(self, batch):
        return 2 * batch.images.shape[0]

    def forward(self, batch, generator=None):
        n = len(batch.images)
        views = AugmentDraw.cat([self.augment.draw(n, generator), self.augment.draw(n, generator)])
        z = self.projection(self.encode(torch.cat([batch.images, batch.images]), views))
        z1, z2 = z.chunk(2)
        return {"loss": contrastive_loss(z1, z2, temperature=self.temperature, symmetric=True, group=_global_group(),
                                         capacity=self.item_capacity(batch), candidate_ids=_ids(batch, z1),
                                         **self.loss_options)}


class CategorySupervisedMethod(_Method):
    def __init__(self, items=None, num_categories=None, **kw):
        super().__init__()
        if num_categories is None:
            num_categories = int(items.column("category").to_numpy().max()) + 1
        self.encoder = ImageEncoder(**kw)
        self.classifier = nn.Linear(self.encoder.embed_dim, num_categories)
        self.augment = Augment.light()

    def forward(self, batch, generator=None):
        logits = self.classifier(self.encode_augmented(batch.images, generator)).float()
        target = batch.image_category.to(logits.device) % logits.shape[1]
        return {"loss": F.cross_entropy(logits, target)}


class ClipTitlesMethod(_Method):
    def __init__(self, items=None, vocab=None, temperature=0.07, backend="auto", ring=False, batch_rows=None,
                 **kw):
        super().__init__()
        self.batch_rows = None if batch_rows is None else positive_int("batch_rows", batch_rows)
        self.loss_options = {"backend": backend, "ring": ring}
        if vocab is None:
            vocab = sorted({w for t in items.column("title").to_pylist() for w in t.lower().split()})
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = unknown word
        ids = items.column("item_id").to_numpy()
        order = ids.argsort()
        self.register_buffer("_sorted_ids", torch.from_numpy(ids[order]), persistent=False)
        tokens = [[self.vocab.get(w, 0) for w in t.lower().split()] or [0] for t in items.column("title").to_pylist()]
        width = max(len(t) for t in tokens)
        table = torch.full((len(tokens), width), -1, dtype=torch.long)
        for k, t in enumerate(tokens):
            table[k, :len(t)] = torch.tensor(t)
        self.register_buffer("_tokens", table[torch.from_numpy(order)], persistent=False)
        self.encoder = ImageEncoder(**kw)
        d = self.encoder.embed_dim
        self.words = nn.Embedding(len(vocab) + 1, d)
        self.text_head = nn.Linear(d, d)
        self.augment, self.temperature = Augment.light(), temperature

    def encode_titles(self, item_ids):
        tok = self._tokens[torch.searchsorted(self._sorted_ids, item_ids.to(self._sorted_ids.device))]
        mask = (tok >= 0).float().unsqueeze(-1)
        bag = (self.words(tok.clamp(min=0)) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.text_head(bag)

    def forward(self, batch, generator=None):
        img = self.encode_augmented(batch.images, generator)
        txt = self.encode_titles(batch.image_ids)
        return {"loss": contrastive_loss(img, txt.to(img.dtype), temperature=self.temperature, symmetric=True,
                                         group=_global_group(), capacity=self.item_capacity(batch),
                                         candidate_ids=_ids(batch, img), **self.loss_options)}


class RandomEncoderMethod(_Method):
    def __init__(self, items=None, **kw):
        super().__init__()
        self.encoder = ImageEncoder(**kw)

    def images_per_step(self, batch):
        return 0

    def forward(self, batch, generator=None):
        raise RuntimeError("random_encoder is not trained (run it with steps=0)")


_CLASSES = {"courier": CourierMethod, "simclr": SimCLRMethod, "category_supervised": CategorySupervisedMethod,
            "clip_titles": ClipTitlesMethod, "random_encoder": RandomEncoderMethod}


def build_method(name, items=None, **kwargs):
    """A pre-training method by name (METHODS); `items` is the item table (categories, titles).

    kwargs go to the method (e.g. temperature) and the rest to ImageEncoder / CourierModel.
    """
    if name not in _CLASSES:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return _CLASSES[name](items, **kwargs)
