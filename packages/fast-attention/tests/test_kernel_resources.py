"""The shipped Triton configurations compiled for H100/H200 (sm_90), no GPU needed.

A kernel that spills registers to local memory is correct but many times slower: the first
GPU version of these kernels ran its fp32 dots on FMA units with kilobytes of spills per thread
and was 5-12x slower than SDPA. These tests compile exactly what the launches use
(``_Plan.meta``) and bound the spills, and check that every dot runs on tensor cores.
sm_80 is not checked: the bundled ptxas 13 allocates only 32 registers for some of these
kernels there (and for a plain 64x64 fp32 dot), which looks like a ptxas issue to verify on
an A100 before tuning for it.
"""

import pytest
import torch

from verger.core.kernels.resources import KernelConfig, kernel_resources, ptxas_available
from verger.fast_attention.ops.causal_linear import triton as kernels

pytestmark = pytest.mark.skipif(
    not kernels.HAS_TRITON or not ptxas_available(), reason="needs triton's NVIDIA backend"
)

SIZES = {"n": "i32", "dk": "i32", "dv": "i32", "n_chunks": "i32", "e_size": "i32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _configs(dtype: str, head_dim: int) -> list[tuple[str, KernelConfig]]:
    x = torch.empty(1, 1, 256, head_dim, dtype=DTYPES[dtype])
    plan = kernels._Plan(x, x, kernels.DEFAULT_CHUNK, None)
    t, f = f"*{dtype}", "*fp32"
    signatures = {
        "states": {"b_ptr": t, "c_ptr": t, "d_ptr": f, "w_ptr": f, "states_ptr": f, **SIZES},
        "forward": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "states_ptr": f, "out_ptr": f,
                    "d_ptr": f, **SIZES, "eps": "fp32"},
        "dq": {"k_ptr": t, "v_ptr": t, "do_ptr": t, "d_ptr": f, "w_ptr": f, "states_ptr": f,
               "dq_ptr": f, **SIZES},
        "dk": {"q_ptr": t, "v_ptr": t, "do_ptr": t, "d_ptr": f, "w_ptr": f, "states_ptr": f,
               "dk_ptr": f, **SIZES},
        "dv": {"q_ptr": t, "k_ptr": t, "do_ptr": t, "d_ptr": f, "states_ptr": f, "dv_ptr": f,
               **SIZES},
    }  # fmt: skip
    fns = {
        "states": kernels._chunk_states_kernel,
        "forward": kernels._forward_kernel,
        "dq": kernels._dq_kernel,
        "dk": kernels._dk_kernel,
        "dv": kernels._dv_kernel,
    }
    out = []
    for name, grad in [("states", False), ("states", True), ("forward", False), ("dq", False),
                       ("dk", False), ("dv", False)]:  # fmt: skip
        meta = plan.meta(name, normalize=True, grad=grad)
        warps = meta.pop("num_warps")
        label = f"{name}{'-grad' if grad else ''}"
        out.append((label, KernelConfig(fns[name], signatures[name], meta, num_warps=warps)))
    scan = plan.meta("scan", normalize=True, reverse=True)
    out.append(
        ("scan", KernelConfig(kernels._exclusive_scan_kernel,
                              {"states_ptr": f, "n_chunks": "i32", "e_size": "i32"}, scan))
    )  # fmt: skip
    return out


# (dtype, head dim, spill bytes allowed): none at the common head dims; a little at 128 where
# 32-position chunks with 3xTF32 state products fill the register file.
CASES = [("fp16", 64, 0), ("bf16", 64, 0), ("fp32", 64, 0), ("fp16", 256, 0),
         ("fp16", 128, 128)]  # fmt: skip


@pytest.fixture(scope="module")
def resources():
    labelled = {(dtype, dim): _configs(dtype, dim) for dtype, dim, _ in CASES}
    flat = [(key, label, cfg) for key, items in labelled.items() for label, cfg in items]
    results = kernel_resources(*(cfg for *_, cfg in flat), arch=90)
    return {(*key, label): res for (key, label, _), res in zip(flat, results)}


@pytest.mark.parametrize("dtype, head_dim, allowed", CASES)
def test_shipped_kernels_do_not_spill_and_use_tensor_cores(resources, dtype, head_dim, allowed):
    for (dt, dim, label), res in resources.items():
        if (dt, dim) != (dtype, head_dim):
            continue
        spilled = max(res.spill_store_bytes, res.spill_load_bytes)
        limit = 0 if label.startswith(("states", "scan")) else allowed
        assert spilled <= limit, f"{label} sm_90 {dtype} D={head_dim}: {res}"
        if label != "scan":
            assert res.tensor_core_instructions > 0, f"{label} runs its dots on FMA units: {res}"
