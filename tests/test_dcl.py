"""Tests for dcl.py: hand-computed worked examples E5a-E5c, loss properties, the loss across two processes, LARS,
the evaluation leaving the backbone untouched, a --tiny run that learns, torchrun vs one process, exact resume
and bad input."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dcl
from helpers import assert_tensors_close, load_ckpt, read_log, read_metrics, run_script, run_torchrun

E5B_Z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
E5B_Z2 = torch.tensor([[0.8, 0.6], [0.6, 0.8], [-0.6, -0.8]])


def naive_loss(z1, z2, tau, weights=None, keep_positive=False, split=False):
    """Eq. 6 written anchor by anchor in float64 (mean over the 2N anchors). split=True is the old lightly variant:
    log-sum-exp over same-view negatives PLUS log-sum-exp over other-view negatives (a product of partitions)."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    n, views, total = len(z1), (z1, z2), 0.0
    for k in range(2):
        for i in range(n):
            pos = z1[i] @ z2[i] / tau
            per_view = [[views[k][i] @ views[l][j] / tau for j in range(n) if j != i] for l in range(2)]
            if keep_positive:
                per_view[1 - k].append(pos)
            if split:
                neg = sum(torch.logsumexp(torch.stack(t), 0) for t in per_view)
            else:
                neg = torch.logsumexp(torch.stack(per_view[0] + per_view[1]), 0)
            total = total - (1.0 if weights is None else weights[i]) * pos + neg
    return total / (2 * n)


# --- 1. Worked examples and properties ---
def test_e5a_identity_embeddings():
    e = torch.eye(2)
    assert dcl.dcl_loss(e, e, 1.0).item() == pytest.approx(math.log(2) - 1, abs=1e-6)  # -0.306853
    assert dcl.dclw_loss(e, e, 1.0).item() == pytest.approx(-0.306853, abs=1e-6)
    assert torch.allclose(dcl.vmf_weights(e, e), torch.ones(2))
    assert dcl.nt_xent_loss(e, e, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)  # 0.551445


@pytest.mark.parametrize("tau, want_dcl, want_dclw, want_ntxent, old_split", [
    (0.5, -0.095148, -0.062225, 0.719236, -0.253395),
    (0.1, -3.094910, -2.930296, 0.644999, -3.489979)])
def test_e5b_table(tau, want_dcl, want_dclw, want_ntxent, old_split):
    for scale1, scale2 in [(1.0, 1.0), (3.0, 2.0)]:  # inputs are normalised inside
        z1, z2 = E5B_Z1 * scale1, E5B_Z2 * scale2
        got = dcl.dcl_loss(z1, z2, tau).item()
        assert got == pytest.approx(want_dcl, abs=2e-5)
        assert dcl.dclw_loss(z1, z2, tau).item() == pytest.approx(want_dclw, abs=2e-5)
        assert dcl.nt_xent_loss(z1, z2, tau).item() == pytest.approx(want_ntxent, abs=2e-5)
        assert abs(got - old_split) > 0.1  # not the pre-2025 lightly split log-sum-exp
    # the reference formulas reproduce every column, including the old variant's number
    assert naive_loss(E5B_Z1, E5B_Z2, tau).item() == pytest.approx(want_dcl, abs=1e-6)
    assert naive_loss(E5B_Z1, E5B_Z2, tau, split=True).item() == pytest.approx(old_split, abs=1e-6)
    assert naive_loss(E5B_Z1, E5B_Z2, tau, keep_positive=True).item() == pytest.approx(want_ntxent, abs=1e-6)


def test_e5b_e5c_vmf_weights():
    w = dcl.vmf_weights(E5B_Z1, E5B_Z2, 0.5)
    assert torch.allclose(w, torch.tensor([0.876539, 0.876539, 1.246922]), atol=1e-5)
    z1 = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), dim=1)
    z2 = F.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), dim=1)
    w = dcl.vmf_weights(z1, z2, 0.5)
    assert torch.allclose(w, torch.tensor([-1.330170, 1.549310, 1.890430, 1.890430]), atol=1e-5)  # no clamping
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_losses_match_eq6_on_random_inputs_and_properties():
    torch.manual_seed(0)
    z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
    tau = 0.3
    w = dcl.vmf_weights(z1, z2, 0.5)
    assert dcl.dcl_loss(z1, z2, tau).item() == pytest.approx(naive_loss(z1, z2, tau).item(), abs=1e-5)
    assert dcl.dclw_loss(z1, z2, tau).item() == pytest.approx(naive_loss(z1, z2, tau, w).item(), abs=1e-5)
    assert dcl.nt_xent_loss(z1, z2, tau).item() == pytest.approx(naive_loss(z1, z2, tau, keep_positive=True).item(),
                                                                 abs=1e-5)
    perm = torch.randperm(7)
    for fn in (dcl.dcl_loss, dcl.dclw_loss, dcl.nt_xent_loss):
        base = fn(z1, z2, tau)
        assert torch.allclose(fn(z2, z1, tau), base, atol=1e-6)  # symmetric in the views
        assert torch.allclose(fn(z1[perm], z2[perm], tau), base, atol=1e-6)  # a common permutation
        assert torch.allclose(fn(4 * z1, 0.5 * z2, tau), base, atol=1e-6)  # scale
    assert dcl.dcl_loss(z1, z2, tau) < dcl.nt_xent_loss(z1, z2, tau)  # the positive is out of the denominator
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and not w.requires_grad
    # equal positive similarities -> all weights 1 -> DCLW == DCL
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    a = F.normalize(torch.randn(6, 2), dim=1)
    assert torch.allclose(dcl.vmf_weights(a, a @ rot), torch.ones(6), atol=1e-6)
    assert torch.allclose(dcl.dclw_loss(a, a @ rot), dcl.dcl_loss(a, a @ rot), atol=1e-6)


