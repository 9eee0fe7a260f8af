"""Pre-training: train(TrainConfig) (resumable, torchrun-able), train_step, and encoder
micro-batching (grad_cache). `courier_fast.training.train_step` and friends are re-exported here."""
from courier_fast.training.loop import TrainConfig, train, train_step  # noqa: F401

__all__ = ["TrainConfig", "train", "train_step"]
