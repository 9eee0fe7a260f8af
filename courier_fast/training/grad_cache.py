"""Encoder micro-batching with exact gradients (GradCache, Gao et al. 2021): a training step
holds the encoder activations of at most `micro_batch` images at a time, whatever its batch, and
computes the gradients of the plain step.

    cache = GradCache(micro_batch=64)
    with cache.attached(method):                    # method.encode(images, augment) goes through the cache
        loss = method(batch, generator)["loss"]     # pass 1: chunks encoded without a graph (the last with one)
    loss.backward()                                 # every other parameter's gradient, and the
                                                    # gradient of the cached embeddings
    cache.backward()                                # pass 2: each other chunk re-encoded with a
                                                    # graph, backward from its cached gradient

courier_fast.training.loop.train_step does this when encoder_micro_batch is set (under DDP inside
no_sync, with one gradient all-reduce after the last chunk).

The last chunk of pass 1 is encoded with a graph, kept until backward(), which backpropagates
through it first: pass 2 re-encodes the other chunks only (n / micro_batch - 1 extra forwards,
not n / micro_batch), for one chunk's activations held during the loss (one per encode() call).
The chunks are images[:r], then micro_batch images at a time (1 <= r <= micro_batch): the part
that does not fill a chunk comes first, so the kept last chunk is a full one and pass 2
re-encodes as few images as it can (899 images, micro_batch 256: 643 re-encoded, not 768).
A checkpointed kept graph replays its own RNG state (torch.utils.checkpoint preserves it).

Same embeddings in both passes: pass 1 saves torch's RNG state (CPU, and the images' CUDA device)
before each chunk and pass 2 restores it, so dropout and stochastic depth draw the same masks;
the RNG state after backward() is the one it found. Pass 2 runs under pass 1's autocast state.
The batch's augmentation is drawn once before encode() (the methods do: Augment.draw) and
applied chunk by chunk in both passes (encode's `prepare`), so neither the float batch nor its
augmented copy is ever held whole; the encoder's kernels must be deterministic and choose the same
algorithm with or without a graph.

Layers that depend on the batch see each chunk as a batch: BatchNorm normalises with the chunk's
statistics, so such an encoder's step is not the plain step's (it is the plain step of an encoder
run `micro_batch` images at a time). Buffers that the forward updates (BatchNorm's running
statistics) are updated once per chunk, by pass 1: pass 2 puts the encoder's buffers back as it
found them (which also undoes the update of a gradient-checkpointing recompute). SyncBatchNorm is
not supported: ranks with different image counts would run different numbers of chunks.
An encode() of at most `micro_batch` images, without trainable encoder parameters or without
grad mode, is one plain forward.
"""
import contextlib
import itertools
from dataclasses import dataclass

import torch

from courier_fast._validate import positive_int


@dataclass
class _Pass:
    encoder: torch.nn.Module
    chunks: tuple       # (m, ...) image tensors, m <= micro_batch: every chunk but the last
    sizes: list         # images per chunk, the last's included (chunk_sizes)
    rng_states: list    # the RNG state before each chunk's pass-1 forward (but the last's)
    embeddings: torch.Tensor  # (n, d) leaf that requires grad
    autocast: tuple     # (device_type, enabled, dtype) of pass 1
    prepare: object     # None, or prepare(chunk, start) -> the encoder's input
    last: torch.Tensor  # the last chunk's embeddings, with the graph of its pass-1 forward


