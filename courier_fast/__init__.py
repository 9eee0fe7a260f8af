"""courier_fast: fast COURIER (Contrastive User Intention Reconstruction) for PyTorch.

    import courier_fast as cf
    loss = cf.contrastive_loss(recon, item_emb, anchor_weight=clicked, temperature=0.05)
    attn = cf.nn.ReconstructionAttention(256, 4)      # nn.MultiheadAttention's parameters
    recon = attn(pv_emb, history_emb, key_padding_mask=history_pad)
    cf.backends()                                    # {name: (available, reason)}
    model = cf.CourierModel("resnet18", query="learned")  # timm encoder + attention + COURIER losses
    cf.train(cf.TrainConfig(data="world/", out="runs/courier", image_size=0))  # 0: stored size; resumable, torchrun-able
"""
from courier_fast import _extension  # noqa: F401  (loads courier_fast._C, warns once if missing)
from courier_fast.ops.backends import compiled as _ops  # noqa: F401  (fake kernels + autograd for the compiled ops)
from courier_fast import nn
from courier_fast.ops import jagged  # cf.jagged: padded <-> jagged (values + offsets) conversions
from courier_fast._validate import set_input_checks
from courier_fast.ops.attention import reconstruction_attention
from courier_fast.ops.selfcheck.check import selftest
from courier_fast.ops.contrastive import contrastive_loss
from courier_fast.ops.dispatch import backends
from courier_fast.info import build_info

__version__ = "0.1.0"

# The model and training API need the data stack (pyarrow, timm, torchvision): imported on
# first use, so that the ops above work with nothing but torch (e.g. a CPU-only torch).
_LAZY = {"CourierModel": "courier_fast.models.courier", "TrainConfig": "courier_fast.training.loop",
         "train": "courier_fast.training.loop"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'courier_fast' has no attribute {name!r}")
__all__ = ["contrastive_loss", "reconstruction_attention", "nn", "jagged", "backends", "build_info",
           "set_input_checks", "selftest", "CourierModel", "TrainConfig", "train", "__version__"]
