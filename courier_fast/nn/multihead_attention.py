"""courier_fast.nn.MultiheadAttention: torch.nn.MultiheadAttention that runs the fused
reconstruction-attention op on the calls it can take, and swap_attention(model).

Every call the fused op cannot take goes to nn.MultiheadAttention.forward itself, so results,
warnings and errors there are torch's own. Which calls are fused is stated once, in
MultiheadAttention's docstring, and decided in one place, `_plan`.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from courier_fast import _validate
from courier_fast.ops import attention as _attention
from courier_fast.ops.registry import BACKENDS

_NEG_INF = float("-inf")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone
INCLUSIVE = "inclusive"  # the op's causal mode where target t attends s <= t (nn's causal mask)


def _op_has_inclusive_causal():
    """Whether reconstruction_attention takes causal="inclusive" (s <= t, nn's causal mask; its
    causal=True is strict, s < t). Asked once, on a 1 x 1 problem with the reference backend."""
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    try:
        _attention.reconstruction_attention(x, x, torch.zeros(3, 1, dtype=torch.float64), None,
                                            torch.zeros(1, 1, dtype=torch.float64), None, 1,
                                            causal=INCLUSIVE, backend="reference")
    except (TypeError, ValueError):
        return False
    return True


OP_HAS_INCLUSIVE_CAUSAL = _op_has_inclusive_causal()


def check_backend(backend):
    """backend: "auto" or a name from courier_fast.backends(); returns it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


# Verdicts of the mask checks that read a mask's values, per mask tensor and its version counter:
# a mask reused across calls or layers (nn.TransformerEncoder passes one to every layer) is read
# once, and again only after an in-place change.
_VERDICTS = WeakIdKeyDictionary()


def _remembered(mask, what, check):
    try:
        version = mask._version
    except RuntimeError:  # inference tensors have no version counter
        return bool(check(mask))
    hit = _VERDICTS.get(mask)
    if hit is not None and hit[:2] == (version, what):
        return hit[2]
    verdict = bool(check(mask))
    _VERDICTS[mask] = (version, what, verdict)
    return verdict


def _is_causal_pattern(mask):
    """mask (..., L, L) bool or float: every (L, L) slice is nn's causal mask (True / -inf above
    the diagonal, False / 0 on and below it)."""
    n = mask.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return (mask == upper).all()
    return (mask == torch.zeros(n, n, dtype=mask.dtype, device=mask.device).masked_fill(upper, _NEG_INF)).all()


def _is_zero_or_neg_inf(mask):
    return ((mask == 0) | (mask == _NEG_INF)).all()


