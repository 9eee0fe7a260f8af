"""CourierModel, candidate_mask, the pre-training methods and Augment on a tiny generated world."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from courier_fast.models.augment import Augment, AugmentDraw
from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.models.methods import METHODS, build_method
from courier_fast.models.courier import QUERIES, CourierModel, candidate_mask

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"encoder": "test_efficientnet", "embed_dim": 32, "num_heads": 4}


@pytest.fixture(scope="module")
def world(world):
    """The shared tiny world (conftest), loaded; "root" is its directory."""
    return {**load_dataset(world, tables=("pretrain",)), "root": world}


@pytest.fixture
def batch(world, seed):
    """8 random request rows (a fresh draw per test; at least one click and one history anchor)."""
    loader = SessionLoader(world["items"], world["pretrain"], batch_size=8, prefetch=0,
                           decoder=ImageDecoder(backend="pil"))
    rng = np.random.default_rng(seed)
    while True:
        b = loader.make_batch(rng.choice(loader.num_rows, 8, replace=False))
        if b.clicks.sum() > 0 and ((~b.history_pad).sum(1) > 1).any():
            return b


# ----------------------------------------------------------------------------- candidate_mask
def _candidates_loop(index, anchor, valid):
    """Python statement of candidate_mask's rule."""
    index, anchor, valid = index.tolist(), anchor.tolist(), valid.tolist()
    anchored = {i for i, a in zip(index, anchor) if a}
    seen, keep = set(), []
    for i, a, v in zip(index, anchor, valid):
        keep.append(bool(v and (a or (i not in anchored and i not in seen))))
        seen.add(i)
    return keep


def test_candidate_mask_hand_made():
    #              0  1  2  3  4  5  6  7  8
    index = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 4])
    anchor = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    keep = candidate_mask(index, anchor, valid)
    # item 0: both anchor slots (2, 6), not its first un-anchored slot 0; item 1: first slot 1;
    # item 2: slot 3; item 3: invalid; item 4: first slot 7 only
    expected = [False, True, True, True, False, False, True, True, False]
    assert keep.tolist() == expected


def test_candidate_mask_invariants_random():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for _ in range(50):
        k = int(torch.randint(1, 40, (), generator=g))
        n_items = int(torch.randint(1, 12, (), generator=g))
        pad = n_items  # as in a SessionBatch: every padding slot indexes one extra row
        index = torch.randint(0, n_items, (k,), generator=g)
        valid = torch.rand(k, generator=g) < 0.8
        index = torch.where(valid, index, pad)
        anchor = valid & (torch.rand(k, generator=g) < 0.3)
        keep = candidate_mask(index, anchor, valid)
        assert keep.dtype == torch.bool and keep.shape == (k,)
        assert keep.tolist() == _candidates_loop(index, anchor, valid)
        assert not (keep & ~valid).any()
        assert (keep[anchor]).all()
        anchored = set(index[anchor].tolist())
        for item in set(index[valid].tolist()):
            slots = (index == item) & valid
            if item in anchored:  # exactly its anchor slots
                assert torch.equal(keep & slots, anchor & slots)
            else:  # exactly once: the first slot
                assert int((keep & slots).sum()) == 1 and bool(keep[int(slots.nonzero()[0])])


def test_candidate_mask_arbitrary_validity_never_keeps_invalid():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    index = torch.randint(0, 5, (64,), generator=g)
    valid = torch.rand(64, generator=g) < 0.5
    anchor = torch.rand(64, generator=g) < 0.3
    keep = candidate_mask(index, anchor, valid)
    assert not (keep & ~valid).any()
    assert keep[anchor & valid].all()
    assert candidate_mask(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                          torch.zeros(0, dtype=torch.bool)).shape == (0,)


# ----------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("query", QUERIES)
def test_forward_backward_finite(query, batch):
    model = CourierModel(query=query, **SMALL)
    out = model(batch)
    assert set(out) == {"contrastive", "history", "ctr", "loss"}
    for k, v in out.items():
        assert v.dim() == 0 and torch.isfinite(v), (k, v)
    torch.testing.assert_close(out["loss"], out["contrastive"] + out["history"] + out["ctr"])
    out["loss"].backward()
    for part in (model.encoder.backbone, model.encoder.head, model.attention, model.ctr_head):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads, type(part).__name__
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), type(part).__name__


def test_queries_learned_ignore_the_target():
    model = CourierModel(query="learned", **SMALL)
    cat = torch.randint(0, 8, (2, 5))
    q1 = model.queries(torch.randn(2, 5, 32), cat)
    q2 = model.queries(torch.randn(2, 5, 32), torch.randint(0, 8, (2, 5)))
    assert torch.equal(q1, q2)
    assert torch.equal(q1[0, 0], q1[1, 3])


