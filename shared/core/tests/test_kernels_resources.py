"""kernel_resources: registers, spills and tensor-core use of Triton kernels, without a GPU.

Also the audit of the shipped kernels: every Triton kernel of the core ops, at the launch
configurations its wrapper picks for realistic shapes, must compile for sm_80 and sm_90
without register spills. The block sizes and warps come from the wrappers' own helpers.

Note: configurations are compiled without Triton's launch-time 16-divisibility hints, so the
numbers are those of the unaligned variant (e.g. a hidden size that is not a multiple of 16),
the conservative case: aligned launches vectorize their loads and use fewer registers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")

import triton
import triton.language as tl

from verger.core.kernels import resources
from verger.core.kernels._common import interpreter_on, next_power_of_2, num_warps_for
from verger.core.kernels.resources import (
    KernelConfig,
    KernelResources,
    kernel_resources,
    ptxas_available,
)

if not ptxas_available():
    pytest.skip("triton's NVIDIA backend / bundled ptxas is missing", allow_module_level=True)

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")


@triton.jit
def _scale_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask, other=0.0) * 2.0, mask=mask)


@triton.jit
def _dot_kernel(
    A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr
):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    c = tl.dot(a, b, input_precision=PRECISION)
    tl.store(C + rm[:, None] * N + rn[None, :], c)


def _dot(dtype: str, size: int, precision: str) -> KernelConfig:
    return KernelConfig(
        _dot_kernel,
        {"A": f"*{dtype}", "B": f"*{dtype}", "C": "*fp32"},
        {"M": size, "N": size, "K": size, "PRECISION": precision},
        num_warps=4,
    )


# The behaviour tests' kernels: (a) elementwise, (b) fp16 tensor-core dot, (c) spilling dot.
PROBES: dict[str, KernelConfig] = {
    "elementwise": KernelConfig(
        _scale_kernel, {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 1024}
    ),
    "dot_fp16": _dot("fp16", 32, "tf32"),  # precision is ignored for fp16 operands
    "dot_fp32_ieee": _dot("fp32", 64, "ieee"),  # ieee fp32 runs on FMA units: 64x64x64 spills
}


def _shipped() -> dict[str, KernelConfig]:
    """The launch configurations of the four core ops, derived as their wrappers derive them."""
    from verger.core.kernels.linear_cross_entropy import triton as ce
    from verger.core.kernels.rms_norm import triton as rn
    from verger.core.kernels.rotary import triton as ro
    from verger.core.kernels.swiglu import triton as sw

    out: dict[str, KernelConfig] = {}
    for dt in DTYPES:
        for hidden in (1024, 2048, 4096, 5120, 8192):  # 5120 shares 8192's block, masked
            block = next_power_of_2(hidden)
            out[f"rms_fwd-{dt}-N{hidden}"] = KernelConfig(
                rn._rms_norm_fwd_kernel,
                {"X": f"*{dt}", "W": f"*{dt}", "Y": f"*{dt}", "RSTD": "*fp32", "N": "i32",
                 "eps": "fp32"},
                {"BLOCK_N": block},
                num_warps=num_warps_for(block),
            )  # fmt: skip
            out[f"rms_bwd-{dt}-N{hidden}"] = KernelConfig(
                rn._rms_norm_bwd_kernel,
                {"DY": f"*{dt}", "X": f"*{dt}", "W": f"*{dt}", "RSTD": "*fp32", "DX": f"*{dt}",
                 "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "ROWS_PER_PROGRAM": "i32"},
                {"BLOCK_N": block},
                num_warps=rn.bwd_num_warps_for(block),
            )  # fmt: skip
        for head_dim in (64, 128):
            for hidden in (1024, 4096, 8192):
                heads = hidden // head_dim
                for inverse in (False, True):  # forward / backward
                    out[f"rotary-{dt}-H{heads}-D{head_dim}-{'bwd' if inverse else 'fwd'}"] = (
                        KernelConfig(  # the wrapper launches with Triton's default warps
                            ro._rotary_kernel,
                            {"X": f"*{dt}", "COS": "*fp32", "SIN": "*fp32", "Y": f"*{dt}",
                             "T": "i32", "H": "i32", "HALF": "i32"},
                            {"BLOCK_H": next_power_of_2(heads),
                             "BLOCK_HALF": next_power_of_2(head_dim // 2), "INVERSE": inverse},
                        )
                    )  # fmt: skip
        out[f"swiglu_fwd-{dt}"] = KernelConfig(
            sw._swiglu_fwd_kernel,
            {"G": f"*{dt}", "U": f"*{dt}", "Y": f"*{dt}", "n": "i32"},
            {"BLOCK": sw._BLOCK},
        )
        out[f"swiglu_bwd-{dt}"] = KernelConfig(
            sw._swiglu_bwd_kernel,
            {"DY": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}",
             "n": "i32"},
            {"BLOCK": sw._BLOCK},
        )  # fmt: skip
    for vocab in (257, 1024, 8192, 32000, 128256):  # byte-level .. Llama-3
        block = ce.block_v_for(vocab)
        for targets in ("i64", "i32"):
            for grad in (False, True):
                out[f"ce-V{vocab}-{targets}-{'grad' if grad else 'loss'}"] = KernelConfig(
                    ce._ce_loss_grad_kernel,
                    {"LOGITS": "*fp32", "TARGETS": f"*{targets}", "LOSS": "*fp32", "V": "i32",
                     "ignore_index": "i32"},
                    {"COMPUTE_GRAD": grad, "BLOCK_V": block},
                    num_warps=num_warps_for(block),
                )  # fmt: skip
    return out


SHIPPED = _shipped()


def _key(c: KernelConfig) -> tuple:
    return (c.fn, tuple(c.signature.items()), tuple(c.constexprs.items()), c.num_warps)


@pytest.fixture(scope="module")
def measured() -> dict[tuple[int, str], KernelResources]:
    """Every probe and shipped configuration compiled once per arch, in one call per arch."""
    named = {**PROBES, **SHIPPED}
    unique = list({_key(c): c for c in named.values()}.values())  # e.g. N=5120 is N=8192

    def compile_all(arch: int) -> dict[tuple, KernelResources]:
        return dict(zip(map(_key, unique), kernel_resources(*unique, arch=arch)))

    # Under the interpreter each call is a subprocess: run the two archs side by side.
    with ThreadPoolExecutor(len(ARCHS) if interpreter_on() else 1) as pool:
        by_arch = dict(zip(ARCHS, pool.map(compile_all, ARCHS)))
    return {(arch, name): by_arch[arch][_key(c)] for arch in ARCHS for name, c in named.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_kernel_uses_registers_only(measured, arch):
    r = measured[arch, "elementwise"]
    assert r.name == "_scale_kernel" and r.arch == arch and r.num_warps == 4
    assert 0 < r.registers <= 255
    assert not r.spills and r.stack_bytes == 0
    assert r.tensor_core_instructions == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_dot_uses_tensor_cores(measured, arch):
    r = measured[arch, "dot_fp16"]
    assert r.tensor_core_instructions > 0  # mma.sync on sm_80, wgmma on sm_90
    assert not r.spills
    assert r.shared_bytes > 0  # the operands are staged through shared memory


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_ieee_dot_spills(measured, arch):
    r = measured[arch, "dot_fp32_ieee"]
    assert r.spills and r.spill_store_bytes > 0 and r.spill_load_bytes > 0
    assert r.stack_bytes > 0  # the spilled values live in the local-memory stack frame
    assert r.tensor_core_instructions == 0  # ieee fp32 is an FMA loop, no tensor cores


def test_missing_ptxas_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(resources, "_ptxas_path", lambda: None)
    assert not ptxas_available()
    with pytest.raises(RuntimeError, match=r"ptxas.*pip install triton"):
        kernel_resources(PROBES["elementwise"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_kernel_configs_do_not_spill(measured, arch, name):
    r = measured[arch, name]
    assert not r.spills, (
        f"{name} on sm_{arch}: {r.registers} registers, {r.spill_store_bytes} B spill stores, "
        f"{r.spill_load_bytes} B spill loads with {r.num_warps} warps"
    )
    assert r.tensor_core_instructions == 0  # all four ops are memory-bound, FMA-only
