import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: none may rely on, or write into, the working directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny two-expert model saved in the real diffusers layout (boundary_ratio 0.875)."""
    from wan_grpo.models.tiny import save_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-wan22")
    save_tiny_pipeline(path, seed=0, boundary_ratio=0.875)
    return path


@pytest.fixture(scope="session")
def tiny_components():
    from wan_grpo.models.tiny import build_tiny_components

    return build_tiny_components(0)
