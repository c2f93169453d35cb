import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    ema = common.momentum_copy(model)
    assert all(not p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    common.ema_update_(ema, model, 0.99)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.99 * b + 0.01 * p, atol=1e-6, rtol=0)
    # m = 1 keeps the momentum model, m = 0 copies the model
    common.ema_update_(ema, model, 0.0)
    for e, p in zip(ema.parameters(), model.parameters()):
        assert torch.equal(e, p)


def test_cosine_schedule_endpoints():
    s = common.cosine_schedule(1.0, 0.01, 100, warmup_steps=10, warmup_start=0.1)
    assert len(s) == 100
    assert s[0] == pytest.approx(0.1) and s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.01)
    assert np.all(np.diff(s[10:]) <= 1e-12) and np.all(np.diff(s[:11]) > 0)
    assert common.cosine_schedule(0.5, 0.5, 7).tolist() == [0.5] * 7


def test_sampler_shards_global_batches_and_resumes():
    one = common.ResumableSampler(20, 4, seed=3, rank=0, world_size=1)
    two = [common.ResumableSampler(20, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(1)
    a, b0, b1 = list(one), list(two[0]), list(two[1])
    assert len(a) == 20 and len(set(i for i, _ in a)) == 20
    for step in range(5):  # rank 0 then rank 1 slices make the one-process global batch
        assert a[4 * step:4 * step + 4] == b0[2 * step:2 * step + 2] + b1[2 * step:2 * step + 2]
    one.set_epoch(1, start_step=3)
    assert list(one) == a[12:] and len(one) == 8
    one.set_epoch(2)
    assert [i for i, _ in one] != [i for i, _ in a]  # a new order each epoch
    with pytest.raises(SystemExit, match="global batch"):
        common.ResumableSampler(3, 4, rank=0, world_size=1)


def test_seeded_is_reproducible_and_restores_state():
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with common.seeded(7):
        x = torch.rand(3)
    with common.seeded(7):
        y = torch.rand(3)
    assert torch.equal(x, y)
    assert torch.equal(torch.rand(1), expected_next)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    assert common.load_checkpoint(path, "swav") is None  # nothing there: a fresh start
    common.save_checkpoint(path, "swav", 7, {"model": model.state_dict(), "optimizer": opt.state_dict()},
                           per_rank={"queue": torch.arange(3)}, finite=[model])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind
    after_save = torch.rand(2)
    state = common.load_checkpoint(path, "swav")  # restores this process's RNG state
    assert torch.equal(torch.rand(2), after_save)
    assert state["step"] == 7 and state["world_size"] == 1 and torch.equal(state["rank"]["queue"], torch.arange(3))
    model2 = torch.nn.Linear(2, 3)
    opt2 = torch.optim.AdamW(model2.parameters())
    common.restore(state, path, model=model2, optimizer=opt2)
    assert torch.equal(model2.weight, model.weight) and opt2.state_dict()["state"][0]["step"] == 1
    with pytest.raises(SystemExit, match="has no 'momentum_model'"):
        common.restore(state, path, momentum_model=model2)
    with pytest.raises(SystemExit, match="does not fit this Linear"):
        common.restore(state, path, model=torch.nn.Linear(2, 4))
    with pytest.raises(SystemExit, match="does not fit this AdamW"):  # another parameter layout
        common.restore(state, path, optimizer=torch.optim.AdamW(torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Linear(3, 3)).parameters()))
    with pytest.raises(SystemExit, match="checkpoint of 'swav', not 'dcl'"):
        common.load_checkpoint(path, "dcl")
    state["world_size"] = 8
    torch.save(state, path)
    with pytest.raises(SystemExit, match="written by 8 processes, this run has 1"):
        common.load_checkpoint(path, "swav")
    assert common.load_checkpoint(path, "swav", resume=False)["step"] == 7  # evaluation only: any world size
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        common.load_checkpoint(path, "swav")


def test_checkpoint_refuses_non_finite_parameters_and_failed_writes(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    model = torch.nn.Linear(2, 3)
    common.save_checkpoint(path, "dcl", 1, {"model": model.state_dict()}, finite=[model])
    good = open(path, "rb").read()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="not finite at step 2; nothing was saved"):
        common.save_checkpoint(path, "dcl", 2, {"model": model.state_dict()}, finite=[model])
    assert open(path, "rb").read() == good
    with pytest.raises(SystemExit, match="cannot write"):  # an unpicklable state: the write fails half-way
        common.save_checkpoint(path, "dcl", 3, {"model": model.state_dict(), "bad": lambda: 0})
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and open(path, "rb").read() == good


def _resume_worker(rank, world, init_file, out, hide_on):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    path = f"{out}/ckpt{rank}/checkpoint.pt"  # one folder per rank, as node-local disks would be
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model = torch.nn.Linear(2, 2)
    result = {}
    if rank == 0:
        torch.save({"method": "m", "step": 3, "world_size": 2, "ranks": [{"rng": common.rng_state()}] * 2}, path)
    dist.barrier()
    if rank != hide_on and rank != 0:
        torch.save({"method": "m", "step": 5, "world_size": 2, "ranks": [{"rng": common.rng_state()}] * 2}, path)
    dist.barrier()
    try:
        common.load_checkpoint(path, "m")
        result["error"] = None
    except SystemExit as e:
        result["error"] = str(e)
    common.save_checkpoint(f"{out}/shared.pt", "m", 9, {"model": model.state_dict()},
                           per_rank={"queue": torch.full((2,), float(rank))}, finite=[model])
    result["shared"] = common.load_checkpoint(f"{out}/shared.pt", "m")["rank"]["queue"]
    torch.save(result, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("hide_on", [1, None])
def test_checkpoint_protocol_under_two_processes(hide_on):
    """A process that cannot see the checkpoint, or sees another step, is an error on every process;
    per-rank state comes back to its own rank."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_resume_worker, args=(2, f"{d}/init", d, hide_on), nprocs=2, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    expected = "processes [1] cannot see" if hide_on == 1 else "checkpoints of different steps [3, 5]"
    for r in range(2):
        assert expected in res[r]["error"]
        assert torch.equal(res[r]["shared"], torch.full((2,), float(r)))


def test_rng_state_roundtrip():
    state = common.rng_state()
    a = (torch.rand(2), np.random.rand(), __import__("random").random())
    common.set_rng_state(state)
    b = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def _gather_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x_all = torch.randn(world * 3, 4, requires_grad=True)  # the same global tensor on every rank
    w = torch.randn(4)
    x = x_all.detach()[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    gathered = common.all_gather_with_grad(x)
    # A loss whose value on each rank depends on every rank's rows; the mean over ranks is the objective.
    loss = ((gathered @ w).softmax(0) * torch.arange(world * 3.0)).sum() * (rank + 1)
    loss.backward()
    nograd = common.concat_all_gather(x.detach())
    objs = common.gather_objects({"rank": rank})
    total = common.all_reduce_sum(torch.tensor([float(rank)]))
    torch.save({"grad": x.grad, "gathered": gathered.detach(), "nograd": nograd, "objs": objs,
                "total": total}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gathers_under_two_processes():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_gather_worker, args=(world, f"{d}/init", d), nprocs=world, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    x_all = torch.randn(world * 3, 4, requires_grad=True)
    w = torch.randn(4)
    for r in range(world):  # the reference: one process, the same global tensor, every rank's loss summed
        ((x_all @ w).softmax(0) * torch.arange(world * 3.0)).sum().mul(r + 1).backward()
    for r in range(world):
        assert torch.equal(res[r]["gathered"], x_all.detach())
        assert torch.equal(res[r]["nograd"], x_all.detach())
        torch.testing.assert_close(res[r]["grad"], x_all.grad[r * 3:(r + 1) * 3], atol=1e-6, rtol=1e-5)
        assert res[r]["objs"] == [{"rank": 0}, {"rank": 1}]
        assert res[r]["total"].item() == 1.0
