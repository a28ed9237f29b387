"""Shared fixtures: tiny real architectures with random weights."""

import pytest
import torch
from builders import TINY_DINO


@pytest.fixture
def tiny_dino():
    from custvid_core.representations.subject import build_dinov2

    torch.manual_seed(0)
    return build_dinov2(TINY_DINO, name="tiny")


@pytest.fixture(scope="session")
def tiny_raft():
    from custvid_core.representations.motion import build_raft

    torch.manual_seed(0)
    return build_raft("raft_small")
