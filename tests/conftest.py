"""Shared test setup.

Tiny models run fastest on one thread, and several torch processes each spinning on every core (the test run, a
helper, a demo) slow each other down by orders of magnitude on a 2-core machine: pin intra-op threads to one.
"""

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """The tiny-llava preset saved like a hub checkpoint (random weights, seed 0)."""
    from mmerase.models import build_preset

    return build_preset("tiny-llava", tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """The tiny-llama (text-only) preset saved like a hub checkpoint (random weights, seed 0)."""
    from mmerase.models import build_preset

    return build_preset("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), seed=0)
