"""Tests for mmc.py: the spec's worked examples and properties of every loss and metric, a --tiny run that beats the
random encoder and writes its pictures, two processes against one process holding the same global batch
(gradients), exact resume (centre and queue included), bad input, the pretrained path with dropout on, bf16 and
compile."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

import common
import mmc
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, save_tiny_vit)

T = torch.tensor
GRID = T([[(1, 0), (0, 1), (0, 1)], [(1, .1), (.9, .2), (0, 1)], [(1, 0), (.1, 1), (-1, 0)]])
FAST = ["--tiny", "--eval-size", "16", "--log-every", "1"]  # a short evaluation: these tests check plumbing


# --- 1. Worked examples and properties ---
def test_prompt_segment_and_jaccard_worked_example():
    sim, mask = mmc.prompt_segment(GRID, (1, 1), 0.9)
    want = T([[.976, .217, .217], [.993, 1, .217], [.976, .313, -.976]])
    assert torch.allclose(sim, want, atol=1e-3)
    assert mask.int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 0]]
    gt = T([[1, 0, 0], [1, 1, 0], [1, 0, 0]]).bool()
    assert mmc.jaccard(mask, gt).item() == 1.0
    assert mmc.jaccard(mask, gt & False).item() == 0.0
    assert mmc.jaccard(T([[1, 1, 0]]).bool(), T([[0, 1, 1]]).bool()).item() == pytest.approx(1 / 3)
    valid = T([[1, 1, 0]]).bool()  # ignored pixels count for neither
    assert mmc.jaccard(T([[1, 1, 1]]).bool(), T([[1, 1, 0]]).bool(), valid).item() == 1.0
    labels = torch.randint(0, 3, (6, 6), generator=torch.Generator().manual_seed(0))  # one-hot GT features
    feats = F.one_hot(labels, 3).float()
    for y, x in ((0, 0), (2, 3), (5, 5)):
        _, m = mmc.prompt_segment(feats, (y, x), 0.5)
        assert mmc.jaccard(m, labels == labels[y, x]).item() == 1.0


def test_intra_inter_worked_example_and_overlap():
    inst = T([[1, 0, 0], [1, 1, 0], [1, 0, 2]])
    intra, inter, overlap = mmc.intra_inter_similarity(GRID, inst)
    assert intra == pytest.approx(0.993, abs=1e-3) and inter == pytest.approx(-0.100, abs=1e-3)
    assert 0 <= overlap < 0.2
    a = torch.linspace(-0.9, 0.9, 1000)
    assert mmc.histogram_overlap(mmc.histogram(a), mmc.histogram(a)) == pytest.approx(1.0, abs=1e-6)
    assert mmc.histogram_overlap(mmc.histogram(a[a > 0.5]), mmc.histogram(a[a < -0.5])) == 0.0
    # patches belong to a region when it covers >= 50% of their pixels; -1 (ignore) never does
    pix = torch.zeros(4, 4, dtype=torch.long)
    pix[:2, :2], pix[:2, 2], pix[0, 3] = 3, 3, 3  # patch (0, 0): all 3; patch (0, 1): 3 of 4 pixels
    pix[2:, 2:] = -1
    assert mmc.patch_labels(pix, 2).tolist() == [[3, 3], [0, -1]]


def test_interior_point_is_the_deepest_pixel():
    m = torch.zeros(9, 12, dtype=torch.bool)
    m[1:8, 2:9] = True  # a 7 x 7 square: centre (4, 5)
    assert mmc.interior_point(m) == (4, 5)
    ring = torch.zeros(11, 11, dtype=torch.bool)
    ring[1:10, 1:10], ring[4:7, 4:7] = True, False  # the hole's border is no deeper than the outer one
    y, x = mmc.interior_point(ring)
    assert ring[y, x]
    edge = torch.zeros(5, 5, dtype=torch.bool)
    edge[:, :2] = True  # touching the image border: the border counts as background
    assert mmc.interior_point(edge)[1] in (0, 1)


def test_block_mask_exact_count_and_patchify():
    g = torch.Generator().manual_seed(0)
    for gh, gw, r in ((8, 8, 0.5), (14, 14, 0.5), (4, 6, 0.3), (8, 8, 0.75), (2, 2, 0.5)):
        for _ in range(20):
            m = mmc.block_mask(gh, gw, r, g)
            assert m.shape == (gh, gw) and int(m.sum()) == round(r * gh * gw)
    a, b = (mmc.block_mask(8, 8, 0.5, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)  # a seeded generator: resumable, the same on every process
    x = torch.randn(2, 3, 8, 12)
    p = mmc.patchify(x, 4)
    assert p.shape == (2, 6, 48) and torch.equal(mmc.unpatchify(p, 4, 8, 12), x)
    assert torch.equal(p[0, 1].view(4, 4, 3)[:, :, 0], x[0, 0, :4, 4:8])  # patch (0, 1), pixels (row, col, ch)


def test_mim_loss_counts_masked_patches_only():
    pred, target = torch.zeros(1, 3, 2), T([[[1.0, 1.0], [2.0, 4.0], [9.0, 9.0]]])
    mask = T([[True, True, False]])
    assert mmc.mim_loss(pred, target, mask, "l1").item() == pytest.approx((1 + 3) / 2)
    assert mmc.mim_loss(pred, target, mask, "l2").item() == pytest.approx((1 + 10) / 2)
    n = mmc.norm_pix(torch.randn(2, 5, 48) * 3 + 7)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 5), atol=1e-5) and torch.allclose(n.std(-1), torch.ones(2, 5),
                                                                                          atol=1e-3)


def test_g2l_loss_and_center():
    K = 5
    t = T([[20.0, 0, 0, 0, 0], [0, 0, 20.0, 0, 0]])  # sharp teacher: one-hot after softmax at tau_t 0.04
    s = t[:, None].repeat(1, 4, 1) * 5  # every patch of the student says the same
    assert mmc.g2l_distill_loss(s, t, torch.zeros(K), 0.1, 0.04).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    s, t, c = torch.randn(2, 3, K, generator=g), torch.randn(2, K, generator=g), torch.randn(K, generator=g)
    p_t = F.softmax((t - c) / 0.07, -1)
    want = -(p_t[:, None] * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert mmc.g2l_distill_loss(s, t, c, 0.1, 0.07).item() == pytest.approx(want.item(), rel=1e-6)
    w = T([[1.0, 0, 0], [0, 1, 1]])  # masked tokens only: image 0 token 0, image 1 tokens 1 and 2
    ce = -(p_t[:, None] * F.log_softmax(s / 0.1, -1)).sum(-1)
    assert mmc.g2l_distill_loss(s, t, c, 0.1, 0.07, w).item() == pytest.approx(
        ((ce[0, 0] + ce[1, 1:].mean()) / 2).item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 under autocast
        assert mmc.g2l_distill_loss(s.bfloat16(), t, c, 0.1, 0.07).dtype == torch.float32
    center = torch.ones(K)
    mmc.update_center(center, T([[1.0, 2, 3, 4, 5], [3.0, 2, 1, 0, -1]]), 0.9)
    assert torch.allclose(center, 0.9 + 0.1 * T([2.0, 2, 2, 2, 2]))


def test_info_nce_queue_and_momentum():
    q, k = T([[1.0, 0.0], [0.0, 2.0]]), T([[3.0, 0.0], [1.0, 1.0]])
    s = T([[1.0, 0.0], [0.0, 1 / math.sqrt(2)]]) / 0.2  # q_i . k_j, normalised
    logits = T([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / 0.2
    want = 2 * 0.2 * F.cross_entropy(logits, torch.arange(2))
    assert mmc.info_nce(q, k, 0.2).item() == pytest.approx(want.item(), rel=1e-6) and s.shape == (2, 2)
    queue = T([[-1.0, 0.0]])
    with_q = 2 * 0.2 * F.cross_entropy(torch.cat([logits, T([[-1.0], [0.0]]) / 0.2], 1), torch.arange(2))
    assert mmc.info_nce(q, k, 0.2, queue).item() == pytest.approx(with_q.item(), rel=1e-6)
    buf = torch.zeros(4, 2)
    ptr = mmc.dequeue_and_enqueue(buf, 0, T([[1.0, 1], [2, 2]]))
    ptr = mmc.dequeue_and_enqueue(buf, ptr, T([[3.0, 3], [4, 4]]))
    assert ptr == 0 and buf[:, 0].tolist() == [1, 2, 3, 4]
    ptr = mmc.dequeue_and_enqueue(buf, ptr, T([[5.0, 5], [6, 6]]))
    assert ptr == 2 and buf[:, 0].tolist() == [5, 6, 3, 4]  # the oldest rows are overwritten first
    with pytest.raises(ValueError):
        mmc.dequeue_and_enqueue(buf, 0, torch.ones(3, 2))
    assert mmc.cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert mmc.cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert mmc.cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_synthetic_data_and_mask_readers(tmp_path):
    images, inst, sem = mmc.textured_shapes(64, 32, seed=0, max_objects=3)
    again = mmc.textured_shapes(64, 32, seed=0, max_objects=3)
    assert torch.equal(images, again[0]) and images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32)
    assert inst.max() <= 3 and sem.max() <= len(mmc.SHAPES) and ((inst > 0) == (sem > 0)).all()
    assert all((inst[i] > 0).any() for i in range(64))  # every image has an object
    grey = torch.zeros(1, 4, 5, dtype=torch.uint8)
    grey[0, 1:3, 1:3], grey[0, 0, 0] = 2, 255
    torchvision.io.write_png(grey, str(tmp_path / "g.png"))
    m = mmc.read_mask(str(tmp_path / "g.png"))
    assert m[1, 1] == 2 and m[0, 0] == -1 and m[3, 4] == 0  # ids; 255 = ignore
    rgb = torch.zeros(3, 4, 5, dtype=torch.uint8)
    rgb[0, :2] = 200  # a red region, a green one, black background
    rgb[1, 3:] = 150
    torchvision.io.write_png(rgb, str(tmp_path / "c.png"))
    m = mmc.read_mask(str(tmp_path / "c.png"))
    assert m[2, 0] == 0 and m[0, 0] > 0 and m[3, 0] > 0 and m[3, 0] != m[0, 0] and len(m.unique()) == 3
    np.save(tmp_path / "n.npy", np.array([[0, 1], [2, 2]]))
    assert mmc.read_mask(str(tmp_path / "n.npy")).tolist() == [[0, 1], [2, 2]]
    square = mmc.polygon_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)  # x in [1, 4], y in [1, 3]: 3 x 2 pixel centres
    assert square.sum() == 6 and square[1:3, 1:4].all()


# --- 2. --tiny learns and draws ---
def test_tiny_run_beats_the_random_encoder(tmp_path):
    p = run_script("mmc.py", "--tiny", "--output-dir", tmp_path, threads=1, timeout=900)
    m = read_metrics(tmp_path)
    assert list(m)[:2] == ["jaccard", "jaccard_init"] and "random init" in p.stdout
    assert m["jaccard"] > m["jaccard_init"] + 0.04, m  # measured 0.386 -> 0.452
    assert m["overlap"] < m["overlap_init"], m
    for name in ("segmentation.png", "segmentation_init.png"):
        img = torchvision.io.read_image(str(tmp_path / name))
        assert img.shape[0] == 3 and img.shape[1] > 96 and img.shape[2] > 4 * 96
    log = read_log(tmp_path)
    assert log[-1]["eval"] == m and all(math.isfinite(r["loss"]) for r in log[:-1])
    assert all(0.0 < r["teacher_entropy"] <= math.log(64) + 1e-4 for r in log[:-1])  # logged, a distribution over K
    last = log[-5:-1]  # the distillation works: the teacher is not uniform (ln 64 = 4.16) and L_g2l falls below it
    assert np.mean([r["teacher_entropy"] for r in last]) < 3.5 and np.mean([r["loss_g2l"] for r in last]) < 4.0, last


# --- 3. Two processes against one ---
def _grads(world, rank):
    """Gradients of one MMC step (all three losses, the queue on) through common.distribute (DDP when a process group
    runs) on slice `rank` of a fixed global batch of 8 images, and the centre after its update."""
    torch.set_num_threads(1)
    args = mmc.get_args(["--tiny", "--queue", "32", "--K", "16", "--head-hidden", "32", "--proj-dim", "8"])
    torch.manual_seed(0)
    model = mmc.MMC(args)
    teacher = common.momentum_copy(model.enc).eval()
    with torch.no_grad():  # a teacher that differs from the student, as after some steps
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = mmc.State(args.K, args.proj_dim, args.queue, 0)
    state.center.copy_(torch.randn(args.K, generator=torch.Generator().manual_seed(1)))
    views = mmc.MaskedViews(mmc.textured_shapes(8, 32, seed=0, max_objects=2)[0], args)
    x1, x2, m1, m2 = torch.utils.data.default_collate([views[(i, 100 + i)] for i in range(8)])
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    net = common.distribute(model, torch.device("cpu"))
    l_mim, l_g2l, l_con, targets, keys = net(x1[part], x2[part], m1[part], m2[part], teacher=teacher,
                                             center=state.center, queue=state.queue, tau_t=0.05, args=args)
    (l_mim + l_g2l + l_con).backward()
    mmc.update_center(state.center, targets, 0.9)
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "center": state.center.clone(),
            "losses": torch.stack([l_mim, l_g2l, l_con]).detach()}


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_grads(world, rank), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_gradients(tmp_path):
    """The contrast gathers the teacher keys of the global batch (labels offset by rank), the centre averages over
    the global batch, DDP averages the gradients: 2 x 4 images must give the gradients of one process on the 8.
    Compared per tensor at 1e-4 of its norm: a gradient off by a constant factor fails."""
    mp.spawn(_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    one = _grads(1, 0)
    assert len(one["grads"]) > 20
    for name, ref in one["grads"].items():
        assert ref.norm() > 0, name
        for r in range(2):
            err = (two[r]["grads"][name] - ref).norm()
            assert err <= 1e-4 * ref.norm() + 1e-8, f"{name}: |diff| {err:.3g} vs |grad| {ref.norm():.3g}"
    assert torch.allclose((two[0]["losses"] + two[1]["losses"]) / 2, one["losses"], atol=1e-5)
    assert all(torch.allclose(t["center"], one["center"], atol=1e-6) for t in two)


def _sharded_eval(out):
    """evaluate() of a fixed random ViT on 9 images, counting the images this process embedded; rank 0 draws."""
    torch.set_num_threads(1)
    args = mmc.get_args(["--tiny"])
    torch.manual_seed(0)
    backbone, seen = mmc.build_backbone(args), []
    backbone.embeddings.register_forward_hook(lambda mod, inputs, out: seen.append(len(out)))
    images, inst, _ = mmc.textured_shapes(9, 32, seed=1, max_objects=2)
    png = f"{out}/seg{common.get_rank()}.png"
    metrics = mmc.evaluate(backbone, images, inst, args, torch.device("cpu"), "none", png)
    return {"images": sum(seen), **metrics}


def _eval_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sharded_eval(out), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each of two processes embeds and scores its shard of the images (5 + 4 of 9): the summed J(t) curves, pair
    cosines and histograms give the one-process metrics; only rank 0 draws its picture."""
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    assert [t["images"] for t in two] == [5, 4] and not os.path.exists(tmp_path / "seg1.png")
    os.remove(tmp_path / "seg0.png")
    one = _sharded_eval(tmp_path)
    assert one.pop("images") == 9 and os.path.exists(tmp_path / "seg0.png") and 0 < one["overlap"] < 1
    for t in two:
        for k, v in one.items():
            assert t[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


# --- 4. Resume is exact ---
def test_resume_is_exact(tmp_path, capsys):
    """6 steps in one go == 3 steps, stop, resume, 3 steps: student, teacher, centre, queue and pointer, optimizer."""
    flags = [*FAST, "--batch-size", "8", "--queue", "32", "--epochs", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main_inprocess(mmc, [*flags, "--max-steps", "6", "--output-dir", a])
    run_main_inprocess(mmc, [*flags, "--max-steps", "3", "--output-dir", b])
    assert load_ckpt(b)["step"] == 3
    capsys.readouterr()
    run_main_inprocess(mmc, [*flags, "--max-steps", "6", "--output-dir", b])
    assert "resumed from" in capsys.readouterr().out
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["step"] == cb["step"] == 6 and ca["buffers"]["ptr"].item() == 6 * 16 % 32
    for key in ("model", "teacher", "buffers", "optimizer"):
        assert_tensors_close(ca[key], cb[key], path=key)
    assert not torch.equal(ca["model"]["enc.head.last"], ca["teacher"]["head.last"])
    assert read_metrics(a) == read_metrics(b)


# --- 5. Bad input ---
def _folder(root, n=4, size=(40, 40), mask_size=None, skip_mask=None):
    os.makedirs(root / "images"), os.makedirs(root / "masks")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        torchvision.io.write_png((torch.rand(3, *size, generator=g) * 255).byte(), str(root / "images" / f"{i}.png"))
        if i != skip_mask:
            m = torch.zeros(1, *(mask_size if i == n - 1 and mask_size else size), dtype=torch.uint8)
            m[0, 5:25, 5:25] = 1
            torchvision.io.write_png(m, str(root / "masks" / f"{i}.png"))
    return root


def test_real_folders_and_coco_json_train_and_evaluate(tmp_path):
    """image/mask folders and a COCO JSON (polygons and uncompressed RLE) both load, train two steps and evaluate."""
    _folder(tmp_path / "f", n=8)
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 40} for i in range(8)],
            "annotations": [{"image_id": i, "category_id": 3, "iscrowd": 0,
                             "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]]} for i in range(8)]
            + [{"image_id": 0, "category_id": 1, "iscrowd": 0, "segmentation": {"size": [40, 40],
                                                                                "counts": [1400, 100, 100]}}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    args = mmc.get_args(["--tiny", "--data", str(tmp_path / "coco.json"), "--image-root", str(tmp_path / "f/images")])
    images, masks = mmc.load_eval(args)
    assert images.shape == (8, 3, 32, 32) and set(masks[0].unique().tolist()) == {0, 1, 2}
    for data, more in ((tmp_path / "f", []), (tmp_path / "coco.json", ["--image-root", tmp_path / "f/images"])):
        out = tmp_path / f"out_{len(more)}"
        run_main_inprocess(mmc, [*FAST, "--data", data, *more, "--batch-size", "4", "--max-steps", "2",
                                 "--output-dir", out])
        assert load_ckpt(out)["step"] == 2 and 0 <= read_metrics(out)["jaccard"] <= 1


def test_bad_input_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n {"id": 1, "file_name": "a.png"}\n "annotations": []}\n')
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
                                   "annotations": [{"image_id": 7, "segmentation": []}]}))
    _folder(tmp_path / "size", mask_size=(20, 40))
    _folder(tmp_path / "nomask", skip_mask=1)
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    cases = [(["--data", tmp_path / "missing"], ["missing", "not found"]),
             (["--data", tmp_path / "missing.json"], ["missing.json", "not found"]),
             (["--data", bad], ["bad.json:3", "not valid JSON"]),
             (["--data", unknown], ["unknown.json", "annotation 0"]),
             (["--data", tmp_path / "size"], ["3.png", "(20, 40)", "(40, 40)"]),
             (["--data", tmp_path / "nomask"], ["1.png", "has no mask"]),
             (["--output-dir", other], ["swav", "not 'mmc'"])]
    for n, (flags, words) in enumerate(cases):
        out = [] if "--output-dir" in flags else ["--output-dir", str(tmp_path / f"o{n}")]
        flags = ["--tiny", *map(str, flags), *out]
        with pytest.raises(SystemExit) as e:
            mmc.main(flags)
        msg = str(e.value)
        assert msg.startswith("error:") and "\n" not in msg and all(w in msg for w in words), (words, msg)
    for argv, words in ((["--no-mim", "--no-g2l", "--no-con"], "no loss"), (["--img-size", "30"], "multiple of"),
                        (["--queue", "100", "--batch-size", "8"], "--queue 100"), (["--batch-size", "1"], "at least 2"),
                        (["--mask-ratio", "0"], "masked patches")):
        with pytest.raises(SystemExit, match=words):
            mmc.check_args(mmc.get_args(argv), 1)
    mmc.check_args(mmc.get_args(["--batch-size", "32", "--queue", "65536"]), 8)  # 65536 = 2 x 32 x 8 x 128
    # from the command line: an offline hub name and a diverging run, one line each, the checkpoint untouched
    p = run_script("mmc.py", "--tiny", "--vit", "no-such-org/vit", "--output-dir", tmp_path / "hub", check=False,
                   threads=1)
    assert p.returncode != 0 and "Traceback" not in p.stdout and "leave --vit out" in p.stdout.strip().splitlines()[-1]
    good = tmp_path / "good"
    run_main_inprocess(mmc, [*FAST, "--max-steps", "1", "--output-dir", good])
    before = (good / "checkpoint.pt").read_bytes()
    for flags, words in ((["--K", "32"], "does not fit"), (["--lr", "1e30", "--clip-grad", "0", "--max-steps", "3"],
                                                           "loss is")):
        with pytest.raises(SystemExit, match=words):
            mmc.main([*FAST, "--output-dir", str(good), *flags])
        assert (good / "checkpoint.pt").read_bytes() == before


