"""ImageDecoder: a list of JPEG (or PNG) bytes -> one (B, 3, H, W) tensor on the device.

Backends: "dali" (NVIDIA DALI: `mixed` nvJPEG decode on a GPU, CPU-only pipeline with
device_id=None elsewhere), "torchvision" (torchvision.io.decode_image; decode_jpeg on the GPU
for device="cuda"), "pil" (Pillow). "auto" takes DALI when it is installed, else PIL.
size=None keeps the decoded size (all images must then agree); size=S resizes the shorter
side to S (bilinear, antialiased) and centre-crops S x S. normalize=True returns float32
ImageNet-normalised values, otherwise uint8. A corrupt or unreadable image raises
DecodeError (a ValueError) with .index (and .item_id when item ids are given), or, with
on_error="skip", is left out and counted in .skipped (indices of the last call in
.last_skipped).

DALI keeps one pipeline per decoder, built for `max_batch` images; a longer call is decoded in
chunks of at most `max_batch`, so memory stays bounded whatever the batch sizes (a pipeline per
distinct size would grow without end). A pipeline that raised is dropped and rebuilt. On a GPU
the decoded samples are copied out of DALI's buffers on a side stream, and before the next chunk's
run() the host waits for those copies alone (not for the work queued on the current stream). On a GPU
the decoder works on its own device (device="cuda" means the current device when it is made),
whatever thread calls it.
"""
import importlib.util
import io

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "pil", "torchvision")


_CONSTANTS: dict = {}  # (device, name) -> a constant tensor on that device, made once


