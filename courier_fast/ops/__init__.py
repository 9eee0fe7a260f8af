"""The two ops and everything under them (docs/design.md §2, §3).

contrastive.py, attention.py   the public ops: contract, argument checks, backend registrations
dispatch.py, registry.py       the one place a backend is chosen / what backends exist
reference.py                   the float64-exact PyTorch truth every backend is tested against
attention_layout.py, jagged.py, row_norms.py   layouts and shared math the backends build on
distributed.py                 global negatives across ranks (all-gather, ring) and process setup
backends/                      one module per backend family: compiled (_C), triton, chunked
selfcheck/                     the self-check that auto trusts a backend on: problems, tolerances
"""
