"""CourierModel's defaults are the ones chosen by the protocol of docs/design.md §5.1 (issue 28):
the demo and `courier-fast train` run with them unless told otherwise."""
import inspect

from courier_fast.models.courier import CourierModel
from courier_fast.training.loop import TrainConfig


def test_courier_defaults_are_the_ten_seed_decisions():
    """temperature 0.2 (0.1 over 0.05: +0.017 AUC [+0.009, +0.026]; 0.2 over 0.1: +0.011
    [+0.007, +0.016], each on ten quick worlds); candidate ids,
    the learned query and no logQ stayed (no interval excluded zero)."""
    params = inspect.signature(CourierModel).parameters
    assert params["temperature"].default == 0.2
    assert params["candidate_ids"].default is True and params["query"].default == "learned"
    assert params["item_logq"].default is None


def test_train_and_the_demo_take_the_models_temperature():
    """TrainConfig leaves the temperature to the method, so CourierModel's default is what runs."""
    cfg = TrainConfig(data="unused", out="unused", method="courier")
    assert cfg.temperature is None and cfg.query == "learned" and cfg.logq is False
    assert "temperature" not in cfg.method_kwargs()
