"""The direct Triton launcher: it reuses a compiled kernel only for the specialization it was
compiled for, and passes the launcher every parameter in signature order."""

from types import SimpleNamespace

import pytest
import torch

from verger.fast_attention.ops import _launch
from verger.fast_attention.ops._launch import Launcher

pytest.importorskip("triton")
if not _launch._SUPPORTED:
    pytest.skip("the direct launch path needs Triton >= 3.4", allow_module_level=True)


class _Compiled:
    """Stands for a CompiledKernel: records what its launcher is given."""

    function, packed_metadata = "fn-handle", "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, args)

    def run(self, *args):
        self.log.append(("direct", args))


class _Kernel:
    """Stands for a JITFunction ``k(x_ptr, n, eps, BLOCK: constexpr, EVEN: constexpr = True)``
    (``BLOCK`` first with ``constexpr_first``)."""

    def __init__(self, compiles=True, constexpr_first=False):
        self.params = [SimpleNamespace(name=n, is_constexpr=c, default=d) for n, c, d in (
            ("x_ptr", False, None), ("n", False, None), ("eps", False, None),
            ("BLOCK", True, None), ("EVEN", True, True))]  # fmt: skip
        if constexpr_first:
            self.params.insert(0, self.params.pop(3))
        self.log, self.compiles = [], compiles

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, dict(meta)))
            return _Compiled(self.log) if self.compiles else None  # None: the interpreter

        return run


@pytest.fixture(autouse=True)
def _no_driver(monkeypatch):
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 7)


def _kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_call_goes_straight_to_the_launcher_with_every_parameter_in_order():
    kernel = _Kernel()
    launch = Launcher(kernel, direct=True)
    x = torch.zeros(64)
    meta = {"BLOCK": 32, "num_warps": 4}
    launch((2,), (x, 64, 1e-6), meta)
    launch((2,), (x, 64, 1e-6), meta)
    assert _kinds(kernel) == ["jit", "direct"]
    assert kernel.log[0] == ("jit", (2,), (x, 64, 1e-6), meta)
    args = kernel.log[1][1]
    # grid padded to 3 axes, stream, handles, the launch metadata (for launch hooks); hooks;
    # then x, n, eps, BLOCK and the constexpr left at its default
    full = (x, 64, 1e-6, 32, True)
    assert args[:7] == (2, 1, 1, 7, "fn-handle", "packed", ("metadata", (2, 1, 1), 7, full))
    assert args[9:] == full


@pytest.mark.parametrize(
    "change",
    ["misaligned", "dtype", "int", "meta"],
)
def test_a_new_specialization_compiles_again(change):
    kernel = _Kernel()
    launch = Launcher(kernel, direct=True)
    x, n, meta = torch.zeros(64), 64, {"BLOCK": 32}
    launch((1,), (x, n, 1e-6), meta)
    if change == "misaligned":  # contiguous, but 4 bytes past a 16-byte boundary
        x = torch.zeros(65)[1:]
        assert x.is_contiguous() and x.data_ptr() % 16
    elif change == "dtype":
        x = torch.zeros(64, dtype=torch.float16)
    elif change == "int":
        n = 48
    else:
        meta = {"BLOCK": 16}
    launch((1,), (x, n, 1e-6), meta)
    launch((1,), (x, n, 1e-6), meta)
    assert _kinds(kernel) == ["jit", "jit", "direct"]


def test_a_float_argument_is_not_part_of_the_key():
    kernel = _Kernel()  # Triton compiles fp32 scalars as runtime values
    launch = Launcher(kernel, direct=True)
    x = torch.zeros(64)
    launch((1,), (x, 64, 1e-6), {"BLOCK": 32})
    launch((1,), (x, 64, 1e-3), {"BLOCK": 32})
    assert _kinds(kernel) == ["jit", "direct"]
    assert kernel.log[1][1][-3] == 1e-3


@pytest.mark.parametrize(
    "direct, compiles, constexpr_first, args",
    [
        (False, True, False, (torch.zeros(4), 4, 0.0)),  # asked not to
        (True, False, False, (torch.zeros(4), 4, 0.0)),  # the interpreter compiles nothing
        (True, True, True, (torch.zeros(4), 4, 0.0)),  # a constexpr before runtime args
        (True, True, False, (None, 4, 0.0)),  # no tensor to take the device from
    ],
)
def test_otherwise_every_call_binds_through_triton(direct, compiles, constexpr_first, args):
    kernel = _Kernel(compiles=compiles, constexpr_first=constexpr_first)
    launch = Launcher(kernel, direct=direct)
    for _ in range(3):
        launch((1,), args, {"BLOCK": 4})
    assert _kinds(kernel) == ["jit"] * 3
