import torch

from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()  # before anything imports a Triton kernel (verger.core.nn)
torch.set_num_threads(1)  # small ops on small shared machines: threads only contend


_MULTIPROCESS_FILES = {
    "test_cli.py",
    "test_distributed.py",
    "test_deepspeed.py",
    "test_torchft.py",
}


def pytest_collection_finish(session):
    """Start the forkserver once with torch._dynamo and torchft imported, when the selected
    tests start processes: every child (run_multiprocess's too) is then a plain fork instead
    of importing them again (tens of seconds per launch on a loaded 2-core machine)."""
    if any(item.path.name in _MULTIPROCESS_FILES for item in session.items):
        from verger.sparse_diloco.torchft_launch import start_forkserver

        start_forkserver()
