"""Training on a CUDA GPU (issue 31 item 7), run by bench/gpu_session.py's pytest_train_cuda step;
skipped without a GPU. UNRUN: no GPU has run these yet.

* one train_step (bf16 autocast, gradient clipping; plain and micro-batched) under
  torch.cuda.set_sync_debug_mode("error"): a hidden host sync raises, naming the op;
* GradCache's gradients equal the plain step's with dropout and drop path (the RNG replay on the
  GPU's Philox generator);
* a tiny train() + resume on the GPU with deterministic=True equals the uninterrupted run."""
import copy
import dataclasses

import pytest
import torch

from courier_fast._validate import input_checks
from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.data.decode import imagenet_normalize
from courier_fast.models.methods import build_method
from courier_fast.training.loop import TrainConfig, _step_generator, load_checkpoint, train, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("one_thread")]

VIT = {"encoder": "test_vit", "embed_dim": 16, "img_size": 16, "patch_size": 4}
DROPOUT = {"drop_path_rate": 0.3, "proj_drop_rate": 0.3, "pos_drop_rate": 0.2}


def _batch(world, float_images=False):
    data = load_dataset(world, tables=("pretrain",))
    loader = SessionLoader(data["items"], data["pretrain"], batch_size=8, seed=0, prefetch=0,
                           decoder=ImageDecoder(backend="pil"), pin_memory=True)
    batch = next(iter(loader.batches()))
    if float_images:
        batch = dataclasses.replace(batch, images=imagenet_normalize(batch.images))
    return data["items"], batch.to("cuda", non_blocking=True)


@pytest.mark.parametrize("micro_batch", [None, 7])
def test_train_step_makes_no_host_sync(world, micro_batch):
    items, batch = _batch(world)
    torch.manual_seed(0)
    model = build_method("courier", items, **VIT, **DROPOUT, batch_rows=8).cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with input_checks(False):
        for step in range(3):  # warm-up: self-check, constants, cuDNN / cuBLAS handles, optimizer state
            if step == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                train_step(model, batch, _step_generator(0, step), optimizer, scaler, torch.bfloat16,
                           grad_clip=1.0, encoder_micro_batch=micro_batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _grads(method, batch, micro_batch, seed=1):
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    with input_checks(False):
        train_step(method, batch, torch.Generator().manual_seed(5), optimizer,
                   torch.amp.GradScaler("cuda", enabled=False), None, encoder_micro_batch=micro_batch)
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_grad_cache_equals_the_plain_step_with_drop_path(world):
    from courier_fast.training.grad_cache import chunk_sizes
    items, batch = _batch(world, float_images=True)
    torch.manual_seed(0)
    method = build_method("courier", items, **VIT, **DROPOUT, backend="reference", num_heads=2).cuda()
    plain = copy.deepcopy(method)  # the encoder run chunk by chunk with a graph: the same masks
    forward = plain.encoder.forward
    plain.encoder.forward = lambda x: torch.cat([forward(c) for c in x.split(chunk_sizes(len(x), 7))])
    want = _grads(plain, batch, None)
    got = _grads(copy.deepcopy(method), batch, 7)
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-4 * float(g.abs().max()), msg=name)


def test_tiny_train_and_resume_equal_the_uninterrupted_run(world, tmp_path):
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    cfg = dict(data=world, device="cuda", deterministic=True, log_every=1, checkpoint_every=3, lr=1e-3,
               batch_size=8, image_size=0, progress=False, decoder="pil", embed_dim=16, encoder="test_vit",
               method_options={"drop_path_rate": 0.3})
    try:
        ref = train(TrainConfig(out=str(tmp_path / "ref"), steps=6, **cfg))
        train(TrainConfig(out=str(tmp_path / "run"), steps=3, **cfg))
        got = train(TrainConfig(out=str(tmp_path / "run"), steps=6, resume=True, **cfg))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2])
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(got["checkpoint"])
    assert b["rng"][0]["cuda"] is not None
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
