"""Drop-in modules: MultiheadAttention (torch.nn.MultiheadAttention's API, the fused op where a
call allows) and swap_attention(model), ReconstructionAttention (nn.MultiheadAttention's
parameters), InBatchContrastiveLoss and ClipLoss (open_clip's ClipLoss through the fused loss)."""
from courier_fast.nn.attention import ReconstructionAttention
from courier_fast.nn.loss import ClipLoss, InBatchContrastiveLoss
from courier_fast.nn.multihead_attention import MultiheadAttention, swap_attention

__all__ = ["MultiheadAttention", "swap_attention", "ReconstructionAttention", "InBatchContrastiveLoss", "ClipLoss"]
