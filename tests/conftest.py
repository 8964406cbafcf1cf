import os

import pytest
import torch

# tests are CPU-only and single-threaded per worker (CI runs `pytest -n 2` on 2 cores)
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run through Triton's interpreter on CPU tensors where there is no GPU (read when a kernel is defined)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Planner calibrations and acceptance statistics go to a temporary cache, not the user's."""
    os.environ["HF_SPECDEC_CACHE"] = str(tmp_path_factory.mktemp("hf_specdec_cache"))


@pytest.fixture
def free_loop(monkeypatch):
    """The planner sees a speculative loop that costs nothing besides the forwards (tests of the latency model and of
    the step corrections, whose fake hardware makes tiny models' forwards far cheaper than any real loop)."""
    from hf_specdec.planner import loop_cost
    from hf_specdec.planner.loop_cost import TERMS, LoopCost

    monkeypatch.setattr(loop_cost, "loop_cost", lambda *args, **kwargs: LoopCost((0.0,) * len(TERMS), 0.0))