def test_vmf_weights_are_detached_and_gradient_matches_reference():
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    dcl.dclw_loss(z1, z2, 0.2).backward()
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    naive_loss(r1, r2, 0.2, dcl.vmf_weights(r1, r2, 0.5).double()).backward()
    torch.testing.assert_close(z1.grad, r1.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z2.grad, r2.grad.float(), atol=1e-5, rtol=1e-4)


def _loss_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    z1, z2 = torch.randn(world * 3, 6), torch.randn(world * 3, 6)  # the same global batch on every rank
    res = {}
    for name, fn in [("dcl", dcl.dcl_loss), ("dclw", dcl.dclw_loss), ("ntxent", dcl.nt_xent_loss)]:
        a, b = (z[rank * 3:(rank + 1) * 3].clone().requires_grad_() for z in (z1, z2))
        loss = fn(a, b, 0.2, gather=True)
        loss.backward()
        res[name] = (loss.detach(), a.grad, b.grad)
    torch.save(res, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batch_loss_under_two_processes():
    """Anchors local, negatives gathered with gradient, the diagonal offset by rank: the mean of the ranks'
    losses is the one-process loss, and the gradients (averaged as DDP does) are the one-process gradients."""
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_loss_worker, args=(world, f"{d}/init", d), nprocs=world, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    z1, z2 = torch.randn(world * 3, 6, requires_grad=True), torch.randn(world * 3, 6, requires_grad=True)
    for name, fn in [("dcl", dcl.dcl_loss), ("dclw", dcl.dclw_loss), ("ntxent", dcl.nt_xent_loss)]:
        z1.grad = z2.grad = None
        full = fn(z1, z2, 0.2)
        full.backward()
        assert sum(r[name][0] for r in res).item() / world == pytest.approx(full.item(), abs=1e-6), name
        torch.testing.assert_close(torch.cat([r[name][1] for r in res]) / world, z1.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r[name][2] for r in res]) / world, z2.grad, atol=1e-6, rtol=1e-5)


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = dcl.LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "eta": None}], lr=0.5, momentum=0.9,
                   weight_decay=0.01, eta=0.02)
    (w.sum() * 3 + (b ** 2).sum()).backward()
    opt.step()
    g = torch.full((4, 3), 3.0) + 0.01 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 0.02 * w0.norm() / g.norm() * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * 2 * b0)


