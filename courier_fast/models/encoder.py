"""ImageEncoder: a timm backbone (no classifier) and a linear head, the image encoder every
pre-training method trains; load_backbone_weights() loads local backbone weights into it."""
import os

import torch
from torch import nn

from courier_fast.models.augment import to_float


class ImageEncoder(nn.Module):
    """timm backbone (no classifier) -> linear head: images (n, 3, S, S) -> (n, embed_dim).

    Images are uint8 (normalised here) or ImageNet-normalised float. `pretrained` is a path to
    local backbone weights (a torch or safetensors state_dict); nothing is downloaded.
    `.config` holds the arguments that fix the architecture (what courier_fast.models.checkpoint needs
    to rebuild it): encoder, embed_dim, channels_last and the timm keyword arguments.
    """

    def __init__(self, encoder="resnet18", embed_dim=256, pretrained=None, grad_checkpointing=False,
                 freeze_backbone=False, channels_last=True, **timm_kwargs):
        super().__init__()
        import timm

        if not isinstance(encoder, str) or not timm.is_model(encoder):
            raise ValueError(f"encoder must be a timm model name, got {encoder!r}")
        self.backbone = timm.create_model(encoder, pretrained=False, num_classes=0, **timm_kwargs)
        if pretrained is not None:
            load_backbone_weights(self.backbone, pretrained)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self.frozen = bool(freeze_backbone)
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.channels_last = channels_last
        self.head = nn.Linear(self.backbone.num_features, embed_dim)
        self.embed_dim = embed_dim
        self.config = {"encoder": encoder, "embed_dim": embed_dim, "channels_last": channels_last, **timm_kwargs}

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BatchNorm statistics too
        return self

    def forward(self, images):
        x = to_float(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))


def load_backbone_weights(backbone, path):
    """Load a local state_dict into a timm backbone. Every backbone tensor must be there with its
    shape (BatchNorm's num_batches_tracked counters may be absent); extra keys, such as an
    ImageNet classifier's, are ignored. A partial match is a ValueError naming what is missing."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained: {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:  # noqa: BLE001  (torch.load and safetensors raise many types)
        raise ValueError(f"pretrained={path!r} is not a state_dict file ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"pretrained={path!r} holds a {type(state).__name__}, not a state_dict")
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(state[k].shape)} (backbone {tuple(own[k].shape)})"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        def names(keys):
            return ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
        problems = ([f"{len(missing)} of {len(own)} backbone tensors missing: {names(missing)}"] if missing else []) + \
                   ([f"{len(wrong)} with another shape: {names(wrong)}"] if wrong else [])
        raise ValueError(f"pretrained={path!r} does not fit the backbone: " + "; ".join(problems))
    backbone.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
