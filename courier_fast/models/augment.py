"""Batched image augmentation on tensors (any device), reproducible from a torch.Generator.

Augment(images (n, 3, S, S) float, ImageNet-normalised, generator) -> same shape: a random
resized crop (area fraction in `crop_scale`, aspect in [3/4, 4/3], one affine grid_sample for
the whole batch), a horizontal flip with probability 1/2, and optional colour jitter
(brightness, contrast, saturation, a hue rotation in YIQ space) and grayscale. Random numbers
are drawn on the CPU generator, so a run is the same on any device and after a resume.

Augment.draw(n, generator) draws one call's parameters without touching an image (an
AugmentDraw); draw(images, start) then augments any row range of the batch, which lets encoder
micro-batching (courier_fast.training.grad_cache) augment chunk by chunk and never hold the whole
augmented float batch. Every image is augmented on its own, so chunks give the whole batch's result.
"""
import math

import torch
import torch.nn.functional as F

from courier_fast.data.decode import IMAGENET_MEAN, IMAGENET_STD, device_constant, imagenet_normalize

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)  # on the CPU, once (on a GPU, linalg.inv syncs with the host)


def to_float(images):
    """uint8 (n, 3, S, S) -> ImageNet-normalised float32; float input is returned as is."""
    return imagenet_normalize(images) if images.dtype == torch.uint8 else images