def test_queries_target_depend_on_category_only():
    model = CourierModel(query="target", **SMALL)
    torch.nn.init.normal_(model.category_query.weight)  # zero-initialised: make categories differ
    cat = torch.tensor([[3, 5, 3, 7], [5, 3, 7, 7]])
    q1 = model.queries(torch.randn(2, 4, 32), cat)
    q2 = model.queries(torch.randn(2, 4, 32), cat)
    assert torch.equal(q1, q2)
    assert torch.equal(q1[0, 0], q1[0, 2]) and torch.equal(q1[0, 0], q1[1, 1])
    assert torch.equal(q1[0, 1], q1[1, 0]) and torch.equal(q1[0, 3], q1[1, 2])
    assert not torch.allclose(q1[0, 0], q1[0, 1]) and not torch.allclose(q1[0, 1], q1[0, 3])


def test_queries_target_image_are_the_embeddings():
    model = CourierModel(query="target_image", **SMALL)
    emb = torch.randn(2, 4, 32)
    assert torch.equal(model.queries(emb, torch.randint(0, 8, (2, 4))), emb)


# ----------------------------------------------------------------------------- float64 reference
def _infonce64(anchors, cands, anchor, keep, temperature, logq=None):
    """Dense InfoNCE: mean over anchors of -log softmax over the kept candidates at the positive;
    keep (K,) per candidate or (K, K) per anchor and candidate; logq (K,) subtracted per candidate."""
    a = F.normalize(anchors.double(), dim=-1)
    c = F.normalize(cands.double(), dim=-1)
    logits = a @ c.T / temperature
    if logq is not None:
        logits = logits - logq.double()[None, :]
    lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=-1)
    terms = lse - logits.diagonal()
    return terms[anchor].mean()


def _loop_keep(index, anchor, valid):
    return torch.tensor(_candidates_loop(index, anchor, valid))


def _ids_keep(ids, valid):
    """(K, K): candidate i is in anchor j's denominator when valid and not another slot of j's item."""
    ids = ids.reshape(-1)
    return valid.reshape(-1)[None, :] & ((ids[:, None] != ids[None, :]) | torch.eye(ids.numel(), dtype=torch.bool))


@pytest.mark.parametrize("query,candidate_ids,logq", [("target", True, False), ("learned", True, False),
                                                      ("learned", False, False), ("learned", True, True)])
def test_losses_match_float64_reference(query, candidate_ids, logq, batch):
    """candidate_ids=True: every valid slot is a candidate, the other slots of an anchor's item
    leave its denominator; False: the in-rank rule (candidate_mask). logq: the page-view loss
    subtracts each candidate's log frequency (a table with one id missing: it gets the floor)."""
    table = None
    if logq:
        ids = torch.unique(batch.pv_ids[batch.pv_ids >= 0])[1:]  # the smallest id is left out of the table
        table = (ids, torch.randn(ids.numel()).log_softmax(0))
    model = CourierModel(query=query, candidate_ids=candidate_ids, item_logq=table, **SMALL)
    if model.category_query is not None:
        torch.nn.init.normal_(model.category_query.weight)
    model.eval()  # BatchNorm on running statistics: embed_batch and forward see the same encoder
    with torch.no_grad():
        out = model(batch)
        emb = model.embed_batch(batch)
        d = emb.shape[1]
        e, h = emb[batch.pv_index], emb[batch.history_index]
        valid, hvalid = ~batch.pv_pad, ~batch.history_pad
        r = model.attention(model.queries(e, batch.pv_category), h, key_padding_mask=batch.history_pad)
        rh = model.attention(model.queries(h, batch.history_category), h, key_padding_mask=batch.history_pad,
                             causal=True)
        logits = model.ctr_head(torch.cat([r, e], -1)).squeeze(-1)

    clicked = (batch.clicks > 0) & valid
    if candidate_ids:
        keep = _ids_keep(batch.pv_ids, valid)
    else:
        keep = _loop_keep(batch.pv_index.reshape(-1), clicked.reshape(-1), valid.reshape(-1))
    q = None
    if logq:
        lookup = dict(zip(table[0].tolist(), table[1].tolist()))
        q = torch.tensor([lookup.get(i, table[1].min().item()) for i in batch.pv_ids.reshape(-1).tolist()])
    ref = _infonce64(r.reshape(-1, d), e.reshape(-1, d), clicked.reshape(-1), keep, model.infonce.temperature, q)
    torch.testing.assert_close(out["contrastive"].double(), ref, rtol=1e-4, atol=1e-5)

    # history: position t (valid, with a valid earlier position) reconstructed from positions < t
    anchor = hvalid & (torch.cumsum(hvalid.int(), 1) > 1)
    if candidate_ids:
        hkeep = _ids_keep(batch.history_ids, hvalid)
    else:
        hkeep = _loop_keep(batch.history_index.reshape(-1), anchor.reshape(-1), hvalid.reshape(-1))
    href = _infonce64(rh.reshape(-1, d), h.reshape(-1, d), anchor.reshape(-1), hkeep, model.infonce.temperature)
    torch.testing.assert_close(out["history"].double(), href, rtol=1e-4, atol=1e-5)

    ctr = F.binary_cross_entropy_with_logits(logits[valid].double(), batch.clicks[valid].double())
    torch.testing.assert_close(out["ctr"].double(), ctr, rtol=1e-4, atol=1e-6)


