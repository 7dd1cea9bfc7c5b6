"""Which device each stage gets, and the errors for devices that do not exist. (What runs on
GPUs is in test_cuda.py, which needs one.)"""

import pytest
import torch

from ddgpipe.core.streams import receive, send
from ddgpipe.errors import UsageError
from ddgpipe.runtime.devices import describe, rank_device, resolve_device, stage_devices

cuda = torch.cuda.is_available()


def test_cpu_everywhere_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert stage_devices(3, "auto") == [torch.device("cpu")] * 3
    assert rank_device("auto") == torch.device("cpu")
    assert describe(stage_devices(2, "cpu")) == "cpu"


@pytest.mark.parametrize("spec, message", [
    ("tpu", "unknown device 'tpu'"),
    ("mps", "not supported"),
    ("cuda", "no CUDA device is available"),
    ("cuda:3", "no CUDA device is available"),
])
def test_devices_that_cannot_be_used_are_named(spec, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=message):
        resolve_device(spec)


def test_one_device_per_stage_or_an_error():
    assert stage_devices(2, devices=["cpu", "cpu"]) == [torch.device("cpu")] * 2
    with pytest.raises(UsageError, match="names 1 device"):
        stage_devices(2, devices=["cpu"])


def test_bare_cuda_spreads_stages_over_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert stage_devices(3, "cuda") == [torch.device("cuda", k) for k in (0, 1, 0)]
    assert stage_devices(2, "cuda:1") == [torch.device("cuda", 1)] * 2
    with pytest.raises(UsageError, match="this machine has 2 CUDA"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 1)


def test_a_handoff_on_the_cpu_is_the_tensor_itself():
    x = torch.randn(3)
    assert receive(send(x), torch.device("cpu")) is x
