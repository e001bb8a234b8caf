"""The shipped Triton configurations compiled for A100 (sm_80) and H100 (sm_90), no GPU needed.

A kernel that spills registers to local memory is correct but many times slower: the first
GPU version of these kernels ran its fp32 dots on FMA units with kilobytes of spills per thread
and was 5-12x slower than SDPA. These tests compile exactly what the launches use
(``_Plan.meta``) and bound the spills, and check that every dot runs on tensor cores.
On sm_80 the mma.sync lowering of the 3xTF32 dots at 64-position chunks makes ptxas fall back
to 32 registers and spill kilobytes (the same PTX does so when assembled for sm_90), so the
plan picks 32-position chunks there: these tests hold it to that.
"""

import pytest
import torch

from verger.core.kernels.resources import KernelConfig, kernel_resources, ptxas_available
from verger.fast_attention.ops.causal_linear import triton as kernels

# slow: ptxas compiles every configuration (minutes on 2 CPU cores); run with -m slow, and
# by tests_latest (marker ptxas), which a new Triton must pass (issue 19)
pytestmark = [
    pytest.mark.skipif(
        not kernels.HAS_TRITON or not ptxas_available(), reason="needs triton's NVIDIA backend"
    ),
    pytest.mark.slow,
    pytest.mark.ptxas,
]

SIZES = {"n": "i32", "dk": "i32", "dv": "i32", "n_chunks": "i32", "e_size": "i32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _configs(
    dtype: str, head_dim: int, arch: int = 90, fused: bool = False
) -> list[tuple[str, KernelConfig]]:
    """The launches of one plan: on features (fp32 outputs), or with elu+1 fused on raw q, k
    (``linear_attention``'s CUDA path; outputs and gradients in the inputs' dtype)."""
    x = torch.empty(1, 1, 256, head_dim, dtype=DTYPES[dtype])
    plan = kernels._Plan(
        x, x, kernels.DEFAULT_CHUNK, None, arch=arch, feature_map="elu" if fused else None
    )
    t, f = f"*{dtype}", "*fp32"
    o = t if fused else f
    signatures = {
        "states": {"k_ptr": t, "v_ptr": t, "states_ptr": f, **SIZES},
        "forward": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "states_ptr": f, "out_ptr": o,
                    "res_ptr": o, "d_ptr": f, **SIZES, "eps": "fp32"},
        "backward_states": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "out_ptr": o,
                            "res_ptr": o, "d_ptr": f, "w_ptr": f, "states_ptr": f, "rev_ptr": f, **SIZES},
        "grads": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "d_ptr": f, "w_ptr": f,
                  "states_ptr": f, "rev_ptr": f, "dq_ptr": o, "dk_ptr": o, "dv_ptr": o,
                  **SIZES},
    }  # fmt: skip
    fns = {
        "states": kernels._chunk_states_kernel,
        "forward": kernels._forward_kernel,
        "backward_states": kernels._backward_states_kernel,
        "grads": kernels._grads_kernel,
    }
    out = []
    for name, fn in fns.items():
        # a 16-bit output is saved with its rounding residual (fused path)
        meta = dict(plan.meta(name, normalize=True, residual=fused and dtype != "fp32"))
        warps = meta.pop("num_warps")
        out.append((name, KernelConfig(fn, signatures[name], meta, num_warps=warps)))
    out.append(
        ("scan", KernelConfig(kernels._exclusive_scan_kernel,
                              {"states_ptr": f, "rev_ptr": f, "n_chunks": "i32", "e_size": "i32"},
                              dict(kernels.SCAN_META)))
    )  # fmt: skip
    return out


# (arch, dtype, head dim, fused elu+1, spill bytes allowed): none at the common head dims; a
# little where the 3xTF32 state products fill the register file (sm_90 at head dim 128, where
# the one gradient launch holds the dq, dk and dv branches: ~150 bytes; fp32 on sm_80).
CASES = [(90, "fp16", 64, False, 0), (90, "bf16", 64, False, 0), (90, "fp32", 64, False, 0),
         (90, "fp16", 256, False, 0), (90, "fp16", 128, False, 160), (80, "fp16", 64, False, 0),
         (80, "fp32", 64, False, 64), (80, "fp16", 128, False, 0), (90, "fp16", 64, True, 0),
         (90, "bf16", 64, True, 0), (90, "fp32", 64, True, 0), (90, "fp16", 128, True, 160),
         (80, "fp16", 64, True, 0)]  # fmt: skip


@pytest.fixture(scope="module")
def resources():
    got = {}
    for arch in sorted({case[0] for case in CASES}):
        labelled = {
            (arch, dtype, dim, fused): _configs(dtype, dim, arch, fused)
            for a, dtype, dim, fused, _ in CASES
            if a == arch
        }
        flat = [(key, label, cfg) for key, items in labelled.items() for label, cfg in items]
        results = kernel_resources(*(cfg for *_, cfg in flat), arch=arch)
        got.update({(*key, label): res for (key, label, _), res in zip(flat, results)})
    return got


