"""Tests for biosignal.py: the spec's worked examples (KoLeo, the pid-masked InfoNCE, participant pairs, EMA), the loss
against a loop reference, fp32 under autocast, the augmentations and the not-a-knot spline, the probes (ridge, LOO
alpha, logistic regression, ROC AUC) against closed forms, the encoder's sizes, participant-disjoint splits and pair
sampling, the data reader, one real training step on two processes against one (gradients via plain SGD), torchrun
end to end, a --tiny run that learns, dropout in train mode, bf16 and compile steps, exact resume and bad input."""
import math
import os
import re
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import biosignal as bs
import common
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, run_torchrun)

S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
T = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.8, 1.0]])


def naive_nce(s, t, pids, tau):
    """The follow-up's loss written anchor by anchor in float64."""
    s, t = F.normalize(s.double(), dim=1), F.normalize(t.double(), dim=1)
    n, total = len(s), 0.0
    for a, b in ((s, t), (t, s)):  # l1: student anchors, l2: teacher anchors
        for i in range(n):
            terms = [a[i] @ b[j] for j in range(n)] + [a[i] @ a[j] for j in range(n) if pids[j] != pids[i]]
            total = total + (torch.logsumexp(torch.stack(terms) / tau, 0) - a[i] @ b[i] / tau) / (2 * n)
    return total


# --- 1. Worked examples and properties ---
def test_koleo_worked_example():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    assert bs.koleo_loss(z).item() == pytest.approx(0.3426, abs=1e-4)  # NN distances 0.6325, 0.6325, 0.8944
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    assert bs.koleo_loss(spread) < bs.koleo_loss(z)
    assert bs.koleo_loss(3 * z).item() == pytest.approx(0.3426, abs=1e-4)  # normalised inside


def test_nt_xent_pid_worked_examples():
    assert bs.koleo_loss(S).item() == pytest.approx(0.2674, abs=1e-4)
    assert bs.koleo_loss(T).item() == pytest.approx(0.5044, abs=1e-4)
    distinct, repeated = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 1])
    assert bs.nt_xent_pid(S, T, distinct, 0.5).item() == pytest.approx(1.0638, abs=1e-4)
    assert bs.regularized_loss(S, T, distinct, 0.5, 0.1).item() == pytest.approx(1.1023, abs=1e-4)
    # rows 0 and 2 are one participant: they no longer repel within a view
    assert bs.nt_xent_pid(S, T, repeated, 0.5).item() == pytest.approx(0.9116, abs=1e-4)
    assert bs.regularized_loss(S, T, repeated, 0.5, 0.1).item() == pytest.approx(0.9502, abs=1e-4)


def test_loss_matches_loop_reference_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    s, t = torch.randn(9, 5, requires_grad=True), torch.randn(9, 5)
    pids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    got = bs.nt_xent_pid(s, t, pids, 0.3)
    assert got.item() == pytest.approx(naive_nce(s, t, pids, 0.3).item(), abs=1e-5)
    got.backward()
    r = s.detach().clone().requires_grad_()
    naive_nce(r, t, pids, 0.3).backward()
    torch.testing.assert_close(s.grad, r.grad.float(), atol=1e-5, rtol=1e-4)
    # KoLeo(t) carries no gradient: w.r.t. t, the regularised loss has the InfoNCE's gradient
    tt, tk = t.clone().requires_grad_(), t.clone().requires_grad_()
    bs.regularized_loss(s, tt, pids, 0.3, 10.0).backward()
    bs.nt_xent_pid(s, tk, pids, 0.3).backward()
    torch.testing.assert_close(tt.grad, tk.grad)


