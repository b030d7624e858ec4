"""Out-of-range ids on CUDA: a device-side assert stops the process before any kernel reads out of bounds.

On CUDA, kernels._utils.check_ids raises no ValueError (that would need a host sync on every call); it
queues torch._assert_async, and the CUDA context dies with the message. That ends every later CUDA call in
the process, so it runs in a child process here. The ValueError path (CPU) is in each kernel's tests.
"""

import os
import subprocess
import sys

import pytest
from kernel_checks import DEVICE

CASES = {
    "selective_logprob": "selective_logprob(torch.randn(4, 100, device='cuda'), torch.tensor([0, 1, 100, 2], "
    "device='cuda'))",
    "linear_logprob": "linear_logprob(torch.randn(3, 8, device='cuda'), torch.randn(40, 8, device='cuda'), "
    "torch.tensor([0, -1, 2], device='cuda'))",
    "policy_loss seq_ids": "policy_loss(*[torch.randn(4, device='cuda')] * 3, torch.ones(4, dtype=torch.bool, "
    "device='cuda'), aggregation='seq-mean-token-mean', seq_ids=torch.tensor([0, -1, 0, 0], device='cuda'))",
}


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the device-side assert is CUDA's; the CPU raises ValueError")
@pytest.mark.parametrize("case", CASES)
def test_bad_ids_stop_a_cuda_process(case):
    code = ("import torch\nfrom rptfast.kernels import linear_logprob, policy_loss, selective_logprob\n"
            f"out = {CASES[case]}\ntorch.cuda.synchronize()\nprint('no error')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
    assert r.returncode != 0 and "no error" not in r.stdout, r.stdout
    assert "device-side assert" in r.stderr, r.stderr[-2000:]