class Augment:
    def __init__(self, crop_scale=(0.6, 1.0), flip=True, brightness=0.0, contrast=0.0, saturation=0.0,
                 hue=0.0, grayscale=0.0, jitter_p=0.8):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        self.crop_scale, self.flip = crop_scale, flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.grayscale, self.jitter_p = grayscale, jitter_p

    @classmethod
    def light(cls):
        """Crop and flip only: keeps colour, which carries users' taste."""
        return cls(crop_scale=(0.6, 1.0))

    @classmethod
    def simclr(cls):
        """SimCLR's recipe: crop, flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2."""
        return cls(crop_scale=(0.3, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale=0.2)

    def __call__(self, images, generator=None):
        """images (n, 3, S, S) float, ImageNet-normalised -> augmented, same shape and dtype."""
        return self.draw(images.shape[0], generator)(images)

    def draw(self, n, generator=None):
        """The random parameters of one call over n images (an AugmentDraw), drawn from `generator`
        on the CPU; augmenting with it later, whole or in row ranges, gives what the call gives."""
        if n == 0:
            return AugmentDraw(self, 0, {})

        def uniform(lo, hi):
            return torch.rand((n,), generator=generator) * (hi - lo) + lo

        area = uniform(*self.crop_scale)
        ratio = uniform(math.log(3 / 4), math.log(4 / 3)).exp()
        ratio = torch.minimum(torch.maximum(ratio, area), 1 / area)  # both sides <= 1, area exact
        sx, sy = (area * ratio).sqrt(), (area / ratio).sqrt()
        cx = (uniform(-1, 1) * (1 - sx))
        cy = (uniform(-1, 1) * (1 - sy))
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        params = {"sx": sx * flip, "cx": cx, "sy": sy, "cy": cy}
        if self.colour:
            params["on"] = (uniform(0, 1) < self.jitter_p).float()
            params["brightness"] = uniform(1 - self.brightness, 1 + self.brightness)
            params["contrast"] = uniform(1 - self.contrast, 1 + self.contrast)
            params["saturation"] = uniform(1 - self.saturation, 1 + self.saturation)
            if self.hue:
                params["hue"] = uniform(-self.hue, self.hue) * 2 * math.pi
                params["hue_matrix"] = _hue_matrices(params["hue"]).reshape(n, 9)
            if self.grayscale:
                params["gray"] = (uniform(0, 1) < self.grayscale).float()
        return AugmentDraw(self, n, params)

    @property
    def colour(self):
        return bool(self.brightness or self.contrast or self.saturation or self.hue or self.grayscale)


class AugmentDraw:
    """One batch's augmentation, drawn before any image is touched (Augment.draw): per-image
    crop / flip / colour parameters ((n,) CPU tensors). draw(images, start) augments rows
    start .. start + len(images) of the batch, so a batch can be augmented chunk by chunk (as
    encoder micro-batching does) with the result of augmenting it whole."""

    def __init__(self, augment, n, params):
        self.augment, self.n, self.params = augment, n, params
        self._packed = None  # (n, k) float32 of every parameter, pinned where CUDA is available

    def _on(self, device, start, m):
        """The parameters of rows start .. start + m on `device`: one copy of one packed tensor
        (pinned and non-blocking on CUDA: no host sync), split into views there."""
        if device.type == "cpu":
            return {k: v[start:start + m] for k, v in self.params.items()}
        if self._packed is None:
            packed = torch.cat([v.reshape(self.n, -1).float() for v in self.params.values()], dim=1)
            self._packed = packed.pin_memory() if torch.cuda.is_available() else packed
        rows = self._packed[start:start + m].to(device, non_blocking=True)
        out, col = {}, 0
        for k, v in self.params.items():
            width = v[0].numel() if self.n else 1
            out[k] = rows[:, col:col + width].reshape(m, *v.shape[1:])
            col += width
        return out

    def __len__(self):
        return self.n

    @staticmethod
    def cat(draws):
        """The draws of consecutive batches as one (e.g. two views of the same images)."""
        drawn = [d for d in draws if d.n]
        if not drawn:
            return AugmentDraw(draws[0].augment if draws else None, 0, {})
        return AugmentDraw(drawn[0].augment, sum(d.n for d in drawn),
                           {k: torch.cat([d.params[k] for d in drawn]) for k in drawn[0].params})

    def __call__(self, images, start=0):
        """images (m, 3, S, S) float, ImageNet-normalised, rows start .. start + m of the batch
        this was drawn for -> augmented, same shape and dtype."""
        m, dev = images.shape[0], images.device
        if m == 0:
            return images
        if start < 0 or start + m > self.n:
            raise ValueError(f"images: rows {start} .. {start + m} of a draw over {self.n} images")
        p = self._on(dev, start, m)
        theta = torch.zeros(m, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = p["sx"], p["cx"]
        theta[:, 1, 1], theta[:, 1, 2] = p["sy"], p["cy"]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.augment.colour:
            out = _colour(out, p)
        return out.to(images.dtype)


def _colour(x, p):
    """Colour jitter of normalised images x (m, 3, S, S) with the per-image parameters p."""
    m, dev = x.shape[0], x.device
    view = lambda v: v.view(m, 1, 1, 1)  # noqa: E731
    mean = device_constant("imagenet_mean", IMAGENET_MEAN, dev).view(1, 3, 1, 1)
    std = device_constant("imagenet_std", IMAGENET_STD, dev).view(1, 3, 1, 1)
    rgb = x * std + mean
    gray_w = device_constant("gray_weights", GRAY_WEIGHTS, dev).view(1, 3, 1, 1)
    jit = rgb * view(p["brightness"])
    gray = (jit * gray_w).sum(1, keepdim=True)
    jit = (jit - gray.mean((2, 3), keepdim=True)) * view(p["contrast"]) + gray.mean((2, 3), keepdim=True)
    gray = (jit * gray_w).sum(1, keepdim=True)
    jit = (jit - gray) * view(p["saturation"]) + gray
    if "hue_matrix" in p:  # rotate chroma in YIQ by up to hue * 360 degrees (matrices made on the CPU)
        jit = torch.einsum("nij,njhw->nihw", p["hue_matrix"].view(m, 3, 3), jit)
    on = view(p["on"])
    rgb = on * jit.clamp(0, 1) + (1 - on) * rgb
    if "gray" in p:
        g = view(p["gray"])
        rgb = g * (rgb * gray_w).sum(1, keepdim=True).expand_as(rgb) + (1 - g) * rgb
    return (rgb - mean) / std


def _hue_matrices(hue):
    """(n,) angles -> (n, 3, 3) RGB matrices that rotate chroma in YIQ space by each angle (CPU)."""
    cos, sin = hue.cos(), hue.sin()
    one, zero = torch.ones_like(hue), torch.zeros_like(hue)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    return _FROM_YIQ @ rot @ _TO_YIQ
