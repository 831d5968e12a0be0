"""Small helpers shared by the Triton kernels of this package (private).

Every Triton op is split in two steps: a *plan* that derives the grid, the constexprs and the arguments of
each launch from the tensors (pure host code; it also works on `meta` tensors, which is how
tests/kernels/test_compile.py compiles exactly what the wrappers launch), and `run()` that launches it.

Interpreter: Triton runs kernels on CPU tensors only in its interpreter, which `TRITON_INTERPRET=1` turns on
and which must be set before triton is first imported (triton.language's own reductions are @triton.jit
functions, decorated at that import). On a CPU-only torch build, where compiled kernels could never run,
importing this module therefore sets TRITON_INTERPRET=1 when it is unset and triton is not imported yet.
Anywhere else set it yourself (tests/kernels/conftest.py does); `TRITON_INTERPRET=0` opts out.
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

if ("TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules
        and torch.version.cuda is None and getattr(torch.version, "hip", None) is None):
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

_TL_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}

def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class Launch:
    """One kernel launch: `kernel[grid](**args)` where args holds tensors, ints, floats and constexprs."""

    kernel: Any
    grid: tuple
    args: dict
    constexprs: tuple = field(default=())  # names in args that are tl.constexpr parameters
    num_warps: int = 4
    num_stages: int | None = None
    # False stops the GPU compiler from contracting a * b + c into one FMA: for kernels that must round each
    # product like their torch reference does (the interpreter never contracts).
    fp_fusion: bool = True


def interpreting(kernel: Any, device: torch.device) -> bool:
    """Whether a launch of `kernel` with tensors on `device` runs in Triton's interpreter."""
    return device.type == "cpu" or isinstance(kernel, InterpretedFunction)


def run(launches: list[Launch], device: torch.device) -> None:
    for ln in launches:
        if any(int(g) == 0 for g in ln.grid):
            continue
        kernel = ln.kernel
        if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
            raise RuntimeError(
                "Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (or use the torch ops on CPU)")
        opts = {"num_warps": ln.num_warps}
        if ln.num_stages is not None:
            opts["num_stages"] = ln.num_stages
        if not ln.fp_fusion:
            opts["enable_fp_fusion"] = False
        kernel[ln.grid](**ln.args, **opts)


def signature_of(ln: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compiler.ASTSource`, from a planned launch.

    Tensors become pointers of their dtype, Python ints i32 (i64 when they do not fit), floats fp32.
    Pointers and ints divisible by 16 get the divisibility hint a real launch would specialise on (ints the kernel
    lists in do_not_specialize do not).
    """
    fn = ln.kernel.fn if hasattr(ln.kernel, "fn") else ln.kernel
    names = list(inspect.signature(fn).parameters)
    unspecialised = set(getattr(ln.kernel, "do_not_specialize", ()) or ())
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = ln.args[name]
        if name in ln.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TL_DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and v != 0 and name not in unspecialised and i not in unspecialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={v!r}")
    return signature, constexprs, attrs


def compile_launch(ln: Launch, cc: int):
    """Compiles a planned launch for CUDA compute capability `cc` (80, 90, ...) without a GPU. The kernel
    modules must have been imported with the interpreter off (interpreted kernels cannot be compiled)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = ln.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("compile_launch needs compiled kernels: import them with TRITON_INTERPRET=0")
    signature, constexprs, attrs = signature_of(ln)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": ln.num_warps}
    if ln.num_stages is not None:
        opts["num_stages"] = ln.num_stages
    if not ln.fp_fusion:
        opts["enable_fp_fusion"] = False
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
