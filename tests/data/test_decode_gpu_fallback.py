"""decoder="torchvision" on CUDA: PNG and CMYK JPEG, which the GPU decode_jpeg rejects, are
decoded on the CPU instead (emulated on CPU: decode_jpeg is replaced by a stand-in that rejects
what nvJPEG rejects and records what it was given)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from courier_fast.data.decode import ImageDecoder, gpu_decodable_jpeg


def _encode(mode, fmt, seed):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (rgb.convert(mode) if mode != "RGB" else rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def mixed():
    return [_encode("RGB", "JPEG", 0), _encode("RGB", "PNG", 1), _encode("CMYK", "JPEG", 2),
            _encode("L", "JPEG", 3), _encode("RGB", "JPEG", 4)]


def test_gpu_decodable_jpeg_tells_rgb_jpeg_from_png_and_cmyk(mixed):
    assert [gpu_decodable_jpeg(d) for d in mixed] == [True, False, False, True, True]
    assert not gpu_decodable_jpeg(b"\xff\xd8")  # truncated: the CPU decode reports it


def test_cuda_torchvision_decode_falls_back_to_cpu_for_png_and_cmyk(mixed, monkeypatch):
    import torchvision.io as tvio
    real, given = tvio.decode_jpeg, []

    def gpu_decode_jpeg(datas, mode, device):  # as on the GPU: a batch of RGB / grey JPEGs only
        for d in datas:
            if not gpu_decodable_jpeg(d.numpy().tobytes()):
                raise RuntimeError("nvjpeg: unsupported image")
        given.append(len(datas))
        return real(datas, mode=mode, device="cpu")

    monkeypatch.setattr(tvio, "decode_jpeg", gpu_decode_jpeg)
    got = ImageDecoder._torchvision_on_gpu(mixed, torch.device("cpu"))
    assert given == [3]  # one batched GPU call with the three plain JPEGs
    want = ImageDecoder(backend="torchvision")(mixed)
    for i, x in enumerate(got):
        assert torch.equal(x, want[i]), i