@pytest.mark.parametrize("arch, dtype, head_dim, fused, allowed", CASES)
def test_shipped_kernels_do_not_spill_and_use_tensor_cores(
    resources, arch, dtype, head_dim, fused, allowed
):
    for (a, dt, dim, fu, label), res in resources.items():
        if (a, dt, dim, fu) != (arch, dtype, head_dim, fused):
            continue
        spilled = max(res.spill_store_bytes, res.spill_load_bytes)
        limit = 0 if label in ("states", "backward_states", "scan") else allowed
        assert spilled <= limit, f"{label} sm_{arch} {dtype} D={head_dim} {fused=}: {res}"
        if label != "scan":
            assert res.tensor_core_instructions > 0, f"{label} runs its dots on FMA units: {res}"


def _gathered_configs(dtype: str, head_dim: int, backward: bool, causal: bool) -> KernelConfig:
    from verger.fast_attention.ops.gathered_attention import triton as gathered

    meta = gathered.launch_meta(
        64, head_dim, head_dim, DTYPES[dtype], True, backward=backward, causal=causal
    )
    warps = meta.pop("num_warps")
    t, f = f"*{dtype}", "*fp32"
    sig = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "rows_ptr": "*i64", "ok_ptr": "*i8",
           "qpos_ptr": "*i64", "kpos_ptr": "*i64", "out_ptr": f, "lse_ptr": f}  # fmt: skip
    sizes = {"n_w": "i32", "n_keys": "i32", "dim": "i32", "dim_v": "i32", "scale": "fp32"}
    if backward:
        grads = {"do_ptr": t, "dq_ptr": f, "dk_ptr": f, "dv_ptr": f}
        return KernelConfig(gathered._gathered_bwd_kernel, {**sig, **grads, **sizes}, meta, warps)
    return KernelConfig(gathered._gathered_fwd_kernel, {**sig, **sizes}, meta, warps)


# Improved clustered attention computes in fp32; fp16 for direct users of gathered_attention.
# (dtype, head dim, spill bytes allowed): a few bytes for the causal backward in fp32 on sm_80
# and at head dim 128 (it holds q, do, dq, positions and a key block at once).
GATHERED = [("fp32", 64, 16), ("fp16", 64, 0), ("fp16", 128, 16)]


def test_gathered_attention_kernels_do_not_spill():
    configs = {
        (arch, dtype, dim, allowed, backward, causal): _gathered_configs(
            dtype, dim, backward, causal
        )
        for arch in (80, 90)
        for dtype, dim, allowed in GATHERED
        for backward in (False, True)
        for causal in (False, True)
    }
    for arch in (80, 90):
        keys = [key for key in configs if key[0] == arch]
        for key, res in zip(keys, kernel_resources(*(configs[k] for k in keys), arch=arch)):
            spilled = max(res.spill_store_bytes, res.spill_load_bytes)
            assert spilled <= key[3], f"gathered attention {key}: {res}"
            assert res.tensor_core_instructions > 0, f"gathered attention {key}: {res}"


def _sequential_configs(dtype: str, arch: int) -> list[tuple[str, KernelConfig]]:
    """The sequential schedule's three launches at head dim 64 with elu+1 fused."""
    from verger.fast_attention.ops.causal_linear import triton_sequential as seq

    x = torch.empty(1, 1, 256, 64, dtype=DTYPES[dtype])
    plan = kernels._Plan(x, x, kernels.DEFAULT_CHUNK, None, arch=arch, feature_map="elu")
    t, f = f"*{dtype}", "*fp32"
    dims = {"n": "i32", "dk": "i32", "dv": "i32"}
    signatures = {
        "forward": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "out_ptr": t, "res_ptr": t, "d_ptr": f,
                    **dims, "eps": "fp32"},
        "dq": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "out_ptr": t, "res_ptr": t,
               "d_ptr": f, "w_ptr": f, "dq_ptr": t, **dims},
        "dkv": {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "d_ptr": f, "w_ptr": f,
                "dk_ptr": t, "dv_ptr": t, **dims},
    }  # fmt: skip
    fns = {"forward": seq._seq_forward_kernel, "dq": seq._seq_dq_kernel,
           "dkv": seq._seq_dkv_kernel}  # fmt: skip
    out = []
    for name, fn in fns.items():
        meta = seq.sequential_meta(plan, name, residual=dtype != "fp32")
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        out.append((name, KernelConfig(fn, signatures[name], meta, warps, stages)))
    return out


def test_sequential_schedule_kernels_do_not_spill_and_use_tensor_cores():
    # sm_90 only (the schedule refuses older GPUs: there these kernels spill 0.1-4 KB);
    # a few bytes allowed where the 3xTF32 state products fill the register file
    allowed = {"fp16": 0, "bf16": 8, "fp32": 32}
    labelled = [(dtype, *item) for dtype in DTYPES for item in _sequential_configs(dtype, 90)]
    results = kernel_resources(*(cfg for *_, cfg in labelled), arch=90)
    for (dtype, label, _), res in zip(labelled, results):
        spilled = max(res.spill_store_bytes, res.spill_load_bytes)
        assert spilled <= allowed[dtype], f"sequential {label} sm_90 {dtype}: {res}"
        assert res.tensor_core_instructions > 0, f"sequential {label} runs on FMA units: {res}"
