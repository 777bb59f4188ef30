import os
import random
import zlib

import pytest
import torch

# Fresh random inputs on every run, reproducible: each test's seed is crc32(test id) ^ the run's base
# seed, printed in the header. DSMOE_TEST_SEED=<base> replays a run.
_BASE_SEED = int(os.environ.get("DSMOE_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def pytest_report_header(config):
    return f"dsmoe test seed: DSMOE_TEST_SEED={_BASE_SEED}"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ _BASE_SEED) % (2**31))
    yield
