"""courier_fast.models.checkpoint: weights-only loading, encoder-only export, embed rebuilding only the
encoder, and `pretrained` weights that must fit the backbone."""
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from courier_fast.models.checkpoint import (ENCODER_FILE, export_encoder, load_checkpoint, load_encoder,
                                     save_checkpoint)
from courier_fast.data.format import write_table
from courier_fast.pipeline.embed import embed_checkpoint
from courier_fast.models.encoder import ImageEncoder
from courier_fast.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"encoder": "test_efficientnet", "embed_dim": 16, "batch_size": 8, "progress": False, "image_size": 0}


def _run(world, out, **kw):
    return train(TrainConfig(data=world, out=str(out), steps=1, lr=1e-2, **{**SMALL, **kw}))["checkpoint"]


@pytest.fixture(scope="module")
def clip_run(world, tmp_path_factory):
    return _run(world, tmp_path_factory.mktemp("clip"), method="clip_titles")


def test_encoder_file_holds_the_encoder_alone_and_embeds_the_same(world, clip_run):
    path = os.path.join(os.path.dirname(clip_run), ENCODER_FILE)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)  # no words, text head
    a = embed_checkpoint(clip_run, world, clusters=0)
    b = embed_checkpoint(path, world, clusters=0)
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-6, atol=1e-6)


def test_embed_does_not_rebuild_the_vocabulary_from_the_current_catalogue(world, clip_run, tmp_path):
    """A catalogue with other titles and more categories: the old embed rebuilt ClipTitlesMethod
    from it and failed on the word table's size; only the encoder matters for embeddings."""
    other = tmp_path / "catalogue"
    shutil.copytree(world, other)
    items = pq.read_table(other / "items.parquet")
    n = items.num_rows
    items = items.set_column(items.schema.get_field_index("title"), "title",
                             [[f"brand-new words {i} {i * 7}" for i in range(n)]])
    items = items.set_column(items.schema.get_field_index("category"), "category",
                             [list(np.arange(n) % 97)])
    write_table(items, str(other / "items.parquet"))
    want = embed_checkpoint(clip_run, world, clusters=0)
    got = embed_checkpoint(clip_run, str(other), clusters=0)
    np.testing.assert_allclose(got.vectors, want.vectors, rtol=1e-6, atol=1e-6)  # same images


def test_embed_needs_no_pretrained_backbone_file(world, tmp_path):
    weights = tmp_path / "backbone.pt"
    torch.save(ImageEncoder("test_efficientnet", 16).backbone.state_dict(), weights)
    ckpt = _run(world, tmp_path / "run", pretrained=str(weights))
    os.remove(weights)  # e.g. embedding on another machine
    emb = embed_checkpoint(ckpt, world, clusters=0)
    assert emb.vectors.shape == (60, 16)


def test_export_encoder_from_a_checkpoint(world, clip_run, tmp_path):
    out = export_encoder(clip_run, str(tmp_path / "enc.safetensors"))
    encoder, size = load_encoder(out)
    assert isinstance(encoder, ImageEncoder) and not encoder.training and size is None
    ref, _ = load_encoder(clip_run)
    for (k, v), (k2, v2) in zip(encoder.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_checkpoint_loads_weights_only(tmp_path):
    """A checkpoint that needs arbitrary unpickling (code could run) is refused, naming the file."""
    path = str(tmp_path / "evil.pt")
    save_checkpoint({"method": "courier", "model": {}, "payload": os.system}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)
    save_checkpoint({"method": "courier", "model": {"w": torch.ones(2)}, "step": 3}, str(tmp_path / "ok.pt"))
    assert load_checkpoint(str(tmp_path / "ok.pt"))["step"] == 3


# ----------------------------------------------------------------------------- pretrained=
@pytest.fixture
def backbone_state():
    return ImageEncoder("test_efficientnet", 16).backbone.state_dict()


def test_pretrained_full_match_loads_and_ignores_classifier_keys(tmp_path, backbone_state):
    from safetensors.torch import save_file
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in backbone_state.items()}
    path = tmp_path / "w.safetensors"
    save_file({**state, "classifier.weight": torch.zeros(10, 3)}, str(path))
    enc = ImageEncoder("test_efficientnet", 16, pretrained=str(path))
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_pretrained_partial_match_names_the_missing_keys(tmp_path, backbone_state):
    dropped = [k for k in backbone_state if k.endswith("weight")][:2]
    state = {k: v for k, v in backbone_state.items() if k not in dropped}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing") as info:
        ImageEncoder("test_efficientnet", 16, pretrained=str(tmp_path / "partial.pt"))
    for k in dropped:
        assert k in str(info.value)


def test_pretrained_shape_mismatch_is_named(tmp_path, backbone_state):
    key = next(k for k, v in backbone_state.items() if v.dim() == 4)
    state = dict(backbone_state)
    state[key] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" \(1, 1, 1, 1\)"):
        ImageEncoder("test_efficientnet", 16, pretrained=str(tmp_path / "shape.pt"))


def test_pretrained_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ImageEncoder("test_efficientnet", 16, pretrained=str(tmp_path / "nope.pt"))


def test_checkpoint_without_encoder_entry_still_loads(world, clip_run, tmp_path):
    """Checkpoints written before the "encoder" entry: rebuilt from their method_kwargs."""
    ckpt = load_checkpoint(clip_run)
    del ckpt["encoder"]
    old = str(tmp_path / "old.pt")
    save_checkpoint(ckpt, old)
    a, _ = load_encoder(old)
    b, _ = load_encoder(clip_run)
    assert a.config == b.config
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