def test_batches_repeat_items_so_the_ids_matter(world):
    """The tiny world's batches show items in several rows (what accidental hits are): otherwise
    the candidate_ids cases above could not tell the two rules apart."""
    loader = SessionLoader(world["items"], world["pretrain"], batch_size=8, prefetch=0,
                           decoder=ImageDecoder(backend="pil"))
    b = loader.make_batch(np.arange(8))
    ids = b.pv_ids[b.pv_ids >= 0]
    assert torch.unique(ids).numel() < ids.numel()


def test_item_logq_is_checked():
    with pytest.raises(ValueError, match="item_logq"):
        CourierModel(item_logq=(torch.tensor([3, 1]), torch.tensor([-1.0, -2.0])), **SMALL)
    with pytest.raises(ValueError, match="item_logq"):
        CourierModel(item_logq=(torch.tensor([1, 3]), torch.tensor([-1.0])), **SMALL)
    with pytest.raises(TypeError, match="candidate_ids"):
        CourierModel(candidate_ids=1, **SMALL)
    model = CourierModel(item_logq=(torch.tensor([1, 3]), torch.tensor([-1.0, -2.0])), **SMALL)
    assert "logq_ids" not in model.state_dict()  # derived from the data, not saved


# ----------------------------------------------------------------------------- weights, arguments
def test_loss_weights(batch):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = CourierModel(history_weight=0, **SMALL).eval()
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"contrastive", "ctr", "loss"}
    torch.testing.assert_close(out["loss"], out["contrastive"] + out["ctr"])

    model = CourierModel(ctr_weight=0, contrastive_weight=2.0, **SMALL).eval()
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"contrastive", "history", "loss"}
    torch.testing.assert_close(out["loss"], 2 * out["contrastive"] + out["history"])


@pytest.mark.parametrize("kwargs,word", [
    ({"query": "bogus"}, "query"),
    ({"encoder": "no_such_model"}, "encoder"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"batch_rows": 0}, "batch_rows"),
])
def test_invalid_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        CourierModel(**{**SMALL, **kwargs})
    with pytest.raises(TypeError, match="batch_rows"):
        CourierModel(**SMALL, batch_rows=8.0)


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", [m for m in METHODS if m != "random_encoder"])
def test_methods_train_a_step(name, world, batch):
    method = build_method(name, world["items"], encoder="test_efficientnet", embed_dim=32)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    out = method(batch, g)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    out["loss"].backward()
    grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(x).all() for x in grads)
    assert any(x.abs().sum() > 0 for x in grads)
    u = batch.images.shape[0]
    assert method.images_per_step(batch) == (2 * u if name == "simclr" else u)


@pytest.mark.parametrize("name", ["courier", "simclr", "clip_titles"])
def test_batch_rows_sets_the_gather_capacity(name, world, batch, monkeypatch):
    """batch_rows (train() passes batch_size) gives each contrastive loss its gather capacity,
    batch_rows x the slots of a row (courier: page-view, then history slots; the others: both, the
    most distinct items a batch holds), leaves the loss unchanged and caps the batch's rows."""
    import courier_fast.models.methods as methods_module
    import courier_fast.nn.loss as nn_module

    calls = []
    for module in (methods_module, nn_module):
        real = module.contrastive_loss

        def recording(anchors, candidates, _real=real, **kw):
            calls.append((kw["capacity"], anchors.shape[0]))
            return _real(anchors, candidates, **kw)

        monkeypatch.setattr(module, "contrastive_loss", recording)
    losses = {}
    for batch_rows in (None, 8):
        torch.manual_seed(0)
        method = build_method(name, world["items"], encoder="test_efficientnet", embed_dim=32, batch_rows=batch_rows)
        losses[batch_rows] = method(batch, torch.Generator().manual_seed(1))["loss"]
    pv, hist = batch.pv_index.shape[1], batch.history_index.shape[1]
    want = [8 * pv, 8 * hist] if name == "courier" else [8 * (pv + hist)]
    assert [c for c, _ in calls] == [None] * len(want) + want
    assert all(c is None or c >= rows for c, rows in calls)
    assert torch.equal(losses[None], losses[8])
    with pytest.raises(ValueError, match="batch_rows=7"):
        build_method(name, world["items"], encoder="test_efficientnet", embed_dim=32, batch_rows=7)(batch)


