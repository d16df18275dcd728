"""attnbench's own GPU kernels (Triton), optional: nothing here imports triton eagerly.

* :mod:`._triton` -- availability (triton installed? CUDA, or CPU under
  ``TRITON_INTERPRET=1``?) and the lazy loader the registry uses;
* :mod:`.lit_triton` -- LiT's linear attention, forward and backward;
* :mod:`.sla_triton` -- SLA's block-sparse + linear forward in one kernel;
* :mod:`.compile_check` -- every autotuning config compiled for sm_90/sm_80 without
  a GPU: compile errors, registers, spills;
* :mod:`.floor` -- the kernels against their bandwidth / tensor-core floors on a
  GPU, and the issue's speed targets (``python -m attnbench.attention.kernels.floor``).
"""

#: how SLA's Triton kernel takes the critical blocks out of the total linear state
#: (:mod:`.sla_triton`'s docstring); here, without triton, for the memory model too
CORRECTIONS = ("output", "state", "gemm")
CORRECTION = "gemm"

