"""bench/harness.py: what every results JSON records about its own measurement."""
import json

from conftest import import_bench

harness = import_bench("harness")


def test_peak_rss_is_measured_from_the_reset_not_inherited():
    """After reset_peak_rss() the peak is this region's, not the process's (or its parent's)
    earlier high-water mark, and it does see an allocation made inside the region."""
    big = bytearray(300 * 2**20)  # 300 MB touched
    big[::4096] = b"x" * len(big[::4096])
    del big
    assert harness.peak_rss_mb() - harness.rss_mb() > 200
    harness.reset_peak_rss()
    base = harness.rss_mb()
    assert harness.peak_rss_mb() - base < 50
    block = bytearray(100 * 2**20)
    block[::4096] = b"y" * len(block[::4096])
    assert harness.peak_rss_mb() - base > 80
    del block


def test_results_record_the_commit_and_a_dirty_tree(tmp_path, monkeypatch):
    state = harness.git_state()
    assert state["commit"] and isinstance(state["dirty"], bool)
    path = str(tmp_path / "r.json")
    monkeypatch.setattr(harness, "_AT_START", {"commit": "abc1234", "dirty": True})
    data = json.load(open(harness.write_results("x", {}, [], path=path)))
    assert data["git"] == "abc1234" and data["dirty"] is True
    monkeypatch.setattr(harness, "_AT_START", {"commit": state["commit"], "dirty": False})
    monkeypatch.setattr(harness, "git_state", lambda: {"commit": state["commit"], "dirty": True})  # edited mid-run
    assert json.load(open(harness.write_results("x", {}, [], path=path)))["dirty"] is True
    monkeypatch.setattr(harness, "git_state", lambda: {"commit": state["commit"], "dirty": False})
    assert json.load(open(harness.write_results("x", {}, [], path=path)))["dirty"] is False


def test_dirty_means_code_changes_not_the_runs_own_results(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "cpu-x.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    bench = str(tmp_path / "bench")
    assert harness.git_state(bench)["dirty"] is False
    (tmp_path / "bench" / "results" / "cpu-x.json").write_text('{"rows": []}')  # a run writing its JSON
    assert harness.git_state(bench)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness.git_state(bench)["dirty"] is True
    git("checkout", "code.py")
    (tmp_path / "new_module.py").write_text("")
    assert harness.git_state(bench)["dirty"] is True
