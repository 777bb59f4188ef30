import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, yet reproducible from the printed seed when a test fails.
    seed = int(os.environ.get("DSMOE_TEST_SEED", "0")) or (abs(hash(request.node.nodeid)) % (2**31))
    torch.manual_seed(seed)
    yield
