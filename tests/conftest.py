import os
import warnings

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so parallel runs do not thrash.
torch.set_num_threads(int(os.environ.get("PEFTKIT_TEST_THREADS", "1")))
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
