"""courier_fast.data.ImageDecoder: backends agree, resize/crop/normalize, corrupt images."""
import io

import numpy as np
import pytest
import torch

from courier_fast.data import DecodeError, ImageDecoder, dali_available

CPU_BACKENDS = ["pil", "torchvision"] + (["dali"] if dali_available() else [])


def _jpeg(gen, w, h, quality=90, smooth=False):
    from PIL import Image
    if smooth:  # random colour gradients: resamplers may differ by a pixel without big errors
        c0, c1, c2 = (torch.rand(3, 3, generator=gen) * 255).unbind(0)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        arr = (c0 + (c1 - c0) * xx[..., None] + (c2 - c0) * yy[..., None] * 0.5).clamp(0, 255)
        arr = arr.to(torch.uint8).numpy()
    else:  # blocky noise: photo-like detail that JPEG keeps
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        arr = np.repeat(np.repeat(arr[::8, ::8], 8, 0), 8, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "pil"])
def test_backend_equals_pil_without_resize(gen, backend):
    images = [_jpeg(gen, 64, 48) for _ in range(3)]
    want = ImageDecoder(backend="pil")(images).int()
    got = ImageDecoder(backend=backend)(images).int()
    assert got.shape == want.shape == (3, 3, 48, 64) and got.dtype == torch.int32
    assert (got - want).abs().max() <= 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resize_shorter_side_and_centre_crop(gen, backend):
    images = [_jpeg(gen, 80, 50, smooth=True), _jpeg(gen, 50, 90, smooth=True)]
    out = ImageDecoder(backend=backend, size=32)(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    ref = ImageDecoder(backend="pil", size=32)(images).float()
    assert (out.float() - ref).abs().mean() < 3  # resamplers differ slightly between libraries


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_normalize_is_imagenet(gen, backend):
    images = [_jpeg(gen, 40, 40)]
    raw = ImageDecoder(backend=backend)(images).float() / 255
    out = ImageDecoder(backend=backend, normalize=True)(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (raw - mean) / std)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("corrupt", [b"not an image at all", "truncated"])
def test_corrupt_image_raises_with_index_and_item(gen, backend, corrupt):
    good = _jpeg(gen, 32, 32)
    bad = good[: len(good) // 3] if corrupt == "truncated" else corrupt
    with pytest.raises(DecodeError) as info:
        ImageDecoder(backend=backend)([good, bad, good], item_ids=[10, 11, 12])
    assert isinstance(info.value, ValueError)
    assert info.value.index == 1 and info.value.item_id == 11


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skip_mode_counts_and_keeps_the_rest(gen, backend):
    good = [_jpeg(gen, 32, 32) for _ in range(3)]
    dec = ImageDecoder(backend=backend, on_error="skip")
    out = dec([good[0], b"garbage", good[1], b"", good[2]])
    assert out.shape == (3, 3, 32, 32)
    assert dec.skipped == 2 and dec.last_skipped == [1, 3]
    torch.testing.assert_close(out, ImageDecoder(backend=backend)(good))
    assert dec(good).shape[0] == 3 and dec.skipped == 2 and dec.last_skipped == []


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_mixed_sizes_without_resize_is_an_error(gen, backend):
    with pytest.raises(ValueError, match=r"different sizes \(\(3, 32, 32\) and image 2's \(3, 32, 40\)\)"):
        ImageDecoder(backend=backend)([_jpeg(gen, 32, 32), _jpeg(gen, 32, 32), _jpeg(gen, 40, 32)])


_PEAK = """
import io, json, sys
import numpy as np
from PIL import Image
from courier_fast.data import ImageDecoder

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024

buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
images = [buf.getvalue()] * 8000
decoder = ImageDecoder(backend=sys.argv[1], size=32)
decoder(images[:8])  # imports and first-call allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss("VmRSS")
out = decoder(images)
print(json.dumps({"peak": rss("VmHWM") - before, "out": out.numel() / 2**20}))
"""


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_cpu_decode_peak_is_about_the_batch(backend):
    """A batch's decode holds about the batch, not a list of decoded images beside their stacked
    copy (twice the batch and more); peak RSS of a fresh process (VmHWM reset before the call)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK, backend], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["out"] == 8000 * 3 * 32 * 32 / 2**20
    assert r["peak"] < 1.4 * r["out"] + 4, r


@pytest.mark.parametrize("kwargs,msg", [({"backend": "opencv"}, "backend must be"),
                                        ({"size": 0}, "size must be"),
                                        ({"on_error": "ignore"}, "on_error must be"),
                                        ({"device": "tpu"}, "device"),
                                        ({"max_batch": 0}, "max_batch")])
def test_bad_arguments(kwargs, msg):
    with pytest.raises((ValueError, RuntimeError), match=msg):
        ImageDecoder(**kwargs)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="images is empty"):
        ImageDecoder(backend="pil")([])


def test_auto_prefers_dali_when_installed():
    assert ImageDecoder().backend == ("dali" if dali_available() else "pil")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_keeps_one_pipeline_for_any_batch_size(gen, monkeypatch):
    """Batches longer than max_batch are split, not given a pipeline of their own each."""
    from nvidia.dali import Pipeline
    builds = []
    build = Pipeline.build
    monkeypatch.setattr(Pipeline, "build", lambda self: builds.append(self) or build(self))
    pool = [_jpeg(gen, 24 + 8 * (i % 3), 24, smooth=True) for i in range(11)]
    dec = ImageDecoder(backend="dali", size=16, max_batch=4)
    for n in (3, 9, 5, 1, 11, 4):
        images = pool[:n]
        out = dec(images)
        assert out.shape == (n, 3, 16, 16)
        ref = ImageDecoder(backend="pil", size=16)(images).float()
        assert (out.float() - ref).abs().mean() < 3  # same images, same order across chunks
    assert len({id(p) for p in builds}) == 1  # build() is re-entered per run; one pipeline object


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_drops_a_pipeline_that_raised(gen):
    good = [_jpeg(gen, 32, 32) for _ in range(2)]
    dec = ImageDecoder(backend="dali", on_error="skip", max_batch=2)
    dec(good)
    first = dec._pipe
    assert dec([good[0], b"garbage", good[1]]).shape[0] == 2
    assert dec._pipe is not first  # the failed one was released, a fresh one decoded the rest


def test_cuda_without_index_is_pinned_to_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert ImageDecoder(backend="pil", device="cuda").device == torch.device("cuda", 1)
    assert ImageDecoder(backend="pil", device="cuda:2").device == torch.device("cuda", 2)
