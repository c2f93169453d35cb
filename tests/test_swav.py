"""Tests for swav.py: hand-computed worked examples E1-E4, properties, a --tiny run that learns, two processes equal
one process holding the global batch (losses, queue and gradients), exact resume, bf16 + compile, the collapse guard,
and bad input."""
import argparse
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import to_pil_image

import common
import swav
from helpers import (assert_tensors_close, free_port, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, run_torchrun)

T = torch.tensor


# --- 1. Core functions: worked examples (numbers computed in numpy float64) and properties ---
def test_sinkhorn_worked_examples():
    e1 = torch.log(T([[3.0, 1.0], [1.0, 1.0]]))
    assert torch.allclose(swav.sinkhorn(e1, eps=1.0, iters=1), T([[0.6, 0.4], [0.333333, 0.666667]]), atol=1e-6)
    assert torch.allclose(swav.sinkhorn(e1, eps=1.0, iters=3), T([[0.633803, 0.366197], [0.365854, 0.634146]]), atol=1e-6)
    r3 = 3 ** 0.5
    assert torch.allclose(swav.sinkhorn(e1, eps=1.0, iters=30), T([[r3, 1.0], [1.0, r3]]) / (1 + r3), atol=1e-6)
    e2 = T([[0.6, 0.4], [0.55, 0.45], [0.52, 0.48], [0.51, 0.49]])
    q = swav.sinkhorn(e2)
    assert torch.allclose(q, T([[0.909101, 0.090899], [0.575104, 0.424896], [0.289607, 0.710393],
                                [0.214621, 0.785379]]), atol=1e-5)
    assert torch.allclose(q.sum(0), T([1.988, 2.012]), atol=1e-3)  # prototype mass ~ B/K = 2 after 3 iterations
    e3 = T([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.15, 0.85]])  # queue rows prepended, their codes dropped
    q = swav.sinkhorn(torch.cat([e3, e2]))[-4:]
    assert torch.allclose(q, T([[0.999943, 0.000057], [0.999576, 0.000424], [0.998593, 0.001407],
                                [0.997903, 0.002097]]), atol=1e-5)


def test_sinkhorn_properties():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(256, 3000, generator=g) * 2 - 1  # cosine scores, |s| <= 1
    q = swav.sinkhorn(s)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(256), atol=1e-5)
    assert torch.allclose(swav.sinkhorn(s + 0.7), q, atol=1e-6)  # a constant shift changes nothing
    assert torch.isfinite(swav.sinkhorn(s * 5)).all()  # unnormalised: exp(5 / 0.05) overflows fp32 without the shift
    assert torch.allclose(swav.sinkhorn(torch.zeros(8, 5)), torch.full((8, 5), 0.2))  # uniform -> uniform
    q = swav.sinkhorn(torch.rand(12, 4, generator=g), iters=500)  # converged: prototype mass B/K
    assert torch.allclose(q.sum(0), torch.full((4,), 3.0), atol=1e-4)
    assert swav.sinkhorn(torch.rand(6, 4, generator=g, requires_grad=True)).grad_fn is None


def _fake_ranks(fn, inputs):
    """Run fn(x, all_reduce) on one thread per input with an in-place SUM all-reduce across threads."""
    n, slots, out = len(inputs), [None] * len(inputs), [None] * len(inputs)
    barrier = threading.Barrier(n)

    def run(r):
        def all_reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return t.copy_(total)
        out[r] = fn(inputs[r], all_reduce)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_sinkhorn_two_ranks_equal_one_process_with_the_global_batch():
    s = torch.rand(16, 10, generator=torch.Generator().manual_seed(1))
    full = swav.sinkhorn(s)
    halves = _fake_ranks(lambda x, ar: swav.sinkhorn(x, world_size=2, all_reduce=ar), list(s.chunk(2)))
    assert torch.allclose(torch.cat(halves), full, atol=1e-6)
    local = torch.cat([swav.sinkhorn(x) for x in s.chunk(2)])  # without the all-reduce: per-process equipartition
    assert (local - full).abs().max() > 1e-3


