"""The demo's table and JSON: the default COURIER run appears once, under `courier`, naming its query."""
import dataclasses

from courier_fast.demo import COURIER_QUERY, DEFAULT_COURIER, ORDER, RUNS, format_table
from courier_fast.training import TrainConfig


def test_default_courier_is_trainconfigs_and_shown_once_naming_its_query():
    default_query = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["query"]
    assert RUNS[DEFAULT_COURIER] == ("courier", {"query": default_query}) and COURIER_QUERY == default_query
    assert DEFAULT_COURIER not in ORDER and len(set(ORDER)) == len(ORDER)
    report = {"seed": 0, "quick": True, "seconds": 1.0,
              "results": {m: {"auc": 0.6 + 0.01 * i, "gauc": 0.55, "logloss": 0.3} for i, m in enumerate(ORDER)}}
    rows = format_table(report).splitlines()[2:-1]
    assert len(rows) == len(ORDER)
    courier_rows = [r for r in rows if r.startswith("courier (")]
    assert courier_rows == [r for r in rows if r.startswith(f"courier ({default_query} query) ")]
    assert len(courier_rows) == 1 and not any(DEFAULT_COURIER in r for r in rows)
