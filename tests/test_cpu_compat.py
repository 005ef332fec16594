"""The CPU compatibility layer: active only without CUDA, and each redirection does what CUDA would."""

import subprocess
import sys
import textwrap

from helpers import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cuda_requests_run_on_the_cpu():
    proc = run_python("""
        import torch
        from pretrain import cpu_compat
        assert not cpu_compat.is_active()
        assert cpu_compat.enable() and cpu_compat.is_active()
        a = torch.zeros(3, device="cuda")
        b = torch.empty(2, device=torch.cuda.current_device())
        c = torch.ones(2, device=torch.device("cuda", 0)).cuda()
        d = torch.arange(4).to("cuda")
        assert all(t.device.type == "cpu" for t in (a, b, c, d))
        # megatron-core's type assertions see CUDA names; explicit conversions still work
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        # streams and events are ordered no-ops; elapsed time is measured
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); e1.record(); torch.cuda.synchronize()
        assert e0.elapsed_time(e1) >= 0
        # the CUDA generator is the CPU generator dropout uses
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        x = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(x, torch.rand(3))
        torch.manual_seed(5)
        assert torch.equal(x, torch.rand(3))
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_inactive_when_cuda_is_available():
    proc = run_python("""
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from pretrain import cpu_compat
        assert cpu_compat.enable() is False and not cpu_compat.is_active()
        assert torch.cuda.current_device is original
        assert torch.ones(1).type() == "torch.FloatTensor"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr


def test_megatron_rng_tracker_forks_the_cpu_generator():
    """Dropout inside the model-parallel RNG region draws from its own stream and restores the default one."""
    proc = run_python("""
        import torch
        from pretrain import cpu_compat
        cpu_compat.enable()
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("mp", 123)
        torch.manual_seed(0)
        with tracker.fork("mp"):
            inside = torch.rand(4)
        after = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(4))       # default stream untouched by the fork
        torch.manual_seed(123)
        assert torch.equal(inside, torch.rand(4))      # the fork used seed 123
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr


def test_gradient_clipping_and_distributed_optimizer_type_checks_pass(tmp_path):
    """megatron-core's clip_grad_by_total_norm_fp32 asserts CUDA float grads; on CPU it clips."""
    proc = run_python("""
        import torch
        from pretrain import cpu_compat
        cpu_compat.enable()
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 3.0)
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
        assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