# --- 6. The pretrained path ---
def test_pretrained_vit_trains_with_dropout_on(tmp_path):
    """A ViT written by save_pretrained (dropout 0.1): from_pretrained returns eval mode; every dropout call of the
    student's training forward must be in training mode; the teacher runs without gradient in eval mode."""
    vit = save_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8)
    with DropoutRecorder() as rec:
        run_main_inprocess(mmc, [*FAST, "--vit", vit, "--patch", "8", "--batch-size", "8", "--max-steps", "2",
                                 "--output-dir", tmp_path / "out"])
    online = rec.training_calls()
    assert len({id(m) for m, _ in online}) >= 3, "the ViT's dropouts were not called"  # embeddings + 2 layers
    assert all(training for _, training in online), "the student trained with dropout off"
    assert not any(t for _, t, grad in rec.calls if not grad), "teacher or evaluation ran with dropout on"
    ckpt = load_ckpt(tmp_path / "out")
    assert ckpt["step"] == 2 and ckpt["model"]["enc.backbone.embeddings.position_embeddings"].shape == (1, 17, 32)


# --- 7. bf16 and compile on CPU ---
@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--compile", "aot_eager"]], ids=["bf16", "compile"])
def test_bf16_and_compile_steps(tmp_path, flags):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run_main_inprocess(mmc, [*FAST, *flags, "--batch-size", "8", "--max-steps", "3", "--output-dir", tmp_path])
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    if "--compile" in flags:
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
