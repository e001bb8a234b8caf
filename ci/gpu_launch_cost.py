"""Where the host time of a fast-attention training step goes on a GPU machine (run by
ci/gpu-smoke.sh; the kernels must live in a file for @triton.jit).

Prints the host time per launch of a near-empty Triton kernel through ``kernel[grid]`` and
straight through its compiled launcher (``CompiledKernel.run``), with 1 and 12 pointer
arguments, against a torch op; the host time to issue a fused fp16 forward, backward and
training step with the package's direct launches on and off (and an SDPA step); the autograd
engine's host time for a Python node against a C++ one; then a cProfile of training steps at
8k tokens.
"""

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime import driver

from verger.fast_attention import linear_attention
from verger.fast_attention.ops.causal_linear import triton as kernels
from verger.fast_attention.ops.causal_linear import triton_sequential as sequential


@triton.jit
def _touch(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def _touch12(x_ptr, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def host_us(fn, repeats=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = (time.perf_counter() - t) / repeats * 1e6
    torch.cuda.synchronize()
    return host


def issue_times(n):
    """Print the host time to issue a fused fp16 forward, backward and training step at ``n``
    tokens, with the direct launches on and off, and an SDPA step; return the step."""
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.half, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grad = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.half)
    out = linear_attention(q, k, v, causal=True)

    def fwd():
        return linear_attention(q, k, v, causal=True)

    def bwd():
        return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def step():
        return torch.autograd.grad(fwd(), (q, k, v), grad)

    def sdpa():
        return torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad
        )

    launchers = [*kernels._LAUNCH.values(), *sequential._LAUNCH.values()]
    for direct in (False, True, False, True):  # A/B twice (the host drifts), ending direct
        for launcher in launchers:
            launcher.direct = direct
        print(
            f"n={n} direct={direct} host us to issue: forward {host_us(fwd, 300):.0f}, "
            f"backward {host_us(bwd, 300):.0f}, step {host_us(step, 300):.0f}",
            flush=True,
        )
    print(f"n={n} host us to issue an SDPA step: {host_us(sdpa, 300):.0f}", flush=True)
    return step


class _Identity(torch.autograd.Function):
    """The cheapest Python autograd node: what the engine's hand-off of a Python backward to
    its CUDA worker thread costs, against a C++ node (``mul``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def engine_cost():
    x = torch.randn(1024, device="cuda", requires_grad=True)
    g = torch.randn(1024, device="cuda")
    ops = {"mul (C++ node)": lambda: x.mul(1.0), "identity Function": lambda: _Identity.apply(x)}
    for name, op in ops.items():
        step = lambda op=op: torch.autograd.grad(op(), (x,), g)  # noqa: E731
        print(f"host us per autograd.grad step through {name}: {host_us(step):.1f}", flush=True)


def main():
    x = torch.zeros(1024, device="cuda")
    ptrs = [torch.zeros(16, device="cuda") for _ in range(11)]
    dev = torch.cuda.current_device()
    ck1 = _touch[(1,)](x, 1024, BLOCK=1024)
    ck12 = _touch12[(1,)](x, *ptrs, 1024, BLOCK=1024)

    def direct(ck, *args):
        stream = driver.active.get_current_stream(dev)
        ck.run(1, 1, 1, stream, ck.function, ck.packed_metadata, None, None, None, *args)

    launches = {
        "torch add_": lambda: x.add_(1),
        "kernel[grid], 1 pointer": lambda: _touch[(1,)](x, 1024, BLOCK=1024),
        "kernel[grid], 12 pointers": lambda: _touch12[(1,)](x, *ptrs, 1024, BLOCK=1024),
        "CompiledKernel.run, 1 pointer": lambda: direct(ck1, x, 1024, 1024),
        "CompiledKernel.run, 12 pointers": lambda: direct(ck12, x, *ptrs, 1024, 1024),
        "get_current_stream": lambda: driver.active.get_current_stream(dev),
        "data_ptr x12": lambda: [p.data_ptr() for p in ptrs],
    }
    for name, fn in launches.items():
        try:
            print(f"host us per call, {name}: {host_us(fn):.1f}", flush=True)
        except Exception as exc:  # the internals differ between Triton versions
            print(f"{name}: unavailable ({type(exc).__name__}: {exc})", flush=True)
    print("x[0] after the launches:", float(x[0]), flush=True)
    engine_cost()

    for n in (1024, 8192):
        step = issue_times(n)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        step()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(28)
    print(text.getvalue()[-9000:], flush=True)


if __name__ == "__main__":
    main()
