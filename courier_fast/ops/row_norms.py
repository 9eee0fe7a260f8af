"""Row L2 normalisation shared by the loss backends that normalise outside their GEMMs (the
chunked ATen backend and the Triton kernels' host side): one copy of the math, below both."""
import torch

from courier_fast.ops.reference import NORM_EPS, compute_dtype


def inverse_norms(x):
    """(N,) fp32/fp64: 1 / max(||x_j||, eps), as torch.nn.functional.normalize."""
    return torch.linalg.vector_norm(x.to(compute_dtype(x.dtype)), dim=1).clamp_min(NORM_EPS).reciprocal()


def normalize_backward(g_hat, x, inv):
    """dL/dx for x_hat = x * inv (inv = 1 / max(||x||, eps)), given g_hat = dL/dx_hat. Where the
    norm is clamped (||x|| <= eps) x_hat = x / eps is linear in x."""
    x_hat = x.to(g_hat.dtype) * inv[:, None]
    tangential = (g_hat - x_hat * (g_hat * x_hat).sum(1, keepdim=True)) * inv[:, None]
    clamped = (inv >= 1.0 / NORM_EPS)[:, None]
    return torch.where(clamped, g_hat * inv[:, None], tangential)
