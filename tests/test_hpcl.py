"""Tests for hpcl.py: the spec's worked examples (hyper-pixel pooling and labels, L_hpcl in both forms, metrics from a
hand-computed confusion matrix), the queue's FIFO order, anchor sampling, boundary cells, DEM derivatives, L_hpcl
against a loop over anchors, one real training step in two processes against one (gradients via plain SGD, the
queue), a --tiny run that learns and beats the RGB-only ablation, exact resume (model, momentum model, queues,
optimizer), bf16 and compile steps, tiles from folders, and bad input."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

import common
import hpcl
from helpers import (assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess, run_script,
                     run_torchrun)

CPU = torch.device("cpu")


# --- 1. Worked examples and properties ---
def test_worked_example_pooling_and_labels():
    feats = torch.arange(32.0).reshape(1, 2, 4, 4)
    seg = hpcl.hyperpixel_grid(4, 4, 2)
    assert seg.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    pooled, counts = hpcl.hyperpixel_pool(feats, seg)
    assert pooled[0].tolist() == [[2.5, 18.5], [4.5, 20.5], [10.5, 26.5], [12.5, 28.5]]
    assert counts.tolist() == [[4, 4, 4, 4]]
    gt = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]])
    assert hpcl.hyperpixel_labels(gt, seg, 0.75).tolist() == [[1, 0, 1, 0]]
    assert hpcl.hyperpixel_labels(gt, seg, 0.8).tolist() == [[-1, 0, 1, -1]]  # 0.75 and 0.25 are mixed at rho 0.8
    # per-image segments (B, H, W) and a ragged grid (5 x 5 in cells of 2: 3 x 3 cells)
    pooled2, _ = hpcl.hyperpixel_pool(feats.expand(2, -1, -1, -1), seg.expand(2, 4, 4))
    assert torch.equal(pooled2[1], pooled[0])
    g = hpcl.hyperpixel_grid(5, 5, 2)
    assert g.max() == 8 and g[4, 4] == 8 and g[0, 4] == 2


def test_worked_example_hpcl_loss_both_forms():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0])
    bank = torch.tensor([[1.0, 0.1], [0.9, -0.1], [0.0, 1.0], [0.1, 1.0]])  # normalised inside
    bank_labels = torch.tensor([1, 1, 0, 0])
    per, valid = hpcl.hpcl_terms(anchors, labels, bank, bank_labels, 0.1, "per_positive")
    assert valid.all() and torch.allclose(per, torch.tensor([0.00017777, 0.00014134]), atol=1e-7, rtol=1e-3)
    assert hpcl.hpcl_loss(anchors, labels, bank, bank_labels, 0.1).item() == pytest.approx(0.00015955, rel=1e-3)
    sup, _ = hpcl.hpcl_terms(anchors, labels, bank, bank_labels, 0.1, "supcon")
    assert torch.allclose(sup, torch.tensor([0.69325270, 0.69352565]), atol=1e-5)  # ~ log 2
    assert hpcl.hpcl_loss(anchors, labels, bank, bank_labels, 0.1, "supcon").item() == pytest.approx(math.log(2),
                                                                                                    abs=1e-3)


def naive_hpcl(q, y, bank, bl, tau, form, max_pos, max_neg):
    """Sec. 5 anchor by anchor in float64; positives / negatives: the first max_pos / max_neg of their label."""
    q, bank = F.normalize(q.double(), dim=1), F.normalize(bank.double(), dim=1)
    losses = []
    for a in range(len(q)):
        if y[a] < 0:
            continue
        pos = [j for j in range(len(bank)) if bl[j] == y[a]][:max_pos]
        neg = [j for j in range(len(bank)) if bl[j] == 1 - y[a]][:max_neg]
        if not pos:
            continue
        l = bank @ q[a] / tau
        terms = []
        for p in pos:
            others = neg if form == "per_positive" else neg + [x for x in pos if x != p]
            terms.append(-l[p] + torch.logsumexp(l[[p] + others], 0))
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("form", ["per_positive", "supcon"])
def test_hpcl_loss_matches_the_formula_and_runs_in_fp32(form):
    torch.manual_seed(0)
    q = torch.randn(9, 5).bfloat16().float().requires_grad_()
    y = torch.tensor([0, 1, 1, -1, 0, 1, 0, 0, -1])
    bank, bl = torch.randn(30, 5), torch.randint(-1, 2, (30,))
    want = naive_hpcl(q, y, bank, bl, 0.2, form, 4, 6)
    got = hpcl.hpcl_loss(q, y, bank, bl, 0.2, form, max_pos=4, max_neg=6)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert abs(got.item() - hpcl.hpcl_loss(q, y, bank, bl, 0.2, form).item()) > 1e-3  # the subsample matters
    g_want = torch.autograd.grad(want, q)[0].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = hpcl.hpcl_loss(q, y, bank, bl, 0.1, form, 4, 6)
    assert got16.dtype == torch.float32
    assert got16.item() == pytest.approx(hpcl.hpcl_loss(q, y, bank, bl, 0.1, form, 4, 6).item(), abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, q)[0], g_want, atol=1e-5, rtol=1e-4)
    # no positive in the bank -> the anchor does not count; an empty bank gives 0
    _, valid = hpcl.hpcl_terms(q, y, bank, torch.zeros(30, dtype=torch.long))
    assert valid.tolist() == (y == 0).tolist()
    assert hpcl.hpcl_loss(q, y, bank, torch.full((30,), -1)).item() == 0.0


def test_worked_example_metrics():
    gt = torch.tensor([0] * 8 + [1] * 8)
    pred = torch.tensor([0] * 8 + [0, 0] + [1] * 6)  # confusion [[8, 0], [2, 6]]
    assert hpcl.confusion_matrix(pred, gt).tolist() == [[8, 0], [2, 6]]
    m = hpcl.seg_metrics(pred, gt)
    assert m["iou_bg"] == pytest.approx(0.8) and m["iou_landslide"] == pytest.approx(0.75)
    assert m["miou"] == pytest.approx(0.775) and m["f1_landslide"] == pytest.approx(12 / 14)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(0.75)
    assert list(m)[:3] == ["miou", "iou_landslide", "f1_landslide"]
    torch.manual_seed(0)
    for _ in range(5):  # F1 = 2 IoU / (1 + IoU) for one accumulated matrix, not a mean over images
        gt, pred = torch.rand(1000) < 0.2, torch.rand(1000) < 0.3
        m = hpcl.seg_metrics(pred, gt)
        assert abs(m["f1_landslide"] - 2 * m["iou_landslide"] / (1 + m["iou_landslide"])) < 1e-9
    assert hpcl.metrics_from_confusion(torch.tensor([[3, 1], [2, 4]]))["iou_landslide"] == pytest.approx(4 / 7)


def test_class_queue_fifo_per_class():
    q = hpcl.ClassQueue(dim=1, size=3)
    feats, labels = q.get()
    assert feats.shape == (6, 1) and (labels == -1).all()
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([1, 0, -1, 1]))
    q.enqueue(torch.tensor([[5.0], [6.0], [7.0]]), torch.tensor([1, 1, 0]))
    # class 1 got 1, 4, 5, 6: the 4th overwrites the oldest slot; class 0 got 2, 7; 3 (label -1) nowhere
    assert q.feats[1, :3, 0].tolist() == [6.0, 4.0, 5.0] and q.feats[0, :2, 0].tolist() == [2.0, 7.0]
    assert q.ptr.tolist() == [2, 1] and q.filled.tolist() == [2, 3]
    feats, labels = q.get()
    assert labels.tolist() == [0, 0, -1, 1, 1, 1] and 3.0 not in feats[labels >= 0].flatten().tolist()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = q.sample(2, g1), q.sample(2, g2)
    assert torch.equal(a[0], b[0]) and a[0].shape == (4, 1) and set(a[1].tolist()) <= {-1, 0, 1}
    r = hpcl.ClassQueue(dim=1, size=3)
    r.load_state_dict(q.state_dict())
    assert_tensors_close(r.state_dict(), q.state_dict())
    with pytest.raises(ValueError):
        hpcl.ClassQueue(dim=2, size=3).load_state_dict(q.state_dict())


def test_boundary_cells_and_anchor_sampling():
    lab = torch.tensor([[[0, 0, 0, 0], [0, 1, 1, -1], [0, 0, -1, -1], [0, 0, 0, 0]]])
    b = hpcl.boundary_cells(lab)
    want = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert b.int().tolist() == [want]
    seg = hpcl.hyperpixel_grid(4, 4, 1)[None]
    assert torch.equal(hpcl.segment_boundary(lab.flatten(1), seg), b.flatten(1))
    seg2 = hpcl.hyperpixel_grid(8, 8, 2)[None]  # cells of 2 x 2 positions: the same cells, the same boundary
    assert torch.equal(hpcl.segment_boundary(lab.flatten(1), seg2), b.flatten(1))
    labels, boundary = lab.flatten(1), b.flatten(1)
    prio = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    idx, alab = hpcl.sample_anchors(labels, boundary, prio, n=4, boundary_frac=0.5)
    assert idx.shape == alab.shape == (1, 8)
    bg, ls = idx[0, :4], idx[0, 4:]
    assert alab[0].tolist() == [0, 0, 0, 0, 1, 1, -1, -1]  # only 2 landslide cells exist
    assert (labels[0, bg] == 0).all() and set(ls[:2].tolist()) == {5, 6}
    assert boundary[0, bg[:2]].all() and len(set(bg.tolist())) == 4  # half from the boundary, no repeats
    prio_b = torch.where(boundary, 0.1 * prio, prio)  # boundary cells have the lowest priority: still picked first
    idx_b, _ = hpcl.sample_anchors(labels, boundary, prio_b, 4, 0.5)
    assert boundary[0, idx_b[0, :2]].all()
    idx0, alab0 = hpcl.sample_anchors(torch.zeros(1, 16, dtype=torch.long), boundary & False, prio, 4, 0.5)
    assert alab0[0].tolist() == [0] * 4 + [-1] * 4  # a class absent from the image gets no anchors


def test_dem_derivatives_on_a_plane_and_kmeans_segments():
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    d = hpcl.dem_derivatives((0.5 * xs + 100)[None, None], gsd=1.0, scale=10.0)
    assert d.shape == (1, 3, 16, 16) and abs(d[0, 0].mean().item()) < 1e-5
    assert d[0, 0, 0, 1] - d[0, 0, 0, 0] == pytest.approx(0.05)  # elevation over 10 m
    inner = d[0, :, 1:-1, 1:-1]
    assert torch.allclose(inner[1], torch.tensor(math.atan(0.5) / (math.pi / 2)))
    # surface normal (-0.5, 0, 1)/|.|, sun (-1, -1, sqrt 2)/2: a slope rising to the east faces west, to the sun
    assert torch.allclose(inner[2], torch.tensor((0.5 + math.sqrt(2)) / 2 / math.sqrt(1.25)))
    torch.manual_seed(0)
    rgb, dem = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    seg = hpcl.hyperpixel_kmeans(rgb, dem, cell=2)
    assert seg.shape == (2, 8, 8) and seg.min() >= 0 and seg.max() < 16


def test_momentum_update_and_model_shapes():
    torch.manual_seed(0)
    for fusion in ("late", "early", "rgb"):
        model = hpcl.SegNet(fusion, (8, 16, 32, 64), (1, 1, 1, 1), 16, 8)
        logits, emb = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
        assert logits.shape == (2, 2, 64, 64) and emb.shape == (2, 8, 16, 16)
        assert torch.allclose(emb.norm(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    teacher = common.momentum_copy(model)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.rgb.bn1.running_mean.add_(3.0)
    hpcl.momentum_update_(teacher, model, 0.9)
    for t, b, p in zip(teacher.parameters(), before, model.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * p)
    assert torch.equal(teacher.rgb.bn1.running_mean, model.rgb.bn1.running_mean)  # buffers copied


def test_synthetic_data_dem_carries_the_signal():
    t = hpcl.synth_loess(64, 64, seed=0)
    assert t.rgb.dtype == torch.uint8 and t.rgb.shape == (64, 3, 64, 64) and t.dem.shape == (64, 1, 64, 64)
    assert torch.equal(t.rgb, hpcl.synth_loess(64, 64, seed=0).rgb)
    frac = t.mask.float().mean().item()
    assert 0.05 < frac < 0.15
    m = t.mask.bool()
    slope = hpcl.dem_derivatives(t.dem)[:, 1]
    band = hpcl.boundary_band(t.mask, 2) & m  # the head scarp: steep inside the rim
    assert slope[band].mean() > 1.5 * slope[~m].mean()
    tint = (t.rgb[:, 0].float() - t.rgb[:, 1].float())  # red minus green: the weak landslide cue
    assert tint[m].mean() - tint[~m].mean() < 8  # a hint only (of 255)


# --- 2. Two processes vs one ---
def _sgd_step(per_rank):
    """One real hpcl.train_step (L = CE + Dice + 1.0 L_hpcl against a pre-filled queue, DDP from common.distribute
    with two processes) on this rank's slice of the first global batch, plain SGD at lr 1: the parameter change is
    minus the DDP-averaged gradient. BatchNorm in eval mode (on CPU it is per process)."""
    args = hpcl.get_args(["--tiny", "--hpcl-weight", "1.0", "--dice", "--anchors", "8", "--pos-sample", "40",
                          "--neg-sample", "60"])
    torch.manual_seed(0)
    model = hpcl.SegNet("late", args.widths, args.depths, args.dec_dim, args.emb_dim).eval()
    teacher = common.momentum_copy(model).eval()
    queue = hpcl.ClassQueue(args.emb_dim, args.queue)
    queue.enqueue(torch.randn(200, args.emb_dim), torch.randint(0, 2, (200,)))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    tiles = hpcl.synth_loess(16, 64, seed=0)
    data = hpcl.TrainTiles(tiles, 64)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=per_rank,
                                                  sampler=common.ResumableSampler(16, per_rank, seed=0))))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, ce, hp = hpcl.train_step(common.distribute(model, CPU), model, teacher, queue, opt,
                                   torch.amp.GradScaler("cpu", enabled=False), batch, args,
                                   hpcl.class_weights(tiles, "on"), True, torch.Generator().manual_seed(5), CPU,
                                   "none")
    return {"step": {k: before[k] - p.detach() for k, p in model.named_parameters()}, "queue": queue.state_dict(),
            "loss": torch.stack([loss, ce, hp])}


def _two_process_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sgd_step(8 // world), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_step_and_queue():
    """2 x 4 tiles change every parameter as one process on the 8 does (CE, Dice, L_hpcl normalised by global
    counts), compared per tensor at 1e-3 of its norm: a gradient off by a constant factor fails. The queues end equal
    (gathered keys in rank order) and the mean of the ranks' losses is the one-process loss."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_two_process_worker, args=(2, f"{d}/init", d), nprocs=2, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    one = _sgd_step(8)
    for k, want in one["step"].items():
        for r in range(2):
            got = res[r]["step"][k]
            assert want.norm() > 0 and (got - want).norm() <= 1e-3 * want.norm(), \
                f"{k}: |step diff| {(got - want).norm():.3g} vs |step| {want.norm():.3g}"
    for r in range(2):
        assert_tensors_close(res[r]["queue"], one["queue"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, one["loss"], atol=1e-5, rtol=1e-4)
    assert one["loss"][2] > 0.1  # the contrastive term is active
    assert one["queue"]["filled"].sum() > 200  # this step enqueued keys (200 were there before)


def _sharded_eval():
    """evaluate() of a fixed random SegNet on 7 test tiles, counting the tiles this process predicted."""
    torch.manual_seed(0)
    args = hpcl.get_args(["--tiny"])
    model = hpcl.SegNet("late", args.widths, args.depths, args.dec_dim, args.emb_dim)
    seen, forward = [], model.forward
    model.forward = lambda rgb, dem: (seen.append(len(rgb)), forward(rgb, dem))[1]
    metrics = hpcl.evaluate(model, hpcl.synth_loess(7, 64, seed=1), args, CPU, "none")
    return {"tiles": sum(seen), **metrics}


def _eval_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sharded_eval(), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each of two processes predicts its shard of the test tiles (4 + 3 of 7); the summed confusion matrices give
    the one-process metrics on every process."""
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    one = _sharded_eval()
    assert one["tiles"] == 7 and [t["tiles"] for t in two] == [4, 3]
    assert one["iou_landslide"] > 0 and one["iou_landslide_boundary"] > 0
    for t in two:
        assert {k: v for k, v in t.items() if k != "tiles"} == {k: v for k, v in one.items() if k != "tiles"}


def test_torchrun_two_processes_end_to_end(tmp_path):
    """main under torchrun with 2 x 4 tiles: DDP, gathered keys, the collective checkpoint of both ranks; resuming it
    with one process is refused with a one-line error and the checkpoint is untouched."""
    out = str(tmp_path / "two")
    p = run_torchrun("hpcl.py", *SMALL, "--max-steps", "2", "--output-dir", out)
    assert "global batch 8 = 4 x 2" in p.stdout and "miou" in read_metrics(out)
    c = load_ckpt(out)
    assert c["step"] == 2 and c["world_size"] == 2 and len(c["ranks"]) == 2
    assert c["queue"]["filled"].sum() > 0
    with open(os.path.join(out, "checkpoint.pt"), "rb") as f:
        original = f.read()
    _fails(*SMALL, "--max-steps", "4", "--output-dir", out, match="was written by 2 processes, this run has 1")
    with open(os.path.join(out, "checkpoint.pt"), "rb") as f:
        assert f.read() == original


# --- 3. --tiny learns and beats RGB only ---
def test_tiny_run_learns_and_beats_rgb_only(tmp_path):
    full, rgb = str(tmp_path / "full"), str(tmp_path / "rgb")
    p = run_script("hpcl.py", "--tiny", "--output-dir", full, threads=1)
    m = read_metrics(full)
    assert list(m)[:3] == ["miou", "iou_landslide", "f1_landslide"] and "miou_init" in m
    assert m["miou"] > m["miou_init"] + 0.2 and m["iou_landslide"] > m["iou_landslide_init"] + 0.3, m
    assert "iou_landslide" in p.stdout and os.path.getsize(os.path.join(full, "predictions.png")) > 1000
    img = torchvision.io.read_image(os.path.join(full, "predictions.png"))
    assert img.shape[1] == 4 * 64 + 5 * 2  # rows: RGB, hillshade, ground truth, prediction
    log = read_log(full)
    assert log[-1]["eval"] == m and all(math.isfinite(r["loss"]) for r in log[:-1])
    assert log[0]["hpcl"] > 0 and log[-2]["queue_filled"] == [256, 256]
    run_script("hpcl.py", "--tiny", "--fusion", "rgb", "--hpcl-weight", "0", "--output-dir", rgb, threads=1)
    r = read_metrics(rgb)
    assert m["iou_landslide"] > r["iou_landslide"] + 0.1 and m["miou"] > r["miou"], (m, r)


# --- 4. Resume ---
SMALL = ["--tiny", "--train-tiles", "16", "--test-tiles", "8", "--batch-size", "4", "--anchors", "8",
         "--log-every", "2"]


def test_resume_is_exact(tmp_path, capsys):
    """6 steps in one go == 3, stop, resume, 3 more (4 steps/epoch: the run crosses an epoch end and L_hpcl's
    switch-on after the 1-epoch warm-up): model, momentum model, queues, optimizer, metrics."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_main_inprocess(hpcl, [*SMALL, "--max-steps", "6", "--output-dir", a])
    run_main_inprocess(hpcl, [*SMALL, "--max-steps", "3", "--output-dir", b])
    assert load_ckpt(b)["step"] == 3
    capsys.readouterr()
    run_main_inprocess(hpcl, [*SMALL, "--max-steps", "6", "--output-dir", b])
    assert "(step 3)" in capsys.readouterr().out
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "teacher", "queue"):
        assert_tensors_close(ca[key], cb[key], path=key)
    assert_tensors_close(ca["optimizer"]["state"], cb["optimizer"]["state"])
    assert not torch.equal(ca["model"]["phi.0.weight"], ca["teacher"]["phi.0.weight"])
    assert read_metrics(a) == read_metrics(b)


