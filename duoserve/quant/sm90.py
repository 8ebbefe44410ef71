"""Compile a Triton or Gluon kernel for sm_90 on any machine (no GPU needed), with triton's own
ptxas: the CPU tests and scripts/sass_int4.py read its PTX, SASS and resource use."""

from __future__ import annotations


def compile_sm90(source, fn, sig: dict, consts: dict, div16: tuple, options: dict):
    """fn compiled for sm_90. source: triton's ASTSource or Gluon's GluonASTSource; sig: the
    runtime arguments' types by name; consts: the constexpr values; div16: the non-pointer
    arguments a real launch specializes as divisible by 16 (pointers always are); options:
    triton.compile's (num_warps, num_stages, maxnreg...). -> triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {**sig, **{name: "constexpr" for name in consts}}
    names = [n for n in sig if n.endswith("_ptr") or n in div16]
    attrs = {(list(sig).index(n),): [["tt.divisibility", 16]] for n in names}
    src = source(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
