"""SLA's constants shared by its paths and memory models (no torch or triton import)."""

#: how SLA's Triton kernel takes the critical blocks out of the total linear state
#: (``triton.py``'s docstring); here, without triton, for the memory model too
CORRECTIONS = ("output", "state", "gemm")
CORRECTION = "gemm"
#: the official block sizes (thu-ml/SLA ``sparse_linear_attention/core.py``: BLKQ = BLKK = 64)
BLOCK_Q = BLOCK_KV = 64
#: the paper's setting: 5% critical blocks (95% sparsity)
TOPK = 0.05
#: the official linear branch's eps (``1e-5 + (q * ksum).sum(...)``)
EPS = 1e-5
