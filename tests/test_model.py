"""dpolab.model: setting a process up for its device."""

import pytest
import torch

from dpolab.model import prepare_device


@pytest.fixture
def cudnn_attention_flag():
    """torch's SDPA backend flags are process-wide: put the flag back for the next test."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_turns_cudnn_attention_off_and_cpu_leaves_it(cudnn_attention_flag, monkeypatch):
    # The flag is a plain setting, so this runs without a GPU (torch is told it has one: a named
    # device torch cannot use is refused): what matters is that training on CUDA never meets
    # cuDNN attention's per-shape planning (BENCHMARKS.md, GPU section).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prepare_device("cpu") == "cpu"
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run changes nothing
    assert prepare_device("cuda") == "cuda"
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
