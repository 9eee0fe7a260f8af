"""The self-check's cache key names the NVIDIA driver: NVML's version where pynvml is installed,
else /proc's, else a string saying that the key lacks it (torch has no driver-version call)."""
import builtins
import sys
import types

from courier_fast.ops.selfcheck import check as backend_check


def _fake_nvml(version, calls):
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: calls.append("init")
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    mod.nvmlSystemGetDriverVersion = lambda: version
    return mod


def test_driver_version_from_nvml(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(b"550.54.15", calls))
    assert backend_check._driver_version() == "nvml 550.54.15"
    assert calls == ["init", "shutdown"]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml("560.28.03", calls))  # newer pynvml: str
    assert backend_check._driver_version() == "nvml 560.28.03"


def test_driver_version_says_when_the_key_lacks_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import raises ImportError
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/driver/nvidia"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    version = backend_check._driver_version()
    assert version.startswith("unknown") and "NVML" in version


def test_failing_nvml_falls_back(monkeypatch):
    mod = _fake_nvml("x", [])

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert not backend_check._driver_version().startswith("nvml")
