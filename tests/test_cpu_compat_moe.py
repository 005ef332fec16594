"""The CPU layer's MoE redirections: each gives what the CUDA/NCCL path it replaces gives."""

import subprocess
import sys
import textwrap

from helpers import REPO, free_port


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def run_ranks(tmp_path, code: str, nproc: int) -> subprocess.CompletedProcess:
    """Run ``code`` on ``nproc`` torchrun ranks, its process groups torn down however it ends."""
    script = tmp_path / "ranks.py"
    body = textwrap.indent(textwrap.dedent(code), "    ")
    script.write_text(f"from pretrain.platform import process_group_teardown\n"
                      f"with process_group_teardown():\n{body}")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(free_port()), str(script)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def test_router_gating_linear_runs_without_transformer_engine():
    """te_general_gemm is bound to None, so the router uses torch.mm: logits = x W^T, with its gradients."""
    proc = run_python("""
        import torch
        from pretrain import cpu_compat
        from megatron.core.transformer.moe import moe_utils
        assert not hasattr(moe_utils, "te_general_gemm")   # megatron-core 0.16 without TE: NameError in the router
        cpu_compat.enable()
        assert moe_utils.te_general_gemm is None
        torch.manual_seed(0)
        x = torch.randn(5, 3, 8, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
        logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
        assert logits.dtype == torch.float32 and logits.shape == (5, 3, 4)
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = xr @ wr.t()
        assert torch.equal(logits, ref)
        g = torch.randn_like(ref)
        logits.backward(g)
        ref.backward(g)
        assert torch.equal(x.grad, xr.grad.to(torch.bfloat16)) and torch.equal(w.grad, wr.grad.to(torch.bfloat16))
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_split_sizes_reach_the_host_as_numpy_copies():
    """The all-to-all dispatcher's split sizes become host numpy arrays, as the CUDA path makes them."""
    proc = run_python("""
        import numpy as np
        import torch
        from pretrain import cpu_compat
        cpu_compat.enable()
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
        splits = torch.tensor([3, 0, 5])
        host = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True, record_stream=True)
        assert isinstance(host, np.ndarray) and host.tolist() == [3, 0, 5]
        splits[0] = 9                                   # a copy, like a device-to-host transfer
        assert host.tolist() == [3, 0, 5]
        counts = torch.tensor([1, 2])
        assert moe_utils.maybe_move_tensor_to_cpu(counts) is counts    # tensors stay tensors unless asked
        assert moe_utils.maybe_move_tensor_to_cpu(None, as_numpy=True) is None
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_uneven_gather_and_reduce_scatter_on_gloo(tmp_path):
    """megatron-core's uneven sequence-parallel gather / reduce-scatter (expert TP in the all-to-all
    dispatcher) on 3 gloo ranks, one of them empty: equal to the concatenation / the sum they stand for,
    forward and backward."""
    proc = run_ranks(tmp_path, """
        import torch
        import torch.distributed as dist
        from pretrain import cpu_compat
        cpu_compat.enable()
        from megatron.core.tensor_parallel import mappings
        from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                            reduce_scatter_to_sequence_parallel_region)
        dist.init_process_group("gloo")
        group = dist.new_group(list(range(dist.get_world_size())))
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = [2, 0, 3]

        def rows(r, n):  # what rank r holds; every rank can compute every rank's input
            g = torch.Generator().manual_seed(100 + r)
            return torch.randn(n, 4, generator=g)

        # all-gather: the concatenation of every rank's rows, bit for bit
        mine = rows(rank, sizes[rank]).requires_grad_()
        gathered = gather_from_sequence_parallel_region(mine, group=group, output_split_sizes=sizes)
        assert torch.equal(gathered, torch.cat([rows(r, n) for r, n in enumerate(sizes)]))
        # its backward is the uneven reduce-scatter: the sum over ranks of this rank's chunk of the grads
        def grads(r):
            g = torch.Generator().manual_seed(200 + r)
            return torch.randn(sum(sizes), 4, generator=g)
        gathered.backward(grads(rank))
        start = sum(sizes[:rank])
        expected = sum(grads(r)[start : start + sizes[rank]] for r in range(world))
        assert torch.allclose(mine.grad, expected, rtol=0, atol=1e-6), (mine.grad, expected)

        # reduce-scatter forward (the dispatcher's combine) and its backward (the uneven gather)
        full = grads(rank).requires_grad_()
        part = reduce_scatter_to_sequence_parallel_region(full, group=group, input_split_sizes=sizes)
        assert part.shape == (sizes[rank], 4)
        assert torch.allclose(part, expected, rtol=0, atol=1e-6)
        part.backward(rows(rank, sizes[rank]))
        assert torch.equal(full.grad, torch.cat([rows(r, n) for r, n in enumerate(sizes)]))

        # equal splits (None) still go through megatron-core's own collectives
        even = gather_from_sequence_parallel_region(rows(rank, 2), group=group)
        assert torch.equal(even, torch.cat([rows(r, 2) for r in range(world)]))
        assert hasattr(mappings._gather_along_first_dim, "__wrapped__")  # the CPU layer's wrapper is installed
        dist.barrier()
        print(f"rank {rank} ok")
    """, nproc=3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == 3


def test_moe_patches_are_not_installed_when_cuda_is_available():
    proc = run_python("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron.core.tensor_parallel import mappings
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
        gather, move = mappings._gather_along_first_dim, token_dispatcher.maybe_move_tensor_to_cpu
        from pretrain import cpu_compat
        assert cpu_compat.enable() is False
        assert mappings._gather_along_first_dim is gather and token_dispatcher.maybe_move_tensor_to_cpu is move
        assert not hasattr(moe_utils, "te_general_gemm")
        # the router fallback alone is device-independent: a GPU without TE needs it too
        cpu_compat.ensure_router_gemm_fallback()
        assert moe_utils.te_general_gemm is None
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
