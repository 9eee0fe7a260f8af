"""ReconstructionAttention: COURIER's reconstruction attention as a module with
nn.MultiheadAttention's parameters and state_dict (courier_fast.reconstruction_attention inside)."""
import torch
from torch import nn

from courier_fast.ops.attention import reconstruction_attention


class ReconstructionAttention(nn.Module):
    """COURIER's user-intention reconstruction: targets attend over the user's history.

    Parameters and state_dict keys are exactly nn.MultiheadAttention's (in_proj_weight,
    in_proj_bias, out_proj.weight, out_proj.bias), so `load_state_dict(mha.state_dict())`
    works and the output equals `mha(T, H, H, key_padding_mask=m, need_weights=False)[0]`
    (batch_first) on every target with at least one valid history item. A target with none
    gets out_proj.bias, where nn.MultiheadAttention gives NaN.

    forward(targets (B, P, d), history (B, L, d), key_padding_mask (B, L) bool True = pad,
    causal=False | True ("strict", s < t) | "inclusive" (s <= t), lengths (B,) int for
    right-padded rows) -> (B, P, d). Other layouts by keyword (see
    courier_fast.reconstruction_attention): history_index (T,) with flat targets (T, d), the
    official `mha(q, hist[idx], hist[idx])` without the copy; a jagged history (S, d) with
    history_offsets (B+1,) (and max_history_len); jagged targets (T, d) with target_offsets.
    Under torch.autocast inputs and parameters are cast to the autocast dtype (as nn.Linear is).
    """

    def __init__(self, embed_dim, num_heads, bias=True, device=None, dtype=None, backend="auto"):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.backend = embed_dim, num_heads, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        """nn.MultiheadAttention's initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, backend="auto"):
        """A copy of an nn.MultiheadAttention's weights (same device and dtype)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha has kdim/vdim != embed_dim; ReconstructionAttention needs one in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha uses add_bias_kv or add_zero_attn, which ReconstructionAttention does not have")
        w = mha.in_proj_weight
        module = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                     device=w.device, dtype=w.dtype, backend=backend)
        module.load_state_dict(mha.state_dict())
        return module

    def forward(self, targets, history, key_padding_mask=None, causal=False, lengths=None, *,
                history_index=None, history_offsets=None, target_offsets=None, max_history_len=None):
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        device = targets.device.type
        if torch.is_autocast_enabled(device):  # like nn.Linear under autocast: compute in its dtype
            dtype = torch.get_autocast_dtype(device)
            targets, history = targets.to(dtype), history.to(dtype)
            params = tuple(None if p is None else p.to(dtype) for p in params)
        return reconstruction_attention(
            targets, history, *params, self.num_heads, key_padding_mask=key_padding_mask, lengths=lengths,
            causal=causal, history_index=history_index, history_offsets=history_offsets,
            target_offsets=target_offsets, max_history_len=max_history_len, backend=self.backend)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bias={self.in_proj_bias is not None}"
