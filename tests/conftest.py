import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llava():
    import interp
    from interp import tiny
    model, proc = tiny.build_llava()
    return interp.load(model, proc)


@pytest.fixture(scope="session")
def organism():
    import interp
    return interp.load("organism")


@pytest.fixture(scope="session")
def small_probe(tmp_path_factory):
    from probes.build import shapes_probe
    out = tmp_path_factory.mktemp("probe")
    shapes_probe(out, n_items=6, seed=3, progress=False)
    return out