def test_swav_loss_worked_example_e4():
    s0 = T([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    s1 = T([[0.7, 0.3], [0.9, 0.1], [0.4, 0.6], [0.1, 0.9]])
    s2 = T([[0.6, 0.4], [0.5, 0.5], [0.5, 0.5], [0.3, 0.7]])
    q0, q1 = swav.sinkhorn(s0), swav.sinkhorn(s1)
    assert torch.allclose(q0, T([[0.999991, 0.000009], [0.999536, 0.000464], [0.975283, 0.024717], [0., 1.]]), atol=1e-5)
    assert torch.allclose(q1, T([[0.999647, 0.000353], [1., 0.], [0.017122, 0.982878], [0., 1.]]), atol=1e-5)
    assert swav.swav_loss([s0, s1]).item() == pytest.approx(0.757229, abs=1e-5)
    assert swav.swav_loss([s0, s1, s2]).item() == pytest.approx(0.570081, abs=1e-5)
    assert swav.swav_loss([torch.zeros(8, 3000)] * 2).item() == pytest.approx(math.log(3000), abs=1e-5)  # collapse


def test_swav_loss_gradient_and_queue():
    g = torch.Generator().manual_seed(2)
    s0, s1 = (F.normalize(torch.randn(6, 5, generator=g), dim=1).requires_grad_() for _ in range(2))
    swav.swav_loss([s0, s1]).backward()  # codes are constants: d/ds0 = (softmax(s0 / tau) - q1) / (tau * b * 2)
    q1 = swav.sinkhorn(s1)
    assert torch.allclose(s0.grad, (F.softmax(s0 / 0.1, 1) - q1).detach() / (0.1 * 6 * 2), atol=1e-6)
    queue = [torch.rand(10, 5, generator=g) for _ in range(2)]
    loss = swav.swav_loss([s0, s1], queue_scores=queue)
    q0, q1 = (swav.sinkhorn(torch.cat([qs, s]))[-6:] for qs, s in zip(queue, (s0, s1)))
    ce0, ce1 = (-(q * F.log_softmax(s / 0.1, 1)).sum(1).mean() for q, s in ((q0, s1), (q1, s0)))
    assert loss.item() == pytest.approx(((ce0 + ce1) / 2).item(), abs=1e-6)  # queue rows never in the loss


def test_queue_fifo_and_scores():
    q = swav.SwAVQueue(n_assign=2, length=4, dim=3)
    batches = [[torch.full((2, 3), float(10 * i + j)) for j in range(2)] for i in range(3)]
    q.push(batches[0])
    assert not q.full
    q.push(batches[1])
    q.push(batches[2])
    assert q.full and q.embeddings[0, :, 0].tolist() == [20, 20, 10, 10]  # newest first, oldest dropped
    assert q.embeddings[1, :, 0].tolist() == [21, 21, 11, 11]
    scores = q.scores(torch.eye(3))
    assert len(scores) == 2 and scores[0].shape == (4, 3)
    q2 = swav.SwAVQueue(2, 4, 3)
    q2.load_state_dict(q.state_dict())
    assert q2.full and torch.equal(q2.embeddings, q.embeddings)


def test_prototypes_normalised_and_frozen():
    model = swav.SwAV("small_cnn", 16, 8, 20)
    swav.normalize_prototypes_(model.prototypes)
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(20))
    model.prototypes.weight.grad = torch.ones(20, 8)
    swav.freeze_prototype_grads_(model, iteration=3, n_frozen=4)
    assert model.prototypes.weight.grad is None
    model.prototypes.weight.grad = torch.ones(20, 8)
    swav.freeze_prototype_grads_(model, iteration=4, n_frozen=4)
    assert model.prototypes.weight.grad is not None


def test_lr_schedule():
    lr = swav.lr_schedule(4.8, 0.0048, epochs=10, iters_per_epoch=5, warmup_epochs=2, start_warmup=0.3)
    assert len(lr) == 50 and lr[0] == pytest.approx(0.3) and lr[10] == pytest.approx(4.8)
    assert lr[-1] == pytest.approx(0.0048)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_lars_one_step_matches_the_larc_formula():
    w, zero = torch.nn.Parameter(T([3.0, 4.0])), torch.nn.Parameter(T([0.0, 0.0]))
    opt = swav.LARS([w, zero], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    w.grad, zero.grad = T([0.6, 0.8]), T([1.0, -1.0])
    opt.step()
    local = 0.01 * 5.0 / (1.0 + 0.1 * 5.0 + 1e-8)  # trust ||w|| / (||g|| + wd ||w|| + eps)
    d = (T([0.6, 0.8]) + 0.1 * T([3.0, 4.0])) * local
    assert torch.allclose(w.detach(), T([3.0, 4.0]) - 2.0 * d, atol=1e-7)
    assert torch.allclose(zero.detach(), T([-2.0, 2.0]))  # zero weight norm: plain SGD, no weight decay
    w_before = w.detach().clone()
    w.grad, zero.grad = T([0.6, 0.8]), None  # a frozen tensor (no grad) is skipped
    opt.step()
    local2 = 0.01 * w_before.norm() / (1.0 + 0.1 * w_before.norm() + 1e-8)
    d2 = (T([0.6, 0.8]) + 0.1 * w_before) * local2
    assert torch.allclose(w.detach(), w_before - 2.0 * (0.9 * d + d2), atol=1e-6)
    assert torch.allclose(zero.detach(), T([-2.0, 2.0]))


def _torchvision_colour(x, p, taps):
    """The colour part applied crop by crop with torchvision's functional ops on float images: the reference."""
    from torchvision.transforms.v2 import functional as TF
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for img, q in zip(x, p):
        for op in q[1:5].long().tolist() if q[0] else []:
            img = ops[op](img, float(q[5 + op]))
        img = TF.rgb_to_grayscale(img, 3) if q[9] else img
        out.append(TF.gaussian_blur(img, [taps] * 2, [float(q[10])] * 2) if q[10] else img)
    return torch.stack(out)


def test_colour_draws_are_the_official_distribution():
    """colour_params, drawn in the worker: jitter w.p. 0.8 with ColorJitter(0.8, 0.8, 0.8, 0.2)'s ranges and a
    uniformly random order of the 4 ops, grayscale w.p. 0.2, blur w.p. 0.5 of sigma U(0.1, 2) (none on crops of
    64 px or less); the worker hands uint8 crops and their draws, large crops first, the same for the same seed."""
    n = 12000
    with common.seeded(0):
        p = torch.stack([swav.colour_params() for _ in range(n)])
    assert abs(p[:, 0].mean() - 0.8) < 0.015 and abs(p[:, 9].mean() - 0.2) < 0.015
    blurred = p[:, 10][p[:, 10] > 0]
    assert abs(len(blurred) / n - 0.5) < 0.015 and 0.1 <= blurred.min() < 0.11 and 1.99 < blurred.max() <= 2.0
    lo, hi = p[:, 5:9].min(0).values, p[:, 5:9].max(0).values
    torch.testing.assert_close(lo, T([0.2, 0.2, 0.2, -0.2]), atol=2e-3, rtol=0)  # brightness, contrast, saturation,
    torch.testing.assert_close(hi, T([1.8, 1.8, 1.8, 0.2]), atol=2e-3, rtol=0)  # hue: uniform in these ranges
    torch.testing.assert_close(p[:, 5:9].mean(0), T([1.0, 1.0, 1.0, 0.0]), atol=0.02, rtol=0)
    assert (p[:, 1:5].sort(1).values == torch.arange(4.0)).all()  # every order is a permutation of the 4 ops
    _, counts = torch.unique(p[:, 1:5], dim=0, return_counts=True)
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 5 * (n / 24) ** 0.5  # uniform over the 24
    with common.seeded(0):
        assert all(swav.colour_params(blur=False)[10] == 0 for _ in range(200))
    photo = to_pil_image(torch.rand(3, 375, 500))
    t = swav.multicrop_transform()
    with common.seeded(5):
        crops = t(photo)
    with common.seeded(5):
        again = t(photo)
    assert [c.shape for c, _ in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.uint8 and q.shape == (11,) for c, q in crops)
    assert all(torch.equal(a, b) and torch.equal(q, r) for (a, q), (b, r) in zip(crops, again))


def test_colour_augment_matches_torchvision_ops():
    """colour_augment on a batch, each crop with its own draws, equals torchvision's adjust_brightness / contrast /
    saturation / hue in the crop's order, rgb_to_grayscale and gaussian_blur (13 taps) applied crop by crop; to_input
    then normalises with the official SwAV statistics."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(8, 3, 5, 6, generator=g), size=(40, 48), mode="bicubic").clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    p = T([  # on, order (0 brightness 1 contrast 2 saturation 3 hue), factors by op, grey, sigma
        [1, 0, 1, 2, 3, 1.6, 0.4, 1.7, 0.15, 0, 0], [1, 3, 2, 1, 0, 0.3, 1.8, 0.2, -0.2, 0, 0.7],
        [1, 1, 3, 0, 2, 0.9, 1.3, 0.5, 0.05, 1, 0], [1, 2, 0, 3, 1, 1.2, 0.6, 1.4, -0.1, 0, 2.0],
        [0, 3, 0, 1, 2, 1.8, 0.2, 1.8, 0.2, 0, 0], [0, 0, 1, 2, 3, 1.0, 1.0, 1.0, 0.0, 1, 0.1],
        [1, 3, 1, 2, 0, 1.1, 1.5, 0.3, 0.19, 0, 1.3], [1, 0, 3, 2, 1, 0.5, 0.9, 1.6, -0.17, 1, 0.4]])
    want = _torchvision_colour(x.float() / 255, p, 13)
    got = swav.colour_augment(x.float() / 255, p)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    change = (got - x.float() / 255).abs().amax((1, 2, 3))
    assert change[4] == 0 and (change[torch.arange(8) != 4] > 0.05).all()  # jitter off, no grey, no blur: unchanged
    mean, std = (T(v).view(1, 3, 1, 1) for v in (swav.MEAN, swav.STD))
    torch.testing.assert_close(swav.to_input(x, torch.device("cpu"), p), (want - mean) / std, atol=1e-4, rtol=0)
    torch.testing.assert_close(swav.to_input(x, torch.device("cpu")), (x / 255 - mean) / std)


def test_multicrop_is_seeded_and_shaped():
    image = swav.SyntheticTextures(1, seed=0)[0][0]
    t = swav.multicrop_transform((32, 16), (2, 3), (0.14, 0.05), (1.0, 0.14))
    with common.seeded(5):
        a = t(image)
    with common.seeded(5):
        b = t(image)
    assert [c.shape[-1] for c, _ in a] == [32, 32, 16, 16, 16] and all(c.dtype == torch.uint8 for c, _ in a)
    assert all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b))
    assert all(p[10] == 0 for _, p in a)  # no blur at 32 px and below


def test_linear_probe_never_changes_the_backbone():
    torch.manual_seed(0)
    model = swav.SwAV("resnet18", 32, 16, 10).train()  # BatchNorm: running statistics would move in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sets = [swav.SyntheticTextures(n, s) for n, s in ((40, 0), (20, 1))]
    args = argparse.Namespace(workers=0, probe_epochs=3, probe_lr=0.3, knn_k=5, knn_t=0.1, size_crops=[32],
                              probe_fixed_features=False, probe_standardize=False)  # eval_linear.py's re-cropping
    metrics = swav.evaluate(model.backbone, *sets, 10, False, args, torch.device("cpu"), "none")
    assert list(metrics) == ["linear_top1", "knn_top1", "linear_top1_last_epoch"] and model.training
    assert_tensors_close(before, model.state_dict())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_linear_probe_reports_the_best_epoch():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 8, generator=g)
    y = (f[:, 0] > 0).long()

    def batches(epoch):  # right labels for 5 epochs, then flipped: the last epoch is far from the best
        yield f, y if epoch < 5 else 1 - y

    best, last = swav.linear_probe(batches, f, y, 2, epochs=20, lr=0.3)
    assert best > 90 and last < 50, (best, last)  # eval_linear.py reports the best top-1 over the epochs


def test_collapse_guard_stops_a_run_stuck_at_ln_k():
    guard = swav.CollapseGuard(100, start=20, window=30)
    ln_k = math.log(100)
    for step in range(10, 60, 10):
        guard.update(step, ln_k + 0.005)  # at ln K, but only from step 30 on after the start: window not reached
    guard.update(60, ln_k + 0.5)  # learning again: the window restarts
    for step in range(70, 100, 10):
        guard.update(step, ln_k - 0.009)
    with pytest.raises(SystemExit, match="collapse"):
        guard.update(100, ln_k + 0.001)
    swav.CollapseGuard(100, start=0, window=0).update(10 ** 6, ln_k)  # window 0: never


def test_check_args_trims_the_queue_as_main_swav():
    args = swav.check_args(swav.get_args(["--data", "/data/imagenet"]), 8)  # 64 x 8 = 512: 3840 -> 3584
    assert args.queue_length == 3584
    args = swav.check_args(swav.get_args(["--data", "/data/imagenet", "--batch-size", "32"]), 8)  # 256: kept
    assert args.queue_length == 3840 and args.lr == 0.6
    with pytest.raises(SystemExit, match="shorter than the global batch"):
        swav.check_args(swav.get_args(["--queue-length", "100"]), 2)


def test_tiny_data_preset_only_with_real_data():
    synthetic, real = swav.get_args(["--tiny"]), swav.get_args(["--tiny", "--data", "/data/digits", "--lr", "0.5"])
    assert synthetic.nmb_prototypes == 3000 and synthetic.size_crops == [32, 16] and synthetic.lr == 4.8
    assert all(getattr(real, k) == v for k, v in swav.TINY_DATA.items() if k != "lr") and real.lr == 0.5
    assert real.arch == "small_cnn" and real.probe_fixed_features  # the rest of TINY, so the probe is the same


# --- 2. --tiny learns ---
def test_tiny_run_learns(tmp_path):
    p = run_script("swav.py", "--tiny", "--output-dir", tmp_path, timeout=240, threads=1)
    m = read_metrics(tmp_path)
    print(p.stdout.splitlines()[-1])
    assert list(m)[:2] == ["linear_top1", "knn_top1"]
    assert m["knn_top1"] > m["knn_top1_init"] + 10, m
    assert m["linear_top1"] > m["linear_top1_init"] + 5, m
    log = read_log(tmp_path)
    assert any(r.get("queue_in_use") for r in log) and "eval" in log[-1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A small ImageFolder root of synthetic PNGs: train/ 8 and val/ 4 images of each of the 10 classes."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, per_class, seed in (("train", 8, 0), ("val", 4, 1)):
        ds = swav.SyntheticTextures(200, seed)
        for c in range(10):
            os.makedirs(root / split / f"class{c}")
            for i in (ds.labels == c).nonzero().flatten()[:per_class].tolist():
                to_pil_image(ds[i][0]).save(root / split / f"class{c}" / f"{i}.png")
    return root


# --- 3. two processes == one process holding the global batch ---
def test_two_processes_match_one(tmp_path, image_folder):
    flags = ["--tiny", "--data", image_folder, "--max-steps", "4", "--log-every", "1", "--queue-length", "64",
             "--epoch-queue-starts", "0", "--freeze-prototypes-niters", "2"]  # 2 steps per epoch; queue used from step 3
    run_script("swav.py", *flags, "--batch-size", "32", "--output-dir", tmp_path / "one", threads=1)
    run_torchrun("swav.py", *flags, "--batch-size", "16", "--output-dir", tmp_path / "two", nproc=2)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    # Every loss uses codes of the global batch: the Sinkhorn all-reduce gives each process the one-process codes
    # (test_sinkhorn_two_ranks_equal_one_process_with_the_global_batch shows that without it they differ by > 1e-3).
    for a, b in zip(one[:4], two[:4]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    assert one[3]["queue_in_use"] and two[3]["queue_in_use"]
    c1, c2 = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "two")
    # LARS rescales every gradient to a fixed relative step, so the bias before the head's BatchNorm, whose exact
    # gradient is zero, moves by rounding noise (and the running mean after it); every other tensor agrees to 1e-6.
    noisy = ("projection_head.0.bias", "projection_head.1.running_mean")
    assert_tensors_close(*({k: v for k, v in c["model"].items() if k not in noisy} for c in (c1, c2)), atol=1e-6)
    # One process: rows [batch t (32), batch t-1 (32)]; process r holds rows r*16:(r+1)*16 of each batch.
    q1 = c1["ranks"][0]["queue"]["embeddings"].view(2, 2, 2, 16, -1)  # (assign, batch, rank, row, D)
    q2 = torch.stack([r["queue"]["embeddings"].view(2, 2, 16, -1) for r in c2["ranks"]], 2)
    assert_tensors_close(q1, q2, atol=1e-5)


def _grads_of_two_steps(rank, world):
    """Gradients of train_step (the training code path) on this process's share of two global batches of 32,
    under DDP when world > 1; the queue (one global batch long) is filled by the first step and used by the second."""
    args = swav.get_args(["--tiny", "--queue-length", "32"])
    g = torch.Generator().manual_seed(3)
    with common.seeded(3):  # each crop: uint8 images and their colour draws
        batches = [[(torch.randint(0, 256, (32, 3, s, s), dtype=torch.uint8, generator=g),
                     torch.stack([swav.colour_params() for _ in range(32)])) for s in (32, 32, 16, 16)]
                   for _ in range(2)]
    torch.manual_seed(0)
    model = swav.SwAV(args.arch, args.hidden_mlp, args.feat_dim, args.nmb_prototypes)
    train_model = common.distribute(model, torch.device("cpu"))
    queue = swav.SwAVQueue(2, 32 // world, args.feat_dim)
    grads = []
    for batch in batches:
        loss, queue_in_use = swav.train_step(train_model, model, [(c.chunk(world)[rank], p.chunk(world)[rank])
                                                                  for c, p in batch], queue, args, "none")
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert queue_in_use
    return grads


def _grad_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common.setup_distributed()
    torch.save(_grads_of_two_steps(rank, world), os.path.join(out, f"rank{rank}.pt"))
    common.cleanup_distributed()


def test_two_processes_give_the_one_process_gradients(tmp_path):
    # LARS hides a gradient that is off by a constant factor: compare the gradients themselves.
    torch.multiprocessing.spawn(_grad_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one = _grads_of_two_steps(0, 1)
    for r in range(2):
        two = torch.load(tmp_path / f"rank{r}.pt")
        for step in range(2):
            for name, a in one[step].items():  # the bias before BatchNorm has gradient 0 up to rounding
                if name == "projection_head.0.bias":
                    assert a.abs().max() < 1e-6 and two[step][name].abs().max() < 1e-6
                    continue
                b = two[step][name]
                assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7, (r, step, name, (a - b).abs().max())


# --- 4. resume is exact ---
def test_resume_is_exact(tmp_path, image_folder):
    # 5 steps per epoch; the queue is created at step 5 and full after step 7, where the run is interrupted mid-epoch
    flags = ["--tiny", "--data", image_folder, "--epochs", "3", "--batch-size", "16", "--queue-length", "32",
             "--epoch-queue-starts", "1", "--freeze-prototypes-niters", "3"]
    swav.main([*map(str, flags), "--max-steps", "14", "--output-dir", str(tmp_path / "once")])
    swav.main([*map(str, flags), "--max-steps", "7", "--output-dir", str(tmp_path / "twice")])
    assert load_ckpt(tmp_path / "twice")["ranks"][0]["queue"]["n_pushed"] == 32  # the queue is full at the interruption
    swav.main([*map(str, flags), "--max-steps", "14", "--output-dir", str(tmp_path / "twice")])
    a, b = load_ckpt(tmp_path / "once"), load_ckpt(tmp_path / "twice")
    assert a["step"] == b["step"] == 14
    for key in ("model", "optimizer"):
        assert_tensors_close(a[key], b[key], path=key)
    assert_tensors_close(a["ranks"][0]["queue"], b["ranks"][0]["queue"], path="queue")
    assert read_metrics(tmp_path / "once") == read_metrics(tmp_path / "twice")


# --- GPU settings as far as a CPU allows ---
def test_bf16_and_compile_run_without_graph_breaks(tmp_path, image_folder):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run_main_inprocess(swav, ["--tiny", "--data", image_folder, "--batch-size", "16", "--max-steps", "3",
                              "--amp", "bf16", "--compile", "aot_eager", "--output-dir", tmp_path])
    assert read_log(tmp_path)[-2]["step"] == 3 and math.isfinite(read_log(tmp_path)[-2]["loss"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph, no recompilation
    torch._dynamo.reset()


# --- 5. bad input ---
def _error(argv):
    with pytest.raises(SystemExit) as e:
        swav.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_input(tmp_path, image_folder):
    out = ["--output-dir", tmp_path / "run"]
    assert "is not a folder" in _error(["--tiny", "--data", tmp_path / "missing", *out])
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    assert "cannot read" in _error(["--tiny", "--data", tmp_path / "empty", *out])
    (tmp_path / "neither").mkdir()
    assert "neither train/ and val/" in _error(["--tiny", "--data", tmp_path / "neither", *out])
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    assert "cannot read" in _error(["--tiny", "--data", tmp_path / "cifar", *out])
    assert "shorter than the global batch" in _error(["--tiny", "--queue-length", "16", *out])
    assert "same length" in _error(["--tiny", "--nmb-crops", "2", "2", "2", *out])

    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "dcl"}, other / "checkpoint.pt")
    assert "not 'swav'" in _error(["--tiny", "--output-dir", other])

    good = ["--tiny", "--data", image_folder, "--batch-size", "16", "--output-dir", tmp_path / "good"]
    swav.main([str(a) for a in good + ["--max-steps", "2"]])
    ckpt = tmp_path / "good" / "checkpoint.pt"
    saved = ckpt.read_bytes()
    assert "does not fit" in _error([*good, "--nmb-prototypes", "50"])
    p = run_script("swav.py", *good, "--max-steps", "4", "--lr", "1e38", check=False)  # real exit code
    assert p.returncode != 0 and ("error: loss is nan" in p.stdout or "not finite" in p.stdout), p.stdout[-2000:]
    assert ckpt.read_bytes() == saved


def _eval_worker(rank, world, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sharded_eval(), f"{out}/{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def _sharded_eval():
    """evaluate() on a fixed random backbone: this process's training-feature shard, kNN and the probe."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    train, val = swav.SyntheticTextures(301, seed=0), swav.SyntheticTextures(40, seed=1)  # shards of 151 + 150
    shard = swav.extract_features(backbone, swav.Seeded(train, swav.eval_transform(32, False)), torch.device("cpu"),
                                  "none", gather=False)[0]
    args = argparse.Namespace(workers=0, probe_epochs=4, probe_lr=0.3, knn_k=20, knn_t=0.1, size_crops=[32],
                              probe_fixed_features=True, probe_standardize=True)
    made, linear = [], torch.nn.Linear

    class Recorded(linear):  # the probe's classifier, to compare its weights
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    torch.nn.Linear = Recorded
    try:
        metrics = swav.evaluate(backbone, train, val, 10, False, args, torch.device("cpu"), "none")
    finally:
        torch.nn.Linear = linear
    return {"rows": len(shard), "probe": made[-1].weight.detach().clone(), **metrics}


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each process keeps only its shard of the training features (half the rows with two), the kNN top k merged
    across processes and the data-parallel probe (each global batch of the one-process order, the mean over it)
    give what one process gives."""
    import torch.multiprocessing as mp
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    one = _sharded_eval()
    assert one["rows"] == 301 and [t["rows"] for t in two] == [151, 150]  # global batch 256 = 2 x 128 either way
    for t in two:
        err = (t["probe"] - one["probe"]).norm() / one["probe"].norm()
        assert t["knn_top1"] == one["knn_top1"] and t["linear_top1"] == one["linear_top1"]
        assert err < 1e-4, f"probe weights differ by {err:.2e} of their norm"  # a gradient scale error fails