def test_loss_is_fp32_under_autocast():
    torch.manual_seed(0)
    s, t = (torch.randn(32, 16).bfloat16().float() for _ in range(2))
    pids = torch.arange(32) // 2
    want = bs.regularized_loss(s, t, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bs.regularized_loss(s, t, pids)
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5


def test_participant_pairs():
    ids = np.array([7, 7, 3, 3, 3, 9])
    seen = set()
    for seed in range(30):
        a, b = bs.participant_pairs(ids, np.random.default_rng(seed))
        assert len(a) == 2 and sorted(ids[a]) == [3, 7]  # participant 9 has one segment: skipped
        assert (ids[a] == ids[b]).all() and (a != b).all()
        seen |= {tuple(sorted(p)) for p in zip(a, b) if ids[p[0]] == 3}
    assert seen == {(2, 3), (2, 4), (3, 4)}  # every pair of participant 3's segments is drawn
    a, b = bs.participant_pairs(np.repeat(np.arange(10), 3), np.random.default_rng(0), batch_size=4)
    assert len(a) == 4 and len(set((a // 3).tolist())) == 4


def test_ema_worked_example_and_update_before_the_forward():
    k, q = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        k.weight.copy_(torch.tensor([[1.0, 2.0]]))
        q.weight.copy_(torch.tensor([[3.0, 0.0]]))
    common.ema_update_(k, q, 0.99)
    torch.testing.assert_close(k.weight, torch.tensor([[1.02, 1.98]]))
    assert bs.momentum_at(7, 100, 0.99, "constant") == 0.99  # official: constant m
    assert bs.momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)  # BYOL's cosine increase to 1
    assert bs.momentum_at(100, 100, 0.99, "cosine") == 1
    # train_step: the teacher moves towards the student as it was BEFORE this step's optimizer update
    torch.manual_seed(0)
    model = bs.Embedder(4, 36, 16, 8, 0.1)
    teacher = common.momentum_copy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    want = [tp + 0.5 * (p - tp) for tp, p in zip(teacher.parameters(), model.parameters())]
    args = bs.get_args(["--tiny"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    v = torch.randn(4, 4, 128)
    bs.train_step(model, teacher, opt, torch.amp.GradScaler("cpu", enabled=False), v, v + 0.1, torch.arange(4),
                  args, torch.device("cpu"), "none", 0.5)
    for got, w in zip(teacher.parameters(), want):
        torch.testing.assert_close(got, w.detach())


def test_augmentations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)) + 5.0  # no zeros of its own
    for _ in range(20):
        y = bs.cut_out(x, rng)
        zero = np.flatnonzero((y == 0).all(1))
        assert 60 <= len(zero) < 100 and (np.diff(zero) == 1).all()  # 30-50% of rows, one block
        assert np.array_equal(y[(y != 0).all(1)], x[(y != 0).all(1)])
    w = bs.time_warp(x, rng)
    assert w.shape == x.shape and np.allclose(w[0], x[0]) and np.allclose(w[-1], x[-1])
    assert not np.allclose(w, x)
    p = bs.channel_permute(x, rng)
    assert sorted(map(tuple, p.T)) == sorted(map(tuple, x.T))
    ratio = bs.magnitude_warp(x, rng) / x
    assert np.allclose(ratio, ratio[:, :1]) and ratio.std() > 0.01  # one curve, shared by the channels
    n = bs.add_gaussian_noise(x, rng) - x
    assert 0.04 < n.std() < 0.11
    assert np.array_equal(bs.stochastic_cascade(x, [0] * 5, rng), x.astype(np.float32))
    assert not np.allclose(bs.stochastic_cascade(x, [1] * 5, rng), x)


def test_cubic_spline_is_not_a_knot():
    """A not-a-knot spline reproduces any cubic exactly (a natural spline would not: its ends have y'' = 0)."""
    xk = np.linspace(0, 9, 7)
    f = lambda x: 0.3 * x ** 3 - 2 * x ** 2 + x - 4  # noqa: E731
    x = np.linspace(0, 9, 101)
    np.testing.assert_allclose(bs.cubic_spline(xk, f(xk), x), f(x), atol=1e-9)
    np.testing.assert_allclose(bs.cubic_spline(xk, np.stack([f(xk), 2 * xk], 1), x), np.stack([f(x), 2 * x], 1),
                               atol=1e-9)


def test_ridge_logistic_auc_against_closed_forms():
    torch.manual_seed(0)
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    w, b = bs.ridge_fit(X, y, 1e-12)  # alpha -> 0: least squares with an intercept
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(40, 1, dtype=torch.float64)], 1), y[:, None]).solution[:, 0]
    torch.testing.assert_close(torch.cat([w, b[None]]), sol)
    x1 = X[:, :1]  # one feature: w = sum(xc yc) / (sum(xc^2) + alpha)
    w1, _ = bs.ridge_fit(x1, y, 5.0)
    xc, yc = x1[:, 0] - x1.mean(), y - y.mean()
    assert w1.item() == pytest.approx(((xc * yc).sum() / ((xc ** 2).sum() + 5.0)).item(), rel=1e-10)
    # LOO alpha: brute-force refits without each point
    alphas = [1e-3, 1.0, 30.0, 1000.0]
    errs = []
    for a in alphas:
        e = [(y[i] - bs.ridge_predict(X[i:i + 1], *bs.ridge_fit(X[torch.arange(40) != i], y[torch.arange(40) != i],
                                                                   a))[0]) ** 2 for i in range(40)]
        errs.append(torch.stack(e).mean().item())
    assert bs.ridge_loo_alpha(X, y, alphas) == alphas[int(np.argmin(errs))]
    # logistic regression on one binary feature, no penalty: sigmoid(b) = P(y | x=0), sigmoid(w + b) = P(y | x=1)
    xb = torch.tensor([[0.0]] * 4 + [[1.0]] * 4)
    yb = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1.0])
    w, b = bs.logistic_fit(xb, yb, C=1e9)
    assert b.item() == pytest.approx(math.log(1 / 3), abs=1e-4) and w.item() == pytest.approx(2 * math.log(3),
                                                                                               abs=1e-4)
    w_reg, _ = bs.logistic_fit(xb, yb, C=0.1)
    assert 0 < w_reg.item() < w.item()
    # ROC AUC = P(score_pos > score_neg) + P(tie) / 2
    rng = np.random.default_rng(0)
    yy, sc = rng.integers(0, 2, 50), rng.integers(0, 5, 50).astype(float)
    pos, neg = sc[yy == 1], sc[yy == 0]
    want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert bs.roc_auc(yy, sc) == pytest.approx(want)
    assert bs.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0 and bs.roc_auc([1, 0], [0.1, 0.2]) == 0.0