def test_knn_probe_and_backbone_untouched():
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 5
    y = torch.arange(60) % 3
    f = centers[y] + torch.randn(60, 8)
    pred = dcl.knn_predict(F.normalize(f[:30], dim=1), F.normalize(f[30:], dim=1), y[30:], 3, k=10, t=0.1)
    assert (pred == y[:30]).float().mean() > 0.9
    assert dcl.linear_probe(f[30:], y[30:], f[:30], y[:30], 3, epochs=20, lr=0.1) > 90
    # evaluate() on a BatchNorm model in train mode: no parameter or running statistic changes, mode restored
    model = dcl.SimCLR("cnn", 32, 16)
    data = dcl.SyntheticShapes(40, seed=3)
    loader = torch.utils.data.DataLoader(dcl.Labelled(data, dcl.eval_transform(32)), batch_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dcl.get_args(["--knn-k", "5", "--probe-epochs", "2"])
    metrics = dcl.evaluate(model.backbone, loader, loader, 10, args, torch.device("cpu"), "none")
    assert set(metrics) == {"linear_top1", "knn_top1"} and model.training
    assert_tensors_close(before, model.state_dict())


def test_synthetic_data_is_fixed_and_colour_does_not_name_the_class():
    a, b = dcl.SyntheticShapes(600, seed=0), dcl.SyntheticShapes(600, seed=0)
    assert torch.equal(a.images, b.images) and a.images.shape == (600, 3, 32, 32) and a.images.dtype == torch.uint8
    y = torch.as_tensor(a.labels)
    assert torch.bincount(y, minlength=10).min() > 30
    colour = a.images.float().mean((2, 3))  # (N, 3) mean colour of each image
    colour = (colour - colour.mean(0)) / colour.std(0)
    pred = dcl.knn_predict(F.normalize(colour[:300], dim=1), F.normalize(colour[300:], dim=1), y[300:], 10, k=20)
    assert (pred == y[:300]).float().mean() < 0.25  # chance is 0.1: colour alone does not tell the classes apart


# --- 2. --tiny learns ---
def test_tiny_run_learns(tmp_path):
    out = str(tmp_path / "tiny")
    p = run_script("dcl.py", "--tiny", "--output-dir", out, threads=1)  # 1 thread: robust on a shared machine
    m = read_metrics(out)
    assert list(m)[:2] == ["linear_top1", "knn_top1"] and "knn_top1_init" in m and "linear_top1_init" in m
    assert m["knn_top1"] > m["knn_top1_init"] + 4, m
    assert "knn_top1" in p.stdout and os.path.exists(os.path.join(out, "checkpoint.pt"))
    log = read_log(out)
    assert log[-1]["eval"] == m and all(math.isfinite(r["loss"]) for r in log[:-1])


# --- 3. Two processes vs one ---
def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch of 32: 2 x 16 under torchrun vs 32 in one process, DCLW. The gathered loss itself is checked
    exactly by test_global_batch_loss_under_two_processes. End to end, BatchNorm statistics are per process on CPU
    (SyncBN is CUDA-only), so the first loss agrees to ~2% and, after 2 LARS steps, the conv/linear weights (whose
    steps LARS normalises) to ~1e-5, BatchNorm's own parameters and statistics more loosely. A wrong rank offset
    would put the anchor itself (logit 1/tau = 10) into the denominator and move the loss by far more."""
    args = ["--tiny", "--loss", "dclw", "--max-steps", "2", "--log-every", "1", "--probe-epochs", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("dcl.py", *args, "--batch-size", "32", "--output-dir", one, threads=1)
    p = run_torchrun("dcl.py", *args, "--batch-size", "16", "--output-dir", two)
    assert "global batch 32 = 16 x 2" in p.stdout
    l1, l2 = read_log(one), read_log(two)
    assert l1[0]["step"] == l2[0]["step"] == 1
    assert l2[0]["loss"] == pytest.approx(l1[0]["loss"], rel=0.04)
    c1, c2 = load_ckpt(one), load_ckpt(two)
    assert c1["step"] == c2["step"] == 2 and len(c2["rng"]) == 2
    for k, v in c1["model"].items():
        if v.ndim > 1:
            assert_tensors_close(v, c2["model"][k], atol=1e-4, path=k)
        elif v.is_floating_point():
            assert_tensors_close(v, c2["model"][k], atol=2e-2, path=k)


# --- 4. Resume ---
def test_resume_is_exact(tmp_path):
    args = ["--tiny", "--batch-size", "16", "--probe-epochs", "1", "--log-every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_script("dcl.py", *args, "--max-steps", "6", "--output-dir", a, threads=1)
    run_script("dcl.py", *args, "--max-steps", "3", "--output-dir", b, threads=1)
    assert load_ckpt(b)["step"] == 3
    p = run_script("dcl.py", *args, "--max-steps", "6", "--output-dir", b, threads=1)
    assert "loaded" in p.stdout and "(step 3)" in p.stdout
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["step"] == cb["step"] == 6
    assert_tensors_close(ca["model"], cb["model"])
    assert_tensors_close(ca["optimizer"]["state"], cb["optimizer"]["state"])
    assert read_metrics(a) == read_metrics(b)


# --- 5. Bad input ---
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dcl_ckpt"))
    run_script("dcl.py", "--tiny", "--batch-size", "16", "--max-steps", "1", "--probe-epochs", "1", "--output-dir", d,
               threads=1)
    return d


def _fails(*args, match):
    p = run_script("dcl.py", *args, check=False, threads=1)
    assert p.returncode != 0 and match in p.stdout, p.stdout[-2000:]
    assert "Traceback" not in p.stdout, p.stdout[-2000:]


def test_bad_data_paths(tmp_path):
    _fails("--tiny", "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), match="is not a folder")
    (tmp_path / "empty").mkdir()
    for split in ("train/cat", "val/cat"):
        (tmp_path / "imgs" / split).mkdir(parents=True)  # class folders without images
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)  # the folder but not the files
    cases = [("empty", "holds neither"), ("imgs", "Found no valid file"), ("cifar", "files missing or corrupted")]
    for data, match in cases:  # in-process: the same SystemExit, without starting python again
        with pytest.raises(SystemExit, match=match):
            dcl.main(["--tiny", "--data", str(tmp_path / data), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="lower --batch-size"):
        dcl.main(["--tiny", "--batch-size", "4096", "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="must be positive"):
        dcl.get_args(["--temperature", "0"])


def test_bad_checkpoints_and_nan_keep_the_checkpoint(tmp_path, trained_dir):
    ckpt = os.path.join(trained_dir, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        original = f.read()
    _fails("--tiny", "--batch-size", "16", "--proj-dim", "16", "--output-dir", trained_dir, match="does not fit")
    _fails("--tiny", "--batch-size", "16", "--max-steps", "4", "--lr", "1e30", "--log-every", "1",
           "--output-dir", trained_dir, match="error: loss is")
    with open(ckpt, "rb") as f:
        assert f.read() == original
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    _fails("--tiny", "--output-dir", str(other), match="not 'dcl'")
