import torch

from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()  # before anything imports a Triton kernel
torch.set_num_threads(1)  # tiny models on small shared machines: threads only contend