def test_participant_mean():
    emb = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]])
    uid, mean = bs.participant_mean(emb, torch.tensor([4, 4, 9, 2]))
    assert uid.tolist() == [2, 4, 9]
    torch.testing.assert_close(mean, torch.tensor([[0.0, 4.0], [2.0, 1.0], [5.0, 5.0]]))
    uid, mean = bs.participant_mean(emb, torch.tensor([4, 4, 9, 2]), min_segments=2)
    assert uid.tolist() == [4] and mean.shape == (1, 2)


def test_encoder_sizes():
    net = bs.EfficientNet1d(4, 256)
    convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert convs[0].out_channels == 42 and convs[-1].out_channels == 256
    blocks = [m for m in net.net if isinstance(m, bs.MBConv1d)]
    assert len(blocks) == 16
    assert sorted({b.project[0].out_channels for b in blocks}) == [28, 35, 49, 64, 78, 99, 128]
    assert blocks[0].expand is not None and len(blocks[0].expand) == 0 and len(blocks[1].expand) == 3
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(3.15e6, rel=0.01)
    assert net.net(torch.randn(2, 4, 3840)).shape == (2, 256, 60)  # total stride 64
    model = bs.Embedder(1, 256, 1024, 128, 0.1)
    assert sum(p.numel() for p in model.head.parameters()) == pytest.approx(0.39e6, rel=0.02)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.head.modules())  # no BN in the head
    assert model(torch.randn(2, 1, 640), torch.randn(2, 1, 640))[0].shape == (2, 128)