# --- 5. bf16 and compile on CPU ---
@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--compile", "aot_eager"]], ids=["bf16", "compile"])
def test_bf16_and_compile_steps(tmp_path, flags):
    """Four steps under bf16 autocast / torch.compile(aot_eager): finite losses; under bf16 every BatchNorm of the
    online and the momentum model runs in train mode (Sec. 4: the teacher too); the compiled model is traced once:
    no graph break, one graph, one frame. The mode hook is left out of the compiled run (it would recompile)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    modes = []

    def record(module, _):
        if isinstance(module, torch.nn.BatchNorm2d):
            modes.append((module.training, torch.is_grad_enabled()))
    hook = None if "--compile" in flags else torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run_main_inprocess(hpcl, [*SMALL, *flags, "--max-steps", "4", "--log-every", "1", "--hpcl-warmup-epochs", "0",
                                  "--output-dir", tmp_path])
    finally:
        if hook is not None:
            hook.remove()
    if hook is not None:  # grad on: the online model; off: the teacher (train mode) and evaluation (eval mode)
        tiny = hpcl.SegNet("late", [8, 16, 32, 64], [1, 1, 1, 1])
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.modules())
        online = [t for t, g in modes if g]
        assert len(online) == 4 * n_bn and all(online)
        assert sum(t for t, g in modes if not g) == 4 * n_bn  # the teacher, in train mode; evaluation in eval mode
    log = read_log(tmp_path)
    assert [r["step"] for r in log[:-1]] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log[:-1])
    if "--compile" in flags:
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert dict(counters["stats"])["unique_graphs"] == 1, dict(counters["stats"])
        assert dict(counters["frames"]) == {"total": 1, "ok": 1}, dict(counters["frames"])


# --- 6. Tiles from folders, bad input ---
def write_tiles(root, split, n=4, size=64, seed=0):
    t = hpcl.synth_loess(n, size, seed)
    for kind in ("rgb", "dem", "mask"):
        os.makedirs(os.path.join(root, split, kind), exist_ok=True)
    for i in range(n):
        name = f"t{i}"
        if i % 2:  # half PNG, half .npy
            torchvision.io.write_png(t.rgb[i], os.path.join(root, split, "rgb", name + ".png"))
            torchvision.io.write_png(t.mask[i][None] * 255, os.path.join(root, split, "mask", name + ".png"))
        else:
            np.save(os.path.join(root, split, "rgb", name + ".npy"), t.rgb[i].permute(1, 2, 0).numpy())
            np.save(os.path.join(root, split, "mask", name + ".npy"), t.mask[i].numpy())
        np.save(os.path.join(root, split, "dem", name + ".npy"), t.dem[i, 0].numpy())
    return t


def test_tiles_from_folders_train_with_kmeans_and_early_fusion(tmp_path):
    root = str(tmp_path / "data")
    t = write_tiles(root, "train")
    write_tiles(root, "test", n=2, seed=1)
    read = hpcl.read_split(root, "train")
    assert torch.equal(read.rgb, t.rgb) and torch.equal(read.mask, t.mask) and torch.equal(read.dem, t.dem)
    out = str(tmp_path / "out")
    run_main_inprocess(hpcl, ["--tiny", "--data", root, "--batch-size", "2", "--max-steps", "2", "--hp", "kmeans",
                              "--fusion", "early", "--log-every", "1", "--output-dir", out])
    assert load_ckpt(out)["step"] == 2 and "miou" in read_metrics(out)
    assert read_log(out)[1]["queue_filled"][0] > 0  # k-means hyper-pixels gave anchors and keys


def _fails(*args, match):
    p = run_script("hpcl.py", *args, check=False, threads=1)
    assert p.returncode != 0 and match in p.stdout, p.stdout[-2000:]
    assert "Traceback" not in p.stdout, p.stdout[-2000:]


def test_bad_input_names_the_file_and_keeps_the_checkpoint(tmp_path):
    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    write_tiles(root, "train")
    write_tiles(root, "test", n=2, seed=1)
    run_main_inprocess(hpcl, ["--tiny", "--data", root, "--batch-size", "2", "--max-steps", "1", "--output-dir", out])
    ckpt = os.path.join(out, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        original = f.read()
    base = ["--tiny", "--data", root, "--batch-size", "2", "--max-steps", "2", "--output-dir", out]
    with pytest.raises(SystemExit, match="is not a folder"):
        hpcl.main([*base[:2], str(tmp_path / "missing"), *base[3:]])
    train = os.path.join(root, "train")
    os.rename(f"{train}/mask/t1.png", f"{tmp_path}/t1_mask.png")
    torchvision.io.write_png(torch.zeros(1, 32, 64, dtype=torch.uint8), f"{train}/mask/t1.png")
    with pytest.raises(SystemExit, match=f"mask {train}/mask/t1.png is 32x64 but its image {train}/rgb/t1.png"):
        hpcl.main(base)
    os.replace(f"{tmp_path}/t1_mask.png", f"{train}/mask/t1.png")
    os.rename(f"{train}/dem/t2.npy", f"{tmp_path}/t2.npy")
    with pytest.raises(SystemExit, match=f"no DEM tile for {train}/rgb/t2.npy"):
        hpcl.main(base)
    with open(f"{train}/dem/t2.npy", "w") as f:
        f.write("not an array")
    with pytest.raises(SystemExit, match=f"cannot read {train}/dem/t2.npy"):
        hpcl.main(base)
    os.replace(f"{tmp_path}/t2.npy", f"{train}/dem/t2.npy")
    np.save(f"{train}/rgb/t0.npy", np.zeros((48, 48, 3), np.uint8))
    np.save(f"{train}/dem/t0.npy", np.zeros((48, 48), np.float32)), np.save(f"{train}/mask/t0.npy", np.zeros((48, 48)))
    with pytest.raises(SystemExit, match="multiple of 32"):
        hpcl.main(base)
    _fails(*base, "--max-steps", "3", "--data", "synthetic", "--lr", "1e30", "--log-every", "1",
           match="error: loss is")
    _fails(*base, "--data", "synthetic", "--emb-dim", "8", match="does not fit")
    with open(ckpt, "rb") as f:
        assert f.read() == original
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "dcl"}, other / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not 'hpcl'"):
        hpcl.main(["--tiny", "--output-dir", str(other)])


def test_flag_checks_and_tiny_preset(capsys):
    with pytest.raises(SystemExit, match="more than --queue 256"):
        hpcl.check_args(hpcl.get_args(["--tiny", "--batch-size", "32"]), 1)
    hpcl.check_args(hpcl.get_args(["--tiny", "--batch-size", "16"]), 1)  # 16 x 16 anchors = 256 fits
    with pytest.raises(SystemExit, match="--tau must be positive"):
        hpcl.check_args(hpcl.get_args(["--tau", "0"]), 1)
    with pytest.raises(SystemExit, match="--purity"):
        hpcl.check_args(hpcl.get_args(["--purity", "0.4"]), 1)
    a = hpcl.get_args(["--tiny", "--lr=1e-3", "--anchors", "64"])  # given flags win, even at their default value
    assert a.lr == 1e-3 and a.anchors == 64 and a.queue == 256 and a.widths == [8, 16, 32, 64]
    capsys.readouterr()
    hpcl.check_args(hpcl.get_args(["--data", "/data/loess", "--batch-size", "2"]), 8)  # the README's 8-GPU line
    assert capsys.readouterr().out == ""
    hpcl.check_args(hpcl.get_args(["--data", "/data/loess", "--batch-size", "4"]), 8)
    assert "global batch 32 = 4 x 8; the recipe's is 16 (--batch-size 2" in capsys.readouterr().out
