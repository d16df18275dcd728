"""Compile the Triton kernels for a GPU architecture without a GPU: errors, registers, spills.

``python -m attnbench.bench.compile_check [--arch 90] [--dtype bf16]``

Triton's front end, its NVIDIA passes and the bundled ``ptxas`` run on any
machine, so every autotuning config of every kernel can be compiled here for
sm_90 (H100/H200) or sm_80 (A100) and its register use and spill bytes read
back (``cuobjdump -res-usage``). What this cannot tell is speed. The shapes are
DiT-XL/2's: head dim 72 (3 tiles of 32 for LiT, 64 + 16 pieces for SLA), 64-token
SLA blocks. Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def _usage(kernel) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"registers {found.group(1)}, spill/stack {found.group(2)} B" if found else "?"


def _compile(jit, arch: int, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(jit, "fn", jit)  # an autotuner wraps the JITFunction
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32")
        for name in fn.arg_names
    }
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cases(dtype: str):
    """``(label, kernel, pointer types, constexprs, configs)`` for DiT-XL/2 shapes."""
    from ..attention.lit import triton as lit
    from ..attention.sla import triton as sla

    p, f32 = f"*{dtype}", "*fp32"
    prec = "ieee" if dtype == "fp32" else "tf32"
    half = dtype != "fp32"
    state_types = {"A": p, "B": p, "W": f32, "U": f32, "S_part": f32, "Z_part": f32}
    for feature, name in ((0, "relu"), (1, "softmax")):
        yield (f"state {name}", lit._state_kernel, state_types,
               {"FEATURE": feature, "HAS_W": False, "HAS_U": False, "F32_DOT": not half,
                "PREC": prec, "BD": 32, "DROW": 128}, lit._STATE_CONFIGS)
    yield ("state backward (row weights)", lit._state_kernel, state_types,
           {"FEATURE": 0, "HAS_W": True, "HAS_U": True, "F32_DOT": True, "PREC": prec,
            "BD": 32, "DROW": 128}, lit._STATE_CONFIGS)
    yield ("readout", lit._readout_kernel,
           {"Q": p, "S": f32, "Z": f32, "OUT": p, "DEN": f32, "eps": "fp32"},
           {"STORE_DEN": False, "PREC": prec, "BD": 32}, lit._READOUT_CONFIGS)
    yield ("backward apply", lit._bwd_apply_kernel,
           {"Q": p, "K": p, "V": p, "DO": p, "W": f32, "U": f32, "S": f32, "Z": f32, "DS": f32,
            "DZ": f32, "DQ": p, "DK": p, "DV": p},
           {"PREC": prec, "BD": 32}, lit._BWD_CONFIGS)
    for correction in sla.CORRECTIONS:
        yield (f"sla marginal softmax ({correction})", sla._sla_kernel,
               {"Q": p, "K": p, "V": p, "LUT": "*i32", "S": f32, "Z": f32, "DS": "*bf16",
                "DZ": "*bf16", "OS": p, "OL": p, "qk_scale": "fp32", "eps": "fp32"},
               {"FEATURE": 1, "LINEAR": 1, "F32_DOT": not half, "PREC": prec, "DA": 64,
                "DB": 16, "HAS_B": True, "BQ": 64, "BKV": 64,
                "CORR": sla.CORRECTIONS.index(correction)}, sla._CONFIGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90, 80)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    failures = 0
    for label, kernel, types, constexprs, configs in cases(args.dtype):
        for cfg in configs:
            consts = {**constexprs, **cfg.kwargs}
            what = f"{label} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
            try:
                compiled = _compile(kernel, args.arch, types, consts, cfg.num_warps,
                                    cfg.num_stages)
                print(f"ok    {what}: {_usage(compiled)}", flush=True)
            except Exception as err:
                failures += 1
                print(f"FAIL  {what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                      flush=True)
    print(f"{failures} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
