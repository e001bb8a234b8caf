from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()  # before any module defines a Triton kernel