def test_cohort_split_by_participant_and_pair_sampler():
    c = bs.synthetic_cohort(30, 5, 5, "ppg", seed=1)
    assert c.signals.shape == (150, 4, 320) and c.signals.dtype == np.float32
    train_ids, test_ids = set(c.seg_pid[c.seg_train]), set(c.seg_pid[~c.seg_train])
    assert train_ids and test_ids and not train_ids & test_ids  # no participant in both splits
    assert set(c.attrs) == {"age", "bmi", "sex", "hypertension"}
    assert np.array_equal(bs.synthetic_cohort(30, 5, 5, "ppg", seed=1).signals, c.signals)
    seg = np.where(c.seg_train, c.seg_pid, -1)
    sampler = bs.PairSampler(seg, 4, seed=0)
    keys = list(sampler)
    assert len(keys) == sampler.steps_per_epoch * 4 == 20
    for k in range(0, len(keys), 4):
        batch = keys[k:k + 4]
        assert len({c.seg_pid[a] for a, _, _ in batch}) == 4  # distinct participants in a batch
    assert all(c.seg_train[a] and c.seg_pid[a] == c.seg_pid[b] and a != b for a, b, _ in keys)
    assert all(a == b for a, b, _ in bs.PairSampler(seg, 4, seed=0, segment_pairs=True))
    sampler.set_epoch(1, 2)
    assert len(list(sampler)) == 12 and list(sampler)[0][:2] != keys[8][:2]
    ecg = bs.synthetic_cohort(6, 2, 5, "ecg", seed=0)
    assert ecg.signals.shape == (12, 1, 640)
    v1, v2, pid = bs.PairViews(c, bs.AUG_PROBS["ppg"])[keys[0]]
    assert v1.shape == (4, 320) and pid == c.seg_pid[keys[0][0]]


def write_cohort(d, c):
    """A cohort in the documented --data layout."""
    os.makedirs(d, exist_ok=True)
    np.save(os.path.join(d, "signals.npy"), c.signals)
    with open(os.path.join(d, "segments.csv"), "w") as f:
        f.write("pid\n" + "".join(f"p{p}\n" for p in c.seg_pid))
    with open(os.path.join(d, "participants.csv"), "w") as f:
        f.write("pid,split," + ",".join(c.attrs) + "\n")
        for i, p in enumerate(c.pid):
            f.write(f"p{p},{'train' if c.train[i] else 'test'}," + ",".join(f"{v[i]:.9g}" for v in c.attrs.values())
                    + "\n")
    return d


def test_data_reader_round_trip(tmp_path):
    c = bs.synthetic_cohort(12, 3, 5, "ppg", seed=2)
    d = write_cohort(str(tmp_path / "data"), c)
    got = bs.load_cohort(bs.get_args(["--data", d]))
    assert np.array_equal(np.asarray(got.signals), c.signals) and np.array_equal(got.seg_pid, c.seg_pid)
    assert np.array_equal(got.train, c.train)
    for k in c.attrs:
        np.testing.assert_allclose(got.attrs[k], c.attrs[k], rtol=1e-7)