def test_random_encoder_is_not_trainable(world, batch):
    method = build_method("random_encoder", world["items"], encoder="test_efficientnet", embed_dim=32)
    assert method.images_per_step(batch) == 0
    with pytest.raises(RuntimeError):
        method(batch)
    assert method.encoder(batch.images).shape == (batch.images.shape[0], 32)


def test_build_method_unknown_name():
    with pytest.raises(ValueError, match="method"):
        build_method("nope")


# ----------------------------------------------------------------------------- Augment
@pytest.mark.parametrize("make", [Augment.light, Augment.simclr])
def test_augment_reproducible_from_generator(make):
    x = torch.randn(6, 3, 16, 16)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    aug = make()
    a = aug(x, torch.Generator().manual_seed(seed))
    b = aug(x, torch.Generator().manual_seed(seed))
    c = aug(x, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_augment_keeps_shape_and_dtype(dtype):
    x = torch.randn(3, 3, 12, 12).to(dtype)
    y = Augment.simclr()(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype
    assert Augment.light()(x[:0]).shape == (0, 3, 12, 12)


def test_augment_full_crop_without_flip_is_identity():
    x = torch.randn(8, 3, 16, 16)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    y = Augment(crop_scale=(1.0, 1.0), flip=False)(x, g)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [Augment.light, Augment.simclr])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_draw_in_chunks_is_the_whole_call(make, dtype, seed):
    """Drawing first and augmenting row ranges gives the one-call result bit for bit, and leaves
    the generator where the call leaves it; two draws joined are two calls."""
    rng = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=rng))
    x = torch.randn(n, 3, 10, 10, generator=rng, dtype=dtype)
    whole, after = make()(x, torch.Generator().manual_seed(seed)), torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    draw = make().draw(n, g)
    cuts = sorted({0, n, *torch.randint(0, n + 1, (3,), generator=rng).tolist()})
    parts = [draw(x[a:b], a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole) and len(draw) == n
    make()(x, after)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=after))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    both = AugmentDraw.cat([make().draw(n, g1), make().draw(0, g1), make().draw(n, g1)])
    want = torch.cat([make()(x, g2), make()(x, g2)])
    assert torch.equal(both(torch.cat([x, x])), want)
    with pytest.raises(ValueError, match="images: rows"):
        draw(torch.cat([x, x[:1]]), 0)  # one row more than drawn (x[:2] at n - 1 fits when n == 1)


def test_augment_rejects_bad_crop_scale():
    for scale in ((0.0, 1.0), (0.8, 0.5), (0.5, 1.5)):
        with pytest.raises(ValueError, match="crop_scale"):
            Augment(crop_scale=scale)


def test_loss_weights_are_validated_and_unused_heads_are_not_built():
    with pytest.raises(ValueError, match="loss weights"):
        CourierModel(contrastive_weight=-1.0, **SMALL)
    with pytest.raises(ValueError, match="loss weights"):
        CourierModel(contrastive_weight=0.0, history_weight=0.0, ctr_weight=0.0, **SMALL)
    assert CourierModel(ctr_weight=0.0, **SMALL).ctr_head is None
    frozen = CourierModel(query="target_image", **SMALL)
    assert not frozen.base_query.requires_grad  # unused there: DDP must not wait for its gradient


# ----------------------------------------------------------------------------- logQ from the data
def test_item_log_frequencies_count_page_view_slots(world):
    from courier_fast.training.loop import item_log_frequencies

    ids, logq = item_log_frequencies(world["pretrain"])
    shown = [i for row in world["pretrain"].column("pv_items").to_pylist() for i in row]
    want = {i: np.log(shown.count(i) / len(shown)) for i in set(shown)}
    assert ids.tolist() == sorted(want) and ids.dtype == torch.int64 and logq.dtype == torch.float32
    np.testing.assert_allclose(logq.numpy(), [want[i] for i in ids.tolist()], rtol=1e-6)


def test_train_with_logq(tmp_path, world):
    """TrainConfig(logq=True) (courier-fast train --logq) trains COURIER with the page-view
    frequencies; another method with it is a ValueError naming logq."""
    from courier_fast.training.loop import TrainConfig, train

    kw = dict(data=world["root"], encoder="test_efficientnet", embed_dim=16, batch_size=4, image_size=0, steps=2,
              progress=False, decoder="pil")
    summary = train(TrainConfig(out=str(tmp_path / "logq"), logq=True, **kw))
    assert summary["step"] == 2 and np.isfinite(summary["last"]["contrastive"])
    with pytest.raises(ValueError, match="logq"):
        TrainConfig(out=str(tmp_path / "x"), method="simclr", logq=True, **kw).validate()