def device_constant(name, values, device):
    """float32 tensor of `values` (a nested tuple) on `device`, made once per device and reused:
    torch.tensor(..., device=cuda) is a blocking host-to-device copy, a host sync at every call.
    Made outside inference mode (usable by autograd later); not cached while torch.compile
    traces (its fake tensors must not outlive the trace)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, name)
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.tensor(values, dtype=torch.float32, device=device)
        if torch.compiler.is_compiling():
            return t
        _CONSTANTS[key] = t
    return t


def imagenet_normalize(x):
    """uint8 images (..., 3, H, W) -> float32 ImageNet-normalised."""
    mean = device_constant("imagenet_mean", IMAGENET_MEAN, x.device).view(3, 1, 1)
    std = device_constant("imagenet_std", IMAGENET_STD, x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # frame headers


def gpu_decodable_jpeg(data):
    """Whether torchvision's GPU decode_jpeg takes these bytes: a JPEG whose frame header has 1
    or 3 components (not PNG, not a 4-component CMYK / YCCK JPEG). Reads the markers up to the
    frame header only."""
    b = bytes(data[:65536]) if not isinstance(data, bytes) else data
    if b[:2] != b"\xff\xd8":
        return False
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return False
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if marker in _SOF:
            return i + 9 < len(b) and b[i + 9] in (1, 3)
        i += 2 + length
    return False


class DecodeError(ValueError):
    """An image that could not be decoded: .index in the batch, .item_id when known."""

    def __init__(self, message, index, item_id=None):
        super().__init__(message)
        self.index, self.item_id = index, item_id


def dali_available():
    return importlib.util.find_spec("nvidia.dali") is not None


class ImageDecoder:
    def __init__(self, backend="auto", device="cpu", size=None, normalize=False, on_error="raise",
                 num_threads=2, max_batch=256):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is visible")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be None or a positive int, got {size!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # pin it: threads differ
        if backend == "auto":
            backend = "dali" if dali_available() else "pil"
        if backend == "dali" and not dali_available():
            raise ValueError("backend='dali' but nvidia-dali is not installed")
        self.backend, self.size, self.normalize, self.on_error = backend, size, normalize, on_error
        self.num_threads, self.max_batch = num_threads, max_batch
        self.skipped, self.last_skipped = 0, []
        self._pipe = None  # the DALI pipeline (batch_size = max_batch), built on first use
        self._copy_stream = None  # CUDA stream of the copies out of DALI's buffers (DALI on a GPU)

    def __repr__(self):
        return (f"ImageDecoder(backend={self.backend!r}, device={str(self.device)!r}, size={self.size}, "
                f"normalize={self.normalize}, on_error={self.on_error!r})")

    # ------------------------------------------------------------------ public
    def __call__(self, images, item_ids=None):
        """images: sequence of bytes-like; item_ids: optional ids, reported in DecodeError."""
        images = list(images)
        if not images:
            raise ValueError("images is empty")
        if item_ids is not None and len(item_ids) != len(images):
            raise ValueError(f"item_ids has {len(item_ids)} entries but images has {len(images)}")
        self.last_skipped = []
        decode = getattr(self, f"_decode_{self.backend}")
        try:
            return self._finish(decode(images))
        except Exception as exc:  # find out whether (and which) images are at fault
            self._pipe = None  # a DALI pipeline that raised is not reused (dropped: freed)
            bad = self._find_bad(images)
            if not bad:
                raise
            if self.on_error == "raise":
                i = bad[0]
                item = None if item_ids is None else int(item_ids[i])
                what = f" (item {item})" if item is not None else ""
                raise DecodeError(f"image {i}{what} could not be decoded ({len(bad)} bad in this batch)",
                                  i, item) from exc
        self.last_skipped = bad
        self.skipped += len(bad)
        dropped = set(bad)
        keep = [im for i, im in enumerate(images) if i not in dropped]
        return self._finish(decode(keep)) if keep else self._empty()

    # ------------------------------------------------------------------ helpers
    def _find_bad(self, images):
        """Indices of images Pillow cannot fully decode. Run only after a batch failed, so the
        fast path pays nothing; it gives DecodeError its index on every backend."""
        from PIL import Image
        bad = []
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(bytes(data))) as im:
                    im.load()
            except Exception:
                bad.append(i)
        return bad

    def _empty(self):
        s = self.size or 0
        dtype = torch.float32 if self.normalize else torch.uint8
        return torch.empty(0, 3, s, s, dtype=dtype, device=self.device)

    def _finish(self, x):
        """x: (B, 3, H, W) uint8 on the device."""
        return imagenet_normalize(x) if self.normalize else x

    def _stack(self, tensors, n=None):
        """(n, 3, H, W) from `tensors`, a sequence, or an iterable of n CHW tensors that is
        consumed one image at a time into the preallocated batch (PIL, DALI, torchvision on CPU:
        never a list of n decoded images beside their stacked copy)."""
        if n is None:
            tensors = list(tensors)
            n = len(tensors)
        out = None
        for i, t in enumerate(tensors):
            if out is None:
                out = torch.empty((n, *t.shape), dtype=t.dtype, device=t.device)
            elif t.shape != out.shape[1:]:
                raise ValueError(f"decoded images have different sizes ({tuple(out.shape[1:])} and image {i}'s "
                                 f"{tuple(t.shape)}); pass size= to resize")
            out[i] = t
        return out.to(self.device)

    def _resize_crop_chw(self, x):
        from torchvision.transforms.v2 import functional as TF
        if self.size is None:
            return x
        x = TF.resize(x, self.size, antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    # ------------------------------------------------------------------ backends
    def _decode_pil(self, images):
        return self._stack(self._pil_images(images), n=len(images))

    def _pil_images(self, images):
        import numpy as np
        from PIL import Image
        for data in images:
            with Image.open(io.BytesIO(bytes(data))) as im:
                im = im.convert("RGB")
                if self.size is not None:
                    w, h = im.size  # the long side as torchvision computes it: int(S * long / short)
                    nw = self.size if w <= h else int(self.size * w / h)
                    nh = self.size if h <= w else int(self.size * h / w)
                    im = im.resize((nw, nh), Image.BILINEAR)
                    left, top = (nw - self.size) // 2, (nh - self.size) // 2
                    im = im.crop((left, top, left + self.size, top + self.size))
                yield torch.from_numpy(np.array(im)).permute(2, 0, 1)  # a writable copy: from_numpy warns on read-only

    def _decode_torchvision(self, images):
        from torchvision.io import ImageReadMode, decode_image

        def data(d):
            return torch.frombuffer(bytearray(bytes(d)), dtype=torch.uint8)

        if self.device.type == "cuda":
            return self._stack([self._resize_crop_chw(x) for x in self._torchvision_on_gpu(images, self.device)])
        return self._stack((self._resize_crop_chw(decode_image(data(d), mode=ImageReadMode.RGB)) for d in images),
                           n=len(images))

    @staticmethod
    def _torchvision_on_gpu(images, device):
        """Each image's decoded CHW uint8 tensor on `device`, in order: the JPEGs nvJPEG takes
        (decode_jpeg on the GPU, one batched call), and the others (PNG, CMYK / YCCK JPEG, which
        decode_jpeg on the GPU rejects) decoded on the CPU and copied over."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        def data(d):
            return torch.frombuffer(bytearray(bytes(d)), dtype=torch.uint8)

        on_gpu = [i for i, d in enumerate(images) if gpu_decodable_jpeg(d)]
        out = [None] * len(images)
        if on_gpu:
            decoded = decode_jpeg([data(images[i]) for i in on_gpu], mode=ImageReadMode.RGB, device=device)
            for i, x in zip(on_gpu, decoded):
                out[i] = x
        for i, d in enumerate(images):
            if out[i] is None:
                out[i] = decode_image(data(d), mode=ImageReadMode.RGB).to(device)
        return out

    def _build_dali_pipe(self):
        """A DALI pipeline for up to max_batch images on this decoder's device."""
        from nvidia.dali import fn, pipeline_def, types
        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device.index if gpu else None, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if self.size is not None:
                img = fn.resize(img, resize_shorter=self.size, antialias=True)
                img = fn.crop(img, crop=(self.size, self.size))
            return img

        p = pipe()
        p.build()
        return p

    def _decode_dali(self, images):
        """Chunks of at most max_batch images through the one pipeline -> (B, 3, H, W) uint8."""
        return self._stack(self._dali_images(images), n=len(images))

    def _dali_images(self, images):
        """Each image's CHW tensor, decoded max_batch at a time (consumed one by one into the batch)."""
        import numpy as np
        if self._pipe is None:
            self._pipe = self._build_dali_pipe()
        copied = None  # the event after the last chunk's copies out of DALI's buffers
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            if copied is not None:
                copied.synchronize()  # run() may reuse the buffers: wait for those copies alone
            self._pipe.feed_input("encoded", [np.frombuffer(bytes(d), dtype=np.uint8) for d in chunk])
            (out,) = self._pipe.run()
            if self.device.type == "cuda":
                # copy the decoded samples on a side stream: waiting for them before the next run()
                # does not wait for the training work queued on the current stream (a host sync)
                from nvidia.dali.plugin.pytorch import feed_ndarray
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(self.device)
                side, current = self._copy_stream, torch.cuda.current_stream(self.device)
                samples = []
                with torch.cuda.stream(side):  # allocated for the side stream: no reuse race with `current`
                    for i in range(len(chunk)):
                        t = torch.empty(out[i].shape(), dtype=torch.uint8, device=self.device)
                        feed_ndarray(out[i], t, cuda_stream=side)
                        samples.append(t)
                copied = side.record_event()
                current.wait_event(copied)  # the batch's copies (on `current`) come after, on the GPU
                for t in samples:
                    t.record_stream(current)  # used on `current` too: freed only once that is done
                    yield t.permute(2, 0, 1)
            elif out.is_dense_tensor():  # one (m, H, W, 3) array: no small allocation per image
                for hwc in torch.from_numpy(out.as_array()):
                    yield hwc.permute(2, 0, 1)
            else:
                for i in range(len(chunk)):
                    yield torch.from_numpy(np.array(out[i])).permute(2, 0, 1)
