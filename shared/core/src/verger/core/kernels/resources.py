"""What a Triton kernel costs on a GPU, found without one: registers, spills, tensor-core use.

``kernel_resources`` compiles a ``@triton.jit`` function ahead of time for an NVIDIA
architecture (the Triton wheel ships ``ptxas``, so no GPU and no CUDA toolkit are needed) and
reads the register count and spill traffic from ``ptxas -v``. Register spills to local memory
are the classic way a correct kernel becomes 10-50x slower than it should be, so tests can
assert "no spills" on every shipped configuration and catch a slow kernel on a CPU-only CI.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KernelConfig", "KernelResources", "kernel_resources", "ptxas_available"]


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled kernel configuration (per thread unless stated)."""

    name: str
    arch: int
    num_warps: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int  # per program (CTA), as Triton allocates it
    tensor_core_instructions: int  # mma.sync + wgmma in the PTX (0: the dots run on FMA units)

    @property
    def spills(self) -> bool:
        """True when registers overflow to local memory."""
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def _ptxas_path(arch: int = 90) -> str | None:
    """The ptxas Triton itself uses for ``sm_<arch>``.

    Triton bundles two (``ptxas`` and ``ptxas-blackwell``) and picks one per architecture;
    the choice changed between releases (3.9 compiles sm_90 with the newer one, whose PTX
    version the older ptxas rejects), so ask Triton rather than hard-code a file name.
    """
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # an older or newer Triton without get_ptxas(arch): the bundled default
        pass
    return path if path and os.access(path, os.X_OK) else None


def ptxas_available() -> bool:
    """True when Triton's NVIDIA backend and its bundled ``ptxas`` are installed."""
    return _ptxas_path() is not None


_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class KernelConfig:
    """One compilation: a ``@triton.jit`` function, its argument types and launch options.

    ``signature`` maps each runtime argument to a Triton type (``"*fp16"``, ``"*fp32"``,
    ``"i32"``, ``"fp32"``...); ``constexprs`` gives the ``tl.constexpr`` arguments (ints,
    strings, bools).
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def kernel_resources(*configs: KernelConfig, arch: int = 90) -> list[KernelResources]:
    """Compile each configuration for ``sm_<arch>`` and report its resources.

    Runs in a subprocess when ``TRITON_INTERPRET=1`` is set (the interpreter replaces the
    compiler's language hooks in this process). Raises ``RuntimeError`` when Triton's NVIDIA
    backend or ``ptxas`` is missing, or compilation fails.
    """
    if _ptxas_path() is None:
        raise RuntimeError(
            "kernel_resources needs the ptxas that ships in triton's NVIDIA backend "
            "(triton/backends/nvidia/bin/ptxas); it is missing: pip install triton"
        )
    jobs = [
        {
            "module": _unwrap(c.fn).__module__,
            "name": _unwrap(c.fn).__name__,
            "file": inspect.getsourcefile(_unwrap(c.fn)),
            "signature": c.signature,
            "constexprs": c.constexprs,
            "num_warps": c.num_warps,
            "num_stages": c.num_stages,
            "arch": arch,
        }
        for c in configs
    ]
    if os.environ.get("TRITON_INTERPRET") != "1":
        return [_compile(job) for job in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run(
        [sys.executable, "-m", "verger.core.kernels.resources"],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kernel compilation failed:\n{done.stderr[-4000:]}")
    return [KernelResources(**r) for r in json.loads(done.stdout)]


def _unwrap(fn: Any) -> Any:
    """The Python function behind a JITFunction / InterpretedFunction."""
    return getattr(fn, "fn", fn)


_FILE_MODULES: dict[str, Any] = {}


def _load(module: str, name: str, file: str | None) -> Any:
    """The kernel by module name, else from its source file: the subprocess cannot import a
    script's ``__main__`` or a pytest (importlib mode) test module by name."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        if file is None:
            raise
    if file not in _FILE_MODULES:
        spec = importlib.util.spec_from_file_location(f"_kernel_source_{len(_FILE_MODULES)}", file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name} from {file}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _FILE_MODULES[file] = mod
    return getattr(_FILE_MODULES[file], name)


def _compile(job: dict[str, Any]) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = _load(job["module"], job["name"], job.get("file"))
    if not isinstance(fn, JITFunction):
        fn = JITFunction(_unwrap(fn))
    constexprs = job["constexprs"]
    signature = {**job["signature"], **dict.fromkeys(constexprs, "constexpr")}
    arch = job["arch"]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
    )
    ptx = compiled.asm["ptx"]
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        # The flags Triton itself passes (its register-allocation workaround included), so the
        # counts are those of the kernel Triton would load.
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]
        result = subprocess.run(
            [str(_ptxas_path(arch)), *flags, path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    stack = _PTXAS_STACK.search(log)
    regs = _PTXAS_REGS.search(log)
    if stack is None or regs is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return KernelResources(
        name=job["name"],
        arch=arch,
        num_warps=job["num_warps"],
        registers=int(regs.group(1)),
        stack_bytes=int(stack.group(1)),
        spill_store_bytes=int(stack.group(2)),
        spill_load_bytes=int(stack.group(3)),
        shared_bytes=int(compiled.metadata.shared),
        tensor_core_instructions=ptx.count("mma.sync") + ptx.count("wgmma.mma_async"),
    )


if __name__ == "__main__":  # the subprocess side of kernel_resources under the interpreter
    print(json.dumps([asdict(_compile(job)) for job in json.loads(sys.stdin.read())]))