class _Fused(NamedTuple):
    """What the fused op is called with: targets (B, P, E), history (B, L, E) (the same object
    when query is key), pad (B, L) bool True = padding or None, causal False or "inclusive",
    batched (False: unbatched 2-D input), compute_dtype (the autocast dtype or the inputs')."""
    targets: torch.Tensor
    history: torch.Tensor
    pad: Optional[torch.Tensor]
    causal: object
    batched: bool
    compute_dtype: torch.dtype


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the fused reconstruction-attention op on the calls it can
    take; nn.MultiheadAttention's own forward on every other call.

    Same constructor (plus `backend`: "auto" or a name from courier_fast.backends(), a plain
    attribute), parameters, state_dict, forward signature and return value
    (attn_output, attn_weights or None). Shapes as nn.MultiheadAttention: query (L, N, E),
    (N, L, E) with batch_first, or (L, E) unbatched; key and value likewise with S items.

    A call takes the fused op when all of these hold, and nn.MultiheadAttention's path otherwise:
      * need_weights=False (the fused op returns no attention weights);
      * no active dropout: dropout == 0 or the module is in eval mode;
      * kdim == vdim == embed_dim, add_bias_kv=False, add_zero_attn=False;
      * `key is value` (the same tensor object: the op projects one tensor into both keys and
        values and returns one gradient for it; equal but distinct tensors take torch's path);
      * query and key are plain dense tensors on CPU or CUDA, 3-D (batched, either batch_first)
        or both 2-D (unbatched), with the batch size and embed_dim the module expects and no
        empty dimension; the parameters and masks on the same device; query, key and the
        parameters of one dtype (under torch.autocast: once cast as F.linear casts them);
      * key_padding_mask None, bool, or float of query's dtype holding only 0 and -inf (read
        once per mask tensor to check it), not requiring grad, of shape (N, S) / (S,);
      * attn_mask None, or nn's causal mask (nn.Transformer.generate_square_subsequent_mask,
        bool or float, 2-D (L, S) or 3-D with every slice that mask, L == S): with
        is_causal=True and no key_padding_mask torch takes the hint and so do we; otherwise the
        mask is read once per mask tensor to check it. Only where the op has the inclusive
        causal mode (OP_HAS_INCLUSIVE_CAUSAL); key_padding_mask and attn_mask of one dtype
        (torch warns on mixed ones: those take its path and keep the warning).
    Under torch.compile the masks that need reading take torch's path.

    Where the fused op runs, outputs and gradients equal nn.MultiheadAttention's (to rounding)
    wherever nn.MultiheadAttention's output is finite. A target whose keys are all masked gets
    out_proj.bias (0 without bias) and zero gradients through it, where torch gives NaN with a
    softmax (need_weights=True) and, with need_weights=False, NaN or the same bias depending on
    its SDPA kernel (torch 2.14's CPU math kernel gives the bias). NaN or Inf inputs are not
    rejected by courier_fast's input checks: they give NaNs, as in torch. Inside nn.TransformerEncoderLayer in eval mode without autograd, torch's own fused
    encoder kernel runs and this forward is not called at all.
    `why_not_fused(...)` (the forward's arguments) says why a call takes torch's path ("" if not).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, backend="auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def __setstate__(self, state):
        state.setdefault("backend", "auto")
        super().__setstate__(state)

    def extra_repr(self):
        return f"backend={self.backend!r}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        why_not, plan = self._plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if why_not:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fused(plan), None

    def why_not_fused(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False):
        """Why forward with these arguments takes nn.MultiheadAttention's path; "" when fused."""
        return self._plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)[0]

    def _params(self):
        return (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)

    def _plan(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """("", _Fused) when the fused op can take the call, else (why not, None). Reads a mask's
        values only as the last check; raises nothing (invalid calls go to torch's path)."""
        if need_weights:
            return "need_weights=True (the fused op returns no attention weights)", None
        if self.training and self.dropout > 0:
            return "dropout is active (training with dropout > 0)", None
        if not self._qkv_same_embed_dim:
            return "kdim or vdim differs from embed_dim", None
        if self.bias_k is not None or self.bias_v is not None or self.add_zero_attn:
            return "add_bias_kv or add_zero_attn is set", None
        if key is not value:
            return "key is not value (the fused op projects one tensor into keys and values)", None
        masks = tuple(m for m in (key_padding_mask, attn_mask) if m is not None)
        if not all(isinstance(t, torch.Tensor) for t in (query, key) + masks):
            return "an argument is not a torch.Tensor", None
        params = tuple(p for p in self._params() if p is not None)
        if torch.overrides.has_torch_function((query, key) + params + masks):
            return "a Tensor argument overrides __torch_function__", None
        if query.is_nested or key.is_nested or any(t.is_sparse or t.layout != torch.strided
                                                    for t in (query, key) + masks):
            return "a nested or non-strided tensor", None
        if query.dim() not in (2, 3) or key.dim() != query.dim():
            return "query and key are not both 3-D (batched) or both 2-D (unbatched)", None
        batched = query.dim() == 3
        if not batched:
            targets, history = query.unsqueeze(0), key.unsqueeze(0)
        elif self.batch_first:
            targets, history = query, key
        else:
            targets, history = query.transpose(0, 1), key.transpose(0, 1)
        if key is query:
            history = targets
        b, p, e = targets.shape
        length = history.shape[1]
        if history.shape[0] != b or e != self.embed_dim or history.shape[2] != self.embed_dim:
            return "query / key shapes do not match each other or embed_dim", None
        if b == 0 or p == 0 or length == 0:
            return "an empty batch, query or key", None
        device = query.device
        if device.type not in ("cpu", "cuda"):
            return f"device {device.type} (the fused op runs on cpu and cuda)", None
        if any(t.device != device for t in (key,) + params + masks):
            return "tensors on different devices", None
        compute_dtype = self._compute_dtype(query, key, params)
        if compute_dtype is None:
            return "query, key and the parameters do not share one dtype", None
        if any(m.requires_grad for m in masks):
            return "a mask requires grad", None
        if len(masks) == 2 and key_padding_mask.dtype != attn_mask.dtype:
            return "key_padding_mask and attn_mask have different dtypes (torch warns)", None
        for m in masks:
            if m.dtype != torch.bool and m.dtype != query.dtype:
                return "a float mask whose dtype is not query's", None

        pad = None
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != ((b, length) if batched else (length,)):
                return "key_padding_mask shape is not (N, S) (or (S,) unbatched)", None
            pad = key_padding_mask if batched else key_padding_mask.unsqueeze(0)
        causal = False
        if attn_mask is not None:
            why_not = self._causal_mask_why_not(attn_mask, is_causal, key_padding_mask, b, p, length, batched)
            if why_not:
                return why_not, None
            causal = INCLUSIVE
        elif is_causal:
            return "is_causal=True without attn_mask (torch raises)", None
        if pad is not None and pad.dtype != torch.bool:
            if torch.compiler.is_compiling():
                return "a float key_padding_mask (its values are read; not under torch.compile)", None
            if not _remembered(key_padding_mask, "zero_or_neg_inf", _is_zero_or_neg_inf):
                return "a float key_padding_mask with values other than 0 and -inf", None
            pad = pad == _NEG_INF
        return "", _Fused(targets=targets, history=history, pad=pad, causal=causal, batched=batched,
                          compute_dtype=compute_dtype)

    def _causal_mask_why_not(self, attn_mask, is_causal, key_padding_mask, b, p, length, batched):
        if not OP_HAS_INCLUSIVE_CAUSAL:
            return "attn_mask given and the fused op has no inclusive causal mode here"
        if p != length:
            return "attn_mask with query length != key length"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return "attn_mask is neither bool nor float (torch raises)"
        shapes = ((p, length), ((b * self.num_heads) if batched else self.num_heads, p, length))
        if tuple(attn_mask.shape) not in shapes:
            return "attn_mask shape is not (L, S) or (N * num_heads, L, S)"
        if is_causal and key_padding_mask is None:
            return ""  # torch then takes the hint and never reads the mask (SDPA is_causal=True)
        if torch.compiler.is_compiling():
            return "attn_mask without the is_causal hint (its values are read; not under torch.compile)"
        if not _remembered(attn_mask, "causal", _is_causal_pattern):
            return "attn_mask is not the causal mask"
        return ""

    def _compute_dtype(self, query, key, params):
        """The dtype F.linear computes in for these tensors (autocast applied), or None if they differ."""
        dev = query.device.type
        low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        dtypes = {low if low is not None and t.dtype in _AUTOCAST_ELIGIBLE else t.dtype
                  for t in (query, key) + params}
        return dtypes.pop() if len(dtypes) == 1 else None

    def _fused(self, plan):
        def cast(t):
            return t if t is None or t.dtype == plan.compute_dtype else t.to(plan.compute_dtype)

        targets = cast(plan.targets)
        history = targets if plan.history is plan.targets else cast(plan.history)
        args = (targets, history, *(cast(t) for t in self._params()), self.num_heads)
        kwargs = {"key_padding_mask": plan.pad, "causal": plan.causal, "backend": self.backend}
        if torch.compiler.is_compiling():  # courier_fast's data checks are off while tracing anyway
            out = _attention.reconstruction_attention(*args, **kwargs)
        else:
            with _validate.input_checks(False):  # NaN / Inf inputs give torch's NaNs, not an error
                out = _attention.reconstruction_attention(*args, **kwargs)
        if not plan.batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1).contiguous()


def swap_attention(model, backend="auto"):
    """Make every torch.nn.MultiheadAttention inside `model` (model itself included) a
    courier_fast.nn.MultiheadAttention with this backend, in place, and return `model`.

    In place means the same module objects change class: their Parameter objects (so an
    optimizer built on them stays valid), buffers, hooks, device, dtype, training mode, and every
    reference to them (nn.TransformerEncoderLayer.self_attn, modules shared by several parents)
    are kept. Only modules whose type is exactly nn.MultiheadAttention are changed: ours are left
    as they are (their backend too), and other subclasses, which may override forward, are not
    touched. Outputs after the swap equal those before (see MultiheadAttention for the calls that
    take the fused op).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
    return model
