import os

import pytest
import torch

# Triton kernels run through the interpreter on hosts without a GPU. The interpreter is chosen when a kernel
# is decorated, so this must happen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread per process beats thread synchronisation, and xdist runs processes side
# by side.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="GPU test: needs CUDA, run it on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
