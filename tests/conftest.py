import os
import random
import zlib

import tempfile

# NOTE: torch.compile's on-disk caches live in /tmp/torchinductor_<user> by default, shared by every run
# on the machine; a compiled backward cached from an earlier version of an op's autograd formula was
# seen being served after the formula changed. Each test session compiles into its own folder (and
# subprocesses inherit it) unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_CACHE = tempfile.mkdtemp(prefix="dsmoe-inductor-")
else:
    _OWN_CACHE = None

import pytest
import torch

from util import GPU_ON_CPU

# Fresh random inputs on every run, reproducible: each test's seed is crc32(test id) ^ the run's base
# seed, printed in the header. DSMOE_TEST_SEED=<base> replays a run.
_BASE_SEED = int(os.environ.get("DSMOE_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
_MUTATION = os.environ.get("DSMOE_TEST_MUTATION", "")


def pytest_report_header(config):
    head = f"dsmoe test seed: DSMOE_TEST_SEED={_BASE_SEED}"
    if GPU_ON_CPU:
        head += "\nDSMOE_TEST_GPU_ON_CPU=1: the gpu tier runs on the CPU against the references"
    if _MUTATION:
        head += f"\nDSMOE_TEST_MUTATION={_MUTATION}: an op is broken on purpose (tests/mutations.py)"
    return head


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: needs a real CUDA device even under DSMOE_TEST_GPU_ON_CPU=1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    skip_cuda_only = pytest.mark.skip(reason="needs a real CUDA device (graphs, streams, IPC): not run on the CPU")
    skip_not_ported = pytest.mark.skip(reason="module's GPU tests create CUDA tensors (they do not use util.DEV)")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if GPU_ON_CPU:
            if "cuda_only" in item.keywords:
                item.add_marker(skip_cuda_only)
            elif getattr(item.module, "DEV", None) != "cpu":
                item.add_marker(skip_not_ported)
        elif not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ _BASE_SEED) % (2**31))
    yield


if _MUTATION:
    @pytest.fixture(autouse=True)
    def _mutation(monkeypatch):
        import mutations

        mutations.apply(_MUTATION, monkeypatch)
        yield
