"""Batched image augmentation on tensors (any device), reproducible from a torch.Generator.

Augment(images (n, 3, S, S) float, ImageNet-normalised, generator) -> same shape: a random
resized crop (area fraction in `crop_scale`, aspect in [3/4, 4/3], one affine grid_sample for
the whole batch), a horizontal flip with probability 1/2, and optional colour jitter
(brightness, contrast, saturation, a hue rotation in YIQ space) and grayscale. Random numbers
are drawn on the CPU generator, so a run is the same on any device and after a resume.
"""
import math

import torch
import torch.nn.functional as F

from courier_fast.data.decode import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize


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
        n, dev = images.shape[0], images.device
        if n == 0:
            return images

        def uniform(lo, hi, size=(n,)):
            return (torch.rand(size, generator=generator) * (hi - lo) + lo).to(dev)

        area = uniform(*self.crop_scale)
        ratio = uniform(math.log(3 / 4), math.log(4 / 3)).exp()
        ratio = torch.minimum(torch.maximum(ratio, area), 1 / area)  # both sides <= 1, area exact
        sx, sy = (area * ratio).sqrt(), (area / ratio).sqrt()
        cx = (uniform(-1, 1) * (1 - sx))
        cy = (uniform(-1, 1) * (1 - sy))
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n, device=dev)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = sy, cy
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.brightness or self.contrast or self.saturation or self.hue or self.grayscale:
            out = self._colour(out, n, dev, uniform)
        return out.to(images.dtype)

    def _colour(self, x, n, dev, uniform):
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        rgb = x * std + mean
        on = (uniform(0, 1) < self.jitter_p).float().view(n, 1, 1, 1)
        gray_w = torch.tensor((0.299, 0.587, 0.114), device=dev).view(1, 3, 1, 1)
        jit = rgb * uniform(1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)
        gray = (jit * gray_w).sum(1, keepdim=True)
        c = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
        jit = (jit - gray.mean((2, 3), keepdim=True)) * c + gray.mean((2, 3), keepdim=True)
        gray = (jit * gray_w).sum(1, keepdim=True)
        s = uniform(1 - self.saturation, 1 + self.saturation).view(n, 1, 1, 1)
        jit = (jit - gray) * s + gray
        if self.hue:  # rotate chroma in YIQ by up to hue * 360 degrees
            angle = uniform(-self.hue, self.hue) * 2 * math.pi
            to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
            cos, sin = angle.cos(), angle.sin()
            rot = torch.zeros(n, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (n, 3, 3)
            jit = torch.einsum("nij,njhw->nihw", m, jit)
        rgb = on * jit.clamp(0, 1) + (1 - on) * rgb
        if self.grayscale:
            g = (uniform(0, 1) < self.grayscale).float().view(n, 1, 1, 1)
            rgb = g * (rgb * gray_w).sum(1, keepdim=True).expand_as(rgb) + (1 - g) * rgb
        return (rgb - mean) / std