# --- 2. Two processes against one: gradients ---
def _step_grads(cohort, per_rank):
    """The gradients of one real training step (bs.train_step: EMA, two student and teacher passes, the loss over
    the global batch, DDP from common.distribute with two processes) on this rank's slice of the first global batch.
    BatchNorm runs on running statistics (on CPU BatchNorm statistics are per process), first calibrated on fixed
    segments so that the gradients are not vanishingly small; no dropout."""
    torch.manual_seed(0)
    model = bs.Embedder(4, 36, 32, 16, 0.1)
    calib = torch.from_numpy(bs.zscore(cohort.signals[:32]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None  # cumulative average: the statistics of the calibration batch
        model(calib, calib)
    model.eval()
    teacher = common.momentum_copy(model)
    sampler = bs.PairSampler(np.where(cohort.seg_train, cohort.seg_pid, -1), per_rank, seed=0)
    v1, v2, pids = next(iter(torch.utils.data.DataLoader(bs.PairViews(cohort, bs.AUG_PROBS["ppg"]),
                                                         batch_size=per_rank, sampler=sampler)))
    cpu = torch.device("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    args = bs.get_args(["--tiny", "--tau", "0.2", "--koleo", "0.5"])
    bs.train_step(common.distribute(model, cpu), teacher, opt, torch.amp.GradScaler("cpu", enabled=False), v1, v2,
                  pids, args, cpu, "none", 0.9)
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    s, t = torch.randn(world * 4, 6), torch.randn(world * 4, 6)
    pids = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    a = s[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    loss = bs.regularized_loss(a, t[rank * 4:(rank + 1) * 4], pids[rank * 4:(rank + 1) * 4], 0.3, 0.5, gather=True)
    loss.backward()
    res = {"loss": (loss.detach(), a.grad), "grads": _step_grads(bs.synthetic_cohort(30, 3, 4, "ppg", seed=0), 8)}
    torch.save(res, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_gradients():
    """Anchors local, negatives and KoLeo neighbours from the gathered global batch: the mean of the ranks' losses is
    the one-process loss and the gradients (averaged as DDP does) match; one real step of 2 x 8 participants gives
    every parameter the gradient of one step on the global 16 (per tensor within 1e-3 of its norm: a gradient off by
    a constant factor fails)."""
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, f"{d}/init", d), nprocs=world, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    s, t = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6)
    full = bs.regularized_loss(s, t, torch.tensor([0, 1, 2, 0, 3, 4, 1, 5]), 0.3, 0.5)
    full.backward()
    assert sum(r["loss"][0] for r in res).item() / world == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat([r["loss"][1] for r in res]) / world, s.grad, atol=1e-6, rtol=1e-5)
    one = _step_grads(bs.synthetic_cohort(30, 3, 4, "ppg", seed=0), 16)
    for k, want in one.items():
        for r in range(world):  # DDP: both ranks hold the averaged gradient
            got = res[r]["grads"][k]
            assert want.norm() > 0 and (got - want).norm() <= 1e-3 * want.norm(), \
                f"{k}: |grad diff| {(got - want).norm():.3g} vs |grad| {want.norm():.3g}"


def _sharded_eval():
    """evaluate() of a tiny random encoder on 41 participants x 5 segments = 205; the segments it embedded."""
    torch.set_num_threads(1)
    args = bs.get_args(["--tiny", "--workers", "0"])
    cohort = bs.synthetic_cohort(41, 5, 5, "ppg", seed=0)
    torch.manual_seed(0)
    model, rows = bs.build(args, cohort.signals.shape[1], torch.device("cpu")), [0]
    model.backbone.register_forward_hook(lambda m, x, y: rows.__setitem__(0, rows[0] + len(x[0])))
    metrics = bs.evaluate(model, cohort, args, torch.device("cpu"), "none")
    return {"rows": rows[0], **metrics}


def _sharded_eval_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sharded_eval(), f"{out}/eval{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard():
    """Each process embeds its shard of the segments (103 of 205, the last repeated on rank 1; a participant spans
    the boundary); the per-participant sums and the re-identification rows are summed, and both processes fit the
    probes of one process on the same means: the same metrics."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sharded_eval_worker, args=(2, f"{d}/init", d), nprocs=2, join=True)
        two = [torch.load(f"{d}/eval{r}.pt") for r in range(2)]
    one = _sharded_eval()
    assert one.pop("rows") == 205 and [t.pop("rows") for t in two] == [103, 103]
    assert {"age_mae", "sex_auc", "reid_top1", "rankme"} <= set(one) and one["reid_top1"] > 0
    assert all(t == pytest.approx(one, rel=1e-6) for t in two), (one, two)


# --- 3. Runs: a small --data folder keeps them fast ---
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_cohort(str(tmp_path_factory.mktemp("bs_data")), bs.synthetic_cohort(36, 4, 5, "ppg", seed=3))


def small(data, *extra):
    return ["--tiny", "--data", data, "--batch-size", "8", "--log-every", "1", *extra]


def test_torchrun_two_processes_and_resume_needs_the_same_world(tmp_path, small_data):
    two = str(tmp_path / "two")
    p = run_torchrun("biosignal.py", *small(small_data, "--batch-size", "4", "--max-steps", "2", "--output-dir", two))
    assert "global batch 8 = 4 x 2" in p.stdout, p.stdout[-2000:]
    c = load_ckpt(two)
    assert c["step"] == 2 and c["world_size"] == 2 and len(c["ranks"]) == 2 and "teacher" in c
    assert "age_mae" in read_metrics(two)
    _fails(*small(small_data, "--max-steps", "4", "--output-dir", two), match="was written by 2 processes")


def test_tiny_run_learns(tmp_path):
    """The built-in --tiny run: the frozen-encoder probes beat the randomly initialised encoder's."""
    out = str(tmp_path / "tiny")
    p = run_script("biosignal.py", "--tiny", "--output-dir", out, threads=1, timeout=900)
    m = read_metrics(out)
    assert list(m)[0] == "age_mae" and "age_mae_init" in m and "hypertension_auc_init" in m
    assert m["age_mae"] < m["age_mae_init"] - 4 and m["age_r"] > m["age_r_init"] + 0.3, m
    assert m["hypertension_auc"] > m["hypertension_auc_init"] + 0.1, m
    assert "random init" in p.stdout and os.path.exists(os.path.join(out, "checkpoint.pt"))
    log = read_log(out)
    assert log[-1]["eval"] == m and all(math.isfinite(r["loss"]) for r in log[:-1])


def test_dropout_in_train_mode_for_student_and_teacher(tmp_path, small_data):
    """The student's head dropout runs in train mode in every training forward (after the --tiny initial evaluation,
    which must give the mode back), and the teacher's too, without gradient (official: model.train() covers it)."""
    with DropoutRecorder() as rec:
        run_main_inprocess(bs, small(small_data, "--max-steps", "2", "--output-dir", tmp_path))
    train_calls = rec.training_calls()
    assert len(train_calls) == 2 * 2 and all(t for _, t in train_calls)  # 2 steps x 2 student passes
    teacher_calls = [t for _, t, g in rec.calls if not g and t]
    assert len(teacher_calls) == 2 * 2


# --- 4. bf16 and compile ---
@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--compile", "aot_eager"]], ids=["bf16", "compile"])
def test_bf16_and_compile_steps(tmp_path, small_data, flags):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run_main_inprocess(bs, small(small_data, *flags, "--max-steps", "3", "--output-dir", tmp_path))
    log = read_log(tmp_path)
    assert [r["step"] for r in log[:-1]] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log[:-1])
    if "--compile" in flags:
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert dict(counters["frames"]).get("ok") == 1, dict(counters["frames"])


# --- 5. Resume ---
def test_resume_is_exact(tmp_path, small_data, capsys):
    """6 steps (2 epochs) in one go == 3 steps, stop, resume, 3 steps: student, teacher (with its BatchNorm
    statistics), optimizer and the final metrics."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_main_inprocess(bs, small(small_data, "--max-steps", "6", "--output-dir", a))
    run_main_inprocess(bs, small(small_data, "--max-steps", "3", "--output-dir", b))
    assert load_ckpt(b)["step"] == 3
    capsys.readouterr()
    run_main_inprocess(bs, small(small_data, "--max-steps", "6", "--output-dir", b))
    assert "(step 3)" in capsys.readouterr().out
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["step"] == cb["step"] == 6
    assert_tensors_close(ca["model"], cb["model"])
    assert_tensors_close(ca["teacher"], cb["teacher"])
    assert_tensors_close(ca["optimizer"]["state"], cb["optimizer"]["state"])
    assert read_metrics(a) == read_metrics(b)


# --- 6. Bad input ---
def _fails(*args, match):
    p = run_script("biosignal.py", *args, check=False, threads=1)
    assert p.returncode != 0 and match in p.stdout, p.stdout[-2000:]
    assert "Traceback" not in p.stdout, p.stdout[-2000:]


def _edit(src, dst, name, fn):
    os.makedirs(dst, exist_ok=True)
    for f in ("signals.npy", "segments.csv", "participants.csv"):
        with open(os.path.join(src, f), "rb") as fi, open(os.path.join(dst, f), "wb") as fo:
            data = fi.read()
            fo.write(fn(data.decode()).encode() if f == name else data)
    return dst


def test_bad_data(tmp_path, small_data):
    def expect(data, match):
        with pytest.raises(SystemExit, match=re.escape(match)):
            bs.main(["--tiny", "--data", data, "--output-dir", str(tmp_path / "o")])

    expect(str(tmp_path / "missing"), "is not a folder")
    (tmp_path / "empty").mkdir()
    expect(str(tmp_path / "empty"), "cannot read the signals")
    cases = [
        ("participants.csv", lambda t: re.sub(r"^p3,", "p3,x,", t, flags=re.M),
         "participants.csv:5: 7 fields, the header has 6"),
        ("participants.csv", lambda t: re.sub(r"^p3,(\w+),[^,]+,", r"p3,\1,old,", t, flags=re.M),
         "participants.csv:5: a value in old,"),
        ("participants.csv", lambda t: t + "p0,test,1,2,0,0\n", "participant p0 is in two splits (train at line 2"),
        ("participants.csv", lambda t: t + "p0,train,1,2,0,0\n", "participant p0 is listed twice"),
        ("participants.csv", lambda t: t.replace(",test,", ",val,", 1), "split 'val' is not train or test"),
        ("participants.csv", lambda t: t.replace("pid,split", "id,split", 1), "must start with pid,split"),
        ("segments.csv", lambda t: t.replace("p5\n", "p99\n", 1), "participant p99 is not in"),
        ("segments.csv", lambda t: t + "p1\n", "has 145 segments, the signals 144"),
    ]
    for i, (name, fn, match) in enumerate(cases):
        expect(_edit(small_data, str(tmp_path / f"case{i}"), name, fn), match)
    with pytest.raises(SystemExit, match="lower --batch-size"):
        bs.main(small(small_data, "--batch-size", "64", "--output-dir", str(tmp_path / "o")))
    for argv, match in [(["--tau", "0"], "--tau must be positive"), (["--batch-size", "1"], "at least 2"),
                        (["--aug-probs", "0.1,0.2"], "five probabilities"), (["--proj", "64"], "two sizes"),
                        (["--ridge-alphas", "a,b"], "not a comma-separated")]:
        with pytest.raises(SystemExit, match=match):
            bs.check_args(bs.get_args(argv), 1)
    bs.check_args(bs.get_args(["--batch-size", "1"]), 2)  # 1 x 2 processes: enough


def test_readme_paper_scale_line_gives_the_paper_batch(capsys):
    bs.check_args(bs.get_args(["--data", "/data/ahms_ppg", "--batch-size", "32"]), 8)
    assert capsys.readouterr().out == ""
    bs.check_args(bs.get_args(["--data", "/data/ahms_ppg"]), 8)
    assert "global batch 2048 = 256 x 8; the paper-scale batch is 256 (--batch-size 32" in capsys.readouterr().out


def test_tiny_preset_yields_to_explicit_flags():
    args = bs.get_args(["--tiny", "--width", "256", "--lr=1e-3"])
    assert args.width == 256 and args.lr == 1e-3 and args.batch_size == bs.TINY["batch_size"]


def test_bad_checkpoints_and_nan_keep_the_checkpoint(tmp_path, small_data):
    out = str(tmp_path / "run")
    run_main_inprocess(bs, small(small_data, "--max-steps", "3", "--output-dir", out))  # an epoch end
    ckpt = os.path.join(out, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        original = f.read()
    with pytest.raises(SystemExit, match="does not fit"):  # in-process: the same one-line SystemExit, faster
        bs.main(small(small_data, "--max-steps", "4", "--width", "72", "--output-dir", out))
    # step 4 throws the weights to ~1e30, step 5's loss is not finite: stop before the next save
    with pytest.raises(SystemExit, match="error: loss is"):
        bs.main(small(small_data, "--max-steps", "5", "--lr", "1e30", "--output-dir", out))
    with open(ckpt, "rb") as f:
        assert f.read() == original
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "dcl"}, other / "checkpoint.pt")
    _fails("--tiny", "--output-dir", str(other), match="not 'biosignal'")  # a subprocess: no traceback either