class GradCache:
    """Two-pass encoding of one training step; module docstring. micro_batch: images per encoder
    forward (int > 0)."""

    def __init__(self, micro_batch):
        self.micro_batch = positive_int("encoder_micro_batch", micro_batch)
        self._passes = []

    @contextlib.contextmanager
    def attached(self, method):
        """Inside the block, method.encode() (courier_fast.models.methods) encodes through this cache."""
        method.grad_cache = self
        try:
            yield self
        finally:
            method.grad_cache = None

    def encode(self, encoder, images, prepare=None):
        """Pass 1: embeddings (n, d) of images (n, ...) in the encoder's output dtype, computed
        `micro_batch` images at a time without a graph (but the last chunk, whose graph is kept
        for backward()), as a leaf that requires grad (backward() sends its gradient into the
        encoder). May be called several times before backward().
        prepare: None, or prepare(chunk, start) -> the encoder's input for images[start : start +
        len(chunk)] (e.g. uint8 -> a float augmented with an AugmentDraw of the whole batch); it
        runs per chunk in both passes, so it must be deterministic, and the whole prepared batch
        never exists at once."""
        trainable = any(p.requires_grad for p in encoder.parameters())
        if images.shape[0] <= self.micro_batch or not trainable or not torch.is_grad_enabled():
            return encoder(_prepared(prepare, images, 0))
        sizes = chunk_sizes(images.shape[0], self.micro_batch)
        chunks, starts, states, out = images.split(sizes), _starts(sizes), [], []
        device_type = images.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        with torch.no_grad(), _autocast(autocast):
            for k, chunk in enumerate(chunks[:-1]):
                states.append(_rng_state(images.device))
                out.append(encoder(_prepared(prepare, chunk, starts[k])))
        with _autocast(autocast):  # the last chunk keeps its graph: pass 2 does not encode it again
            last = encoder(_prepared(prepare, chunks[-1], starts[-1]))
        leaf = torch.cat(out + [last.detach()]).requires_grad_()
        self._passes.append(_Pass(encoder, chunks[:-1], sizes, states, leaf, autocast, prepare, last))
        return leaf

    def backward(self):
        """Pass 2: re-encode each chunk but the last with a graph, under the RNG state and autocast
        of its pass-1 forward, and backpropagate the gradient its embeddings received (the last
        chunk backpropagates through its kept graph; embeddings that got no gradient are
        skipped). Accumulates into the encoder parameters' .grad."""
        passes, self._passes = self._passes, []
        for p in passes:
            if p.embeddings.grad is None:
                continue
            device = p.embeddings.device
            resume, buffers = _rng_state(device), [b.clone() for b in p.encoder.buffers()]
            grads, starts = p.embeddings.grad.split(p.sizes), _starts(p.sizes)
            p.last.backward(grads[-1])  # first: its activations are freed before any chunk is re-encoded
            p.last = None
            for k, (chunk, state, grad) in enumerate(zip(p.chunks, p.rng_states, grads)):
                _set_rng_state(state, device)
                with torch.enable_grad(), _autocast(p.autocast):
                    emb = p.encoder(_prepared(p.prepare, chunk, starts[k]))
                emb.backward(grad)
            _set_rng_state(resume, device)
            with torch.no_grad():
                for b, saved in zip(p.encoder.buffers(), buffers):
                    b.copy_(saved)


def chunk_sizes(n, micro_batch):
    """Images per encoder forward for a batch of n > 0: [r] + [micro_batch] * ((n - 1) //
    micro_batch), 1 <= r <= micro_batch (the kept last chunk is a full one; module docstring)."""
    full = (n - 1) // micro_batch
    return [n - full * micro_batch] + [micro_batch] * full


def _starts(sizes):
    return [0, *itertools.accumulate(sizes[:-1])]


def _prepared(prepare, images, start):
    return images if prepare is None else prepare(images, start)


def _autocast(state):
    """Autocast as in `state` (device_type, enabled, dtype), without its weight-cast cache: pass 1's
    casts carry no graph, and a cached one would cut pass 2 (or a later forward) off the weights."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def average_gradients(params, group=None):
    """Average the .grad of `params` (those that require grad) over the ranks of `group`: what DDP
    does in its backward, for gradients accumulated under DDP's no_sync(). One all_reduce per
    gradient dtype; a missing gradient counts as zeros (every rank sends the same layout)."""
    import torch.distributed as dist

    by_dtype = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    world = dist.get_world_size(group)
    for same in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        for p, g in zip(same, flat.split([p.numel() for p in same])):
            p.grad.copy_(g.view(p.shape))
