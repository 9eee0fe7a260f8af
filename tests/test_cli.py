"""The train / embed / eval commands: clear errors (exit status 2) on bad input, and the happy path."""
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from courier_fast.cli import main
from courier_fast.data.format import SESSION_SCHEMA

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["--encoder", "test_efficientnet", "--embed-dim", "32", "--batch-size", "8", "--image-size", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A 2-step courier run: (its directory, the exit status of train)."""
    out = str(tmp_path_factory.mktemp("run"))
    return out, main(["train", "--data", world, "--out", out, "--steps", "2", *TRAIN])


def _copy_world(world, dest):
    shutil.copytree(world, dest)
    return str(dest)


def _fails(capsys, argv, *words):
    """main(argv) exits with 2 and a one-line error naming each of `words`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"courier-fast {argv[0]}: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


def _commands(data, tmp_path, checkpoint="ckpt.pt"):
    return {"train": ["train", "--data", data, "--out", str(tmp_path / "out"), *TRAIN],
            "embed": ["embed", "--data", data, "--checkpoint", str(tmp_path / checkpoint),
                      "--out", str(tmp_path / "emb.parquet")],
            "eval": ["eval", "--data", data]}


# ----------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("command", ["train", "embed", "eval"])
def test_missing_data_dir(capsys, tmp_path, command):
    missing = str(tmp_path / "no_such_world")
    _fails(capsys, _commands(missing, tmp_path)[command], missing)
    assert not (tmp_path / "out").exists() and not (tmp_path / "emb.parquet").exists()


@pytest.mark.parametrize("command", ["train", "embed", "eval"])
def test_items_not_parquet(capsys, world, tmp_path, command):
    data = _copy_world(world, tmp_path / "world")
    with open(os.path.join(data, "items.parquet"), "wb") as f:
        f.write(os.urandom(256))
    _fails(capsys, _commands(data, tmp_path)[command], "items.parquet")


def test_pretrain_missing_column(capsys, world, tmp_path):
    data = _copy_world(world, tmp_path / "world")
    path = os.path.join(data, "pretrain.parquet")
    pq.write_table(pq.read_table(path).drop_columns(["clicks"]), path)
    _fails(capsys, _commands(data, tmp_path)["train"], "pretrain", "clicks")


def test_ctr_test_unknown_item(capsys, world, tmp_path):
    data = _copy_world(world, tmp_path / "world")
    path = os.path.join(data, "ctr_test.parquet")
    t = pq.read_table(path).to_pydict()
    t["pv_items"][3][1] = 999_999
    pq.write_table(pa.table(t, schema=SESSION_SCHEMA), path)
    _fails(capsys, _commands(data, tmp_path)["eval"], "ctr_test", "row 3", "999999")


# ----------------------------------------------------------------------------- embed / eval arguments
def test_embed_missing_checkpoint(capsys, world, tmp_path):
    _fails(capsys, _commands(world, tmp_path, "nothing.pt")["embed"], "nothing.pt")
    assert not (tmp_path / "emb.parquet").exists()


@pytest.mark.parametrize("content", ["garbage", "list"])
def test_embed_file_is_not_a_checkpoint(capsys, world, tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "garbage":
        path.write_bytes(os.urandom(300))
    else:
        torch.save([torch.zeros(3)], path)
    _fails(capsys, _commands(world, tmp_path)["embed"], "ckpt.pt", "not a courier_fast checkpoint")


def test_embed_bad_out_suffix(capsys, world, run, tmp_path):
    out, _ = run
    argv = ["embed", "--data", world, "--checkpoint", os.path.join(out, "checkpoint.pt"),
            "--out", str(tmp_path / "emb.npy")]
    _fails(capsys, argv, "emb.npy", ".safetensors")
    assert not (tmp_path / "emb.npy").exists()


@pytest.mark.parametrize("suffix", [
    ".parquet",
    ".safetensors",
])
def test_embed_out_dir_missing(capsys, world, run, tmp_path, suffix):
    out, _ = run
    target = str(tmp_path / "no_dir" / f"emb{suffix}")
    argv = ["embed", "--data", world, "--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", target,
            "--clusters", "0"]
    _fails(capsys, argv, "no_dir")


def test_eval_missing_embeddings(capsys, world, tmp_path):
    missing = str(tmp_path / "emb.safetensors")
    _fails(capsys, ["eval", "--data", world, "--embeddings", missing], missing)


def test_eval_embeddings_and_oracle_exclusive(capsys, world, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", world, "--oracle", "--embeddings", str(tmp_path / "e.parquet")])
    assert exc.value.code == 2
    assert "--oracle" in capsys.readouterr().err


# ----------------------------------------------------------------------------- happy path
def test_train_embed_eval(capsys, world, run, tmp_path):
    out, rc = run
    assert rc == 0
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    capsys.readouterr()

    emb = str(tmp_path / "emb.safetensors")
    assert main(["embed", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--data", world, "--out", emb,
                 "--clusters", "4", "--simscore", "ctr_test", "--batch-size", "16"]) == 0
    assert "60 items x 32" in capsys.readouterr().out
    sims = pq.read_table(str(tmp_path / "emb.simscore-ctr_test.parquet")).to_pylist()
    requests = pq.read_table(os.path.join(world, "ctr_test.parquet")).to_pylist()
    assert len(sims) == len(requests)
    for s, r in zip(sims, requests):
        assert (s["user_id"], s["pv_items"]) == (r["user_id"], r["pv_items"])
        assert len(s["simscore"]) == len(r["pv_items"])
        assert all(len(per_item) == len(r["history"][-5:]) for per_item in s["simscore"])
        assert all(-1.0001 <= v <= 1.0001 for per_item in s["simscore"] for v in per_item)

    assert main(["eval", "--data", world, "--embeddings", emb, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["gauc"] <= 1 and metrics["logloss"] > 0


def test_train_prints_summary(world, tmp_path, capsys):
    assert main(["train", "--data", world, "--out", str(tmp_path / "r"), "--method", "random_encoder", *TRAIN]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 0 and summary["checkpoint"].endswith("checkpoint.pt")


def test_module_eval_subprocess(world):
    done = subprocess.run([sys.executable, "-m", "courier_fast", "eval", "--data", world], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "auc" in done.stdout and "gauc" in done.stdout and "logloss" in done.stdout


def test_train_options_reach_the_config(world, tmp_path):
    out = tmp_path / "r"
    opts = ["--history-len", "3", "--pv-len", "4", "--temperature", "0.2", "--contrastive-weight", "0.5",
            "--history-weight", "0", "--ctr-weight", "2", "--backend", "reference", "--ring", "--on-error", "skip",
            "--lr-schedule", "cosine", "--grad-clip", "1.5", "--dist-timeout", "60"]
    assert main(["train", "--data", world, "--out", str(out), "--steps", "1", *TRAIN, *opts]) == 0
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in ("history_len", "pv_len", "temperature", "contrastive_weight", "history_weight",
                                "ctr_weight", "backend", "ring", "on_error", "lr_schedule", "grad_clip",
                                "dist_timeout")} == {
        "history_len": 3, "pv_len": 4, "temperature": 0.2, "contrastive_weight": 0.5, "history_weight": 0.0,
        "ctr_weight": 2.0, "backend": "reference", "ring": True, "on_error": "skip", "lr_schedule": "cosine",
        "grad_clip": 1.5, "dist_timeout": 60.0}


def test_train_bad_option_names_it(capsys, world, tmp_path):
    _fails(capsys, ["train", "--data", world, "--out", str(tmp_path / "r"), *TRAIN, "--temperature", "0"],
           "temperature")


def test_eval_features_option(capsys, world):
    assert main(["eval", "--data", world, "--oracle", "--features", "cluster", "--json"]) == 0
    cluster = json.loads(capsys.readouterr().out)
    assert main(["eval", "--data", world, "--features", "none", "--json"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert main(["eval", "--data", world, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == none  # no embeddings: "all" adds nothing
    assert cluster["auc"] != none["auc"] and cluster["test_rows"] == none["test_rows"]
    _fails(capsys, ["eval", "--data", world, "--features", "pixels"], "features", "pixels")
    _fails(capsys, ["eval", "--data", world, "--features", "vector"], "features='vector'", "needs embeddings")
