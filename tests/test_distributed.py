"""DistributedDataParallel on the CPU (gloo, two processes): the ranks end with identical delta weights,
equal to one process training on the combined batch, and rank 0 saves the delta. FSDP (its first API)
needs ``use_orig_params=True`` to shard a model whose parameters are partly frozen, and then trains it
to the same delta. Destroying the process group right after the epoch's all_reduce never deadlocks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import petl_surgery as ps

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
pytestmark = pytest.mark.xdist_group("ports")  # a local port: never beside another test that opens one
SURGERIES = [("bapat", {}), ("lora", {"targets": ["q", "v", "fc2"]})]


def build() -> torch.nn.Module:
    sys.path.insert(0, HERE)
    from conftest import make_vit, randomize

    model = make_vit()
    for method, options in SURGERIES:
        ps.apply(model, method, **options)
    for name, module in model.named_modules():
        if isinstance(module, ps.methods.PetlModule):
            randomize(module, std=0.05)
    return model.train()


def batch() -> tuple:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 64, 64, generator=generator), torch.randint(0, 5, (4,), generator=generator)


def train(model: torch.nn.Module, runner: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    # SGD: linear in the gradients, so rounding in the all-reduce stays at rounding level (Adam would
    # blow a gradient that is zero up to rounding into a full step of either sign)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(runner(x), y).backward()
        optimizer.step()


def delta(model: torch.nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        x, y = batch()
        half = len(x) // world
        mine = slice(rank * half, (rank + 1) * half)
        train(model, wrapped, x[mine], y[mine])
        torch.save(delta(model), os.path.join(folder, f"rank{rank}.pt"))
        if rank == 0:
            ps.save(wrapped.module, os.path.join(folder, "delta.safetensors"))

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        try:
            FSDP(build(), device_id=torch.device("cpu"))
            refused = ""
        except ValueError as error:
            refused = str(error)
        model = build()
        sharded = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        train(sharded, sharded, x[mine], y[mine])
        with FSDP.summon_full_params(sharded):
            torch.save({"refused": refused, "delta": delta(model)}, os.path.join(folder, f"fsdp{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_and_fsdp_ranks_agree_with_each_other_and_with_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")

    single = build()
    before = delta(single)
    x, y = batch()
    train(single, single, x, y)
    expected = delta(single)

    assert rank0.keys() == rank1.keys() == expected.keys()
    assert any(".petl_bapat" in n for n in expected) and any(".petl_lora" in n for n in expected)
    for name in expected:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(expected[n], before[n]) for n in expected)

    for rank in (0, 1):
        fsdp = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert "uniform `requires_grad`" in fsdp["refused"]  # without use_orig_params=True
        assert fsdp["delta"].keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(fsdp["delta"][name], expected[name], rtol=1e-4, atol=1e-5, msg=name)

    fresh = __import__("conftest").make_vit()
    ps.load(fresh, tmp_path / "delta.safetensors")
    for name, parameter in fresh.named_parameters():
        if name in expected:
            assert torch.equal(parameter.detach(), rank0[name]), name


ENDS = 25


def end_of_training(rank: int, world: int, folder: str) -> None:
    """What the end of every epoch and of the training does under torchrun, ENDS times over: the epoch's
    totals summed over the ranks (a temporary tensor in a gloo all_reduce), then the group destroyed."""
    from petl_surgery.training import distributed

    torch.set_num_threads(1)
    for i in range(ENDS):
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous{i}", rank=rank, world_size=world)
        assert distributed.sum_over_ranks([1.0, rank], torch.device("cpu")) == [2.0, 1.0]
        distributed.finish()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_destroying_the_group_right_after_an_all_reduce_never_deadlocks(tmp_path):
    # torch 2.6: gloo's worker thread freed the all_reduce's Python tensor (needing the GIL) while
    # destroy_process_group held the GIL and joined that thread. Probabilistic: about two runs in three of
    # these 25 ends hung before the fix on a busy 2-core machine
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import torch.multiprocessing as mp, test_distributed as t; "
            f"mp.spawn(t.end_of_training, args=(2, {str(tmp_path)!r}), nprocs=2, join=True)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        assert process.wait(timeout=90) == 0
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the spawned ranks are in the launcher's process group
        process.wait()
        pytest.fail(f"{ENDS} all_reduce-then-destroy rounds did not finish in 90 s: a rank hangs in destroy_process_group")
