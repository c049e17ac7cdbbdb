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


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A run started in-process sets torch's threads from its recipe (2 on this machine): a test after it in the
    same worker would then run on 2 threads beside the other worker's, and tiny-model tests slow down about tenfold
    (the guide's quick sweep took 320 s in the suite, 26 s alone)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _bnb_cpu_path():
    """PEFTKIT_TEST_BNB_CPU_PATH=packed|unpacked runs every 4-bit test on that bitsandbytes CPU kernel path
    (tests/bnb_paths.py); unset, each machine takes its own (packed where the CPU has AVX512-BF16)."""
    path = os.environ.get("PEFTKIT_TEST_BNB_CPU_PATH")
    if not path:
        yield None
        return
    import bnb_paths

    with pytest.MonkeyPatch.context() as patch:
        bnb_paths.force(path, patch)
        yield path


@pytest.fixture(params=["unpacked", "packed"])
def bnb_cpu_path(request, monkeypatch):
    """Parametrizes a test over both bitsandbytes CPU kernel paths: 4-bit layers built inside the test take it."""
    import bnb_paths

    bnb_paths.force(request.param, monkeypatch)
    return request.param
