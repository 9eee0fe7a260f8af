"""Backends of the ops, one module each: compiled (torch.library glue for courier_fast._C, CPU and
CUDA), triton (torch.library ops around kernels/), chunked (ATen row tiles, any device). A new
backend is a module here plus one dispatch.register call per op in ops/contrastive.py or
ops/attention.py (docs/design.md §2)."""
