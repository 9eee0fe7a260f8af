"""Catalogue-scale embedding: parts + manifest equal the in-memory embedding, resume after a kill
(in process and SIGKILL), refuse another plan, 2 gloo ranks, eval on the parts; k-means backends."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch.multiprocessing as mp

from courier_fast import cluster
from courier_fast.catalogue import embed_catalogue
from courier_fast.embed import ItemEmbeddings, embed, embed_checkpoint
from courier_fast.evaluate import evaluate
from courier_fast.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["sklearn"] + (["faiss"] if cluster.faiss_available() else [])


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    return train(TrainConfig(data=world, out=out, encoder="test_efficientnet", embed_dim=16, batch_size=8,
                             steps=2, progress=False))["checkpoint"]


@pytest.fixture(scope="module")
def in_memory(world, checkpoint):
    return embed_checkpoint(checkpoint, world, clusters=0, batch_size=16, device="cpu")


def _by_id(emb):
    order = np.argsort(emb.item_ids)
    return emb.item_ids[order], emb.vectors[order], None if emb.cluster_ids is None else emb.cluster_ids[order]


def test_parts_equal_the_in_memory_embedding(world, checkpoint, in_memory, tmp_path):
    out = str(tmp_path / "emb")
    manifest = embed_catalogue(checkpoint, world, out, clusters=4, batch_size=5, device="cpu", chunk_size=16,
                               kmeans="sklearn")
    assert manifest["items"] == 60 and manifest["dim"] == 16 and len(manifest["parts"]) == 4  # 16+16+16+12
    assert manifest["clusters"] == 4 and manifest["kmeans"] == "sklearn"
    assert sorted(os.listdir(os.path.join(out, "parts"))) == [f"part-{c:06d}.parquet" for c in range(4)]
    got = ItemEmbeddings.load(out)
    ids, vec, clusters = _by_id(got)
    ref_ids, ref_vec, _ = _by_id(in_memory)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(vec, ref_vec, rtol=1e-4, atol=1e-5)
    from safetensors.numpy import load_file
    centres = load_file(os.path.join(out, "centroids.safetensors"))["centroids"]
    np.testing.assert_array_equal(clusters, cluster.assign(vec, centres))
    assert len(set(clusters.tolist())) > 1
    some = ids[[3, 17, 40]]
    part = ItemEmbeddings.load(out, item_ids=some)
    assert sorted(part.item_ids.tolist()) == sorted(some.tolist())


def test_resume_reuses_finished_parts(world, checkpoint, tmp_path, monkeypatch):
    import courier_fast.embed as embed_module

    ref_out = str(tmp_path / "reference")
    embed_catalogue(checkpoint, world, ref_out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    real, chunks = embed_module.encoded_batches, []

    def dies_on_third_chunk(encoder, items, rows, *a, **k):
        chunks.append(len(chunks))
        if len(chunks) == 3:
            raise KeyboardInterrupt  # a kill while encoding chunk 2
        return real(encoder, items, rows, *a, **k)

    monkeypatch.setattr(embed_module, "encoded_batches", dies_on_third_chunk)
    out = str(tmp_path / "emb")
    with pytest.raises(KeyboardInterrupt):
        embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["emb-000000.parquet", "emb-000001.parquet"]
    with pytest.raises(ValueError, match="unfinished"):
        ItemEmbeddings.load(out)
    chunks.clear()
    chunks.extend([None] * 3)  # no more dying
    embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    assert len(chunks) == 3 + 2  # only chunks 2 and 3 were encoded again
    ref, got = _by_id(ItemEmbeddings.load(ref_out)), _by_id(ItemEmbeddings.load(out))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ref[2])
    assert not any(n.startswith("emb-") for n in os.listdir(os.path.join(out, "parts")))


def test_another_plan_is_refused(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=16)
    with pytest.raises(ValueError, match="another embedding run .*chunk_size"):
        embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=8)
    again = embed_catalogue(checkpoint, world, out, clusters=0, device="cpu", chunk_size=16)  # finished: a no-op
    assert again["items"] == 60


def test_file_output_assembles_and_removes_parts(world, checkpoint, in_memory, tmp_path):
    path = tmp_path / "emb.safetensors"
    emb = embed(checkpoint, world, str(path), clusters=0, device="cpu", chunk_size=7)
    assert os.listdir(tmp_path) == ["emb.safetensors"]
    np.testing.assert_allclose(_by_id(emb)[1], _by_id(in_memory)[1], rtol=1e-4, atol=1e-5)


def test_eval_reads_the_parts_directory(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    embed(checkpoint, world, out, clusters=4, device="cpu", chunk_size=16, kmeans="sklearn")
    file = str(tmp_path / "emb.parquet")
    ItemEmbeddings.load(out).save(file)
    a, b = evaluate(world, out), evaluate(world, file)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a)  # re-normalised on load


# ----------------------------------------------------------------------------- a real kill
def _cli(world, checkpoint, out):
    return [sys.executable, "-m", "courier_fast", "embed", "--checkpoint", checkpoint, "--data", world, "--out", out,
            "--clusters", "3", "--kmeans", "sklearn", "--chunk-size", "4", "--batch-size", "1", "--device", "cpu",
            "--no-progress"]


def test_resume_after_sigkill_equals_uninterrupted(world, checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_out = str(tmp_path / "reference")
    embed_catalogue(checkpoint, world, ref_out, clusters=3, batch_size=1, device="cpu", chunk_size=4, kmeans="sklearn")
    killed = False
    for attempt in range(3):
        out = str(tmp_path / f"killed{attempt}")
        proc = subprocess.Popen(_cli(world, checkpoint, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                parts = os.path.join(out, "parts")
                if os.path.isdir(parts) and sum(n.startswith("emb-") for n in os.listdir(parts)) >= 2:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed = True
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if killed:
            break
    if not killed:
        pytest.skip("the run always finished before it could be killed")
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    done = subprocess.run(_cli(world, checkpoint, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref, got = _by_id(ItemEmbeddings.load(ref_out)), _by_id(ItemEmbeddings.load(out))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ref[2])


# ----------------------------------------------------------------------------- 2 gloo ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed_rank(rank, port, world, checkpoint, out):
    import torch
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    manifest = embed_catalogue(checkpoint, world, out, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(manifest, f)
    # a file output: the same parts under <file>.parts, assembled by rank 0 alone
    got = embed(checkpoint, world, os.path.join(out, "all.parquet"), clusters=3, device="cpu", chunk_size=16,
                kmeans="sklearn")
    assert (got is None) == (rank != 0)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_the_parts(world, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    one = str(tmp_path / "one")
    mp.spawn(_embed_rank, args=(_free_port(), world, checkpoint, out), nprocs=2)
    m0, m1 = (json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2))
    assert m0 == m1 and m0["world_size"] == 2 and len(m0["parts"]) == 4
    embed_catalogue(checkpoint, world, one, clusters=3, device="cpu", chunk_size=16, kmeans="sklearn")
    b = _by_id(ItemEmbeddings.load(one))
    for got in (ItemEmbeddings.load(out), ItemEmbeddings.load(os.path.join(out, "all.parquet"))):
        a = _by_id(got)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[2], b[2])
    assert not os.path.exists(os.path.join(out, "all.parquet.parts"))


# ----------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_separates_blobs_and_is_seeded(backend):
    rng = np.random.default_rng()
    centres = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, 300)
    labels[:3] = [0, 1, 2]
    x = (centres[labels] + 0.1 * rng.normal(size=(300, 8))).astype(np.float32)
    fitted = cluster.fit_centroids(x, 3, seed=5, backend=backend)
    got = cluster.assign(x, fitted)
    for k in range(3):  # one cluster per blob
        assert len(set(got[labels == k].tolist())) == 1
    assert len(set(got.tolist())) == 3
    np.testing.assert_array_equal(cluster.fit_centroids(x, 3, seed=5, backend=backend), fitted)


def test_kmeans_backend_choice_and_sample():
    assert cluster.resolve_backend("auto") == ("faiss" if cluster.faiss_available() else "sklearn")
    with pytest.raises(ValueError, match="kmeans backend"):
        cluster.resolve_backend("gpu")
    rows = cluster.sample(10_000, 4, seed=1)
    assert len(rows) == 4 * cluster.SAMPLE_PER_CENTRE and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, cluster.sample(10_000, 4, seed=1))
    np.testing.assert_array_equal(cluster.sample(50, 4), np.arange(50))
    with pytest.raises(ValueError, match="non-empty"):
        cluster.fit_centroids(np.zeros((0, 3)), 2)
