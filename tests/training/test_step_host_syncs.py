"""A training step creates no tensor from Python data and runs no linalg call on its device
(issue 31 item 3): on CUDA each is a host sync (a blocking copy of a Python list or a CPU tensor,
or linalg's info check). Recorded with a TorchDispatchMode around train_step after a warm-up
step; on CPU the step's device is the CPU, so anything built from Python data there counts."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.models.methods import build_method
from courier_fast.training.loop import _step_generator, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.lift.default}


class Recorder(TorchDispatchMode):
    """Ops that make a tensor from Python data, and linalg ops, whose output is on `device`."""

    def __init__(self, device):
        super().__init__()
        self.device, self.found = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)  # linalg's norms are plain reductions (F.normalize); the others check on the host
        flagged = func in FROM_PYTHON or ("linalg" in name and "vector_norm" not in name and "matrix_norm" not in name)
        if flagged:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.device == self.device for o in outs):
                self.found.append(str(func))
        return out


@pytest.mark.parametrize("method,micro_batch", [("courier", None), ("courier", 8), ("simclr", None),
                                                ("simclr", 8)])
def test_train_step_builds_nothing_from_python_data_on_its_device(world, method, micro_batch):
    data = load_dataset(world, tables=("pretrain",))
    loader = SessionLoader(data["items"], data["pretrain"], batch_size=8, seed=0, prefetch=0,
                           decoder=ImageDecoder(backend="pil"))
    torch.manual_seed(0)
    model = build_method(method, data["items"], encoder="test_efficientnet", embed_dim=16, batch_rows=8)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = loader.batches()
    from courier_fast._validate import input_checks
    with input_checks(False):  # as train() runs a step
        for step in range(2):
            batch = next(batches)
            if step == 1:
                with Recorder("cpu") as rec:
                    train_step(model, batch, _step_generator(0, step), optimizer, scaler,
                               encoder_micro_batch=micro_batch)
            else:  # warm-up: constants are built once per device
                train_step(model, batch, _step_generator(0, step), optimizer, scaler,
                           encoder_micro_batch=micro_batch)
    batches.close()
    assert rec.found == [], rec.found


def test_loader_pins_its_batches_for_cuda(world, tmp_path, monkeypatch):
    """make_loader on a GPU pins every CPU tensor of a batch (in the prefetch thread), so that
    train()'s batch.to(device, non_blocking=True) is asynchronous (pinning is emulated on CPU)."""
    from courier_fast.training.loop import TrainConfig, make_loader
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = load_dataset(world, tables=("pretrain",))
    cfg = TrainConfig(data=world, out=str(tmp_path), decoder="pil", batch_size=8, image_size=0)
    loader = make_loader(cfg, data, torch.device("cuda", 0))
    assert loader.pin_memory
    loader.decoder.device, loader.prefetch = torch.device("cpu"), 0  # decode here: no GPU
    batch = next(iter(loader))
    assert len(pinned) == 11 and pinned[0] == batch.images.shape  # every field of the batch
    assert not make_loader(cfg, data, torch.device("cpu")).pin_memory


def test_draw_parameters_move_as_one_packed_tensor(monkeypatch):
    """On a GPU an AugmentDraw's rows move in one copy of one packed (n, k) tensor and are split
    there (emulated: the copy to a pretend device returns the CPU rows), giving every parameter."""
    from courier_fast.models.augment import Augment
    draw = Augment.simclr().draw(10, torch.Generator().manual_seed(3))
    assert draw.params["hue_matrix"].shape == (10, 9)
    copies, to = [], torch.Tensor.to

    def to_pretend_gpu(self, *args, **kwargs):
        if args and args[0] == torch.device("meta"):
            copies.append((tuple(self.shape), kwargs.get("non_blocking")))
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_pretend_gpu)
    got = draw._on(torch.device("meta"), 2, 5)
    assert copies == [((5, sum(v[0].numel() for v in draw.params.values())), True)]
    assert got.keys() == draw.params.keys()
    for k, v in draw.params.items():
        assert torch.equal(got[k], v[2:7]), k
