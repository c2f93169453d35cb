"""Tests for astrea.py: the spec's worked examples and properties, a --tiny run that learns, two processes vs one
(gradients), exact resume across stages, bad input, the pretrained path with dropout on, bf16 and compile."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import astrea
import common
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, save_tiny_bert, save_tiny_vit)

T = torch.tensor
SHORT = ["--tiny", "--experts", "cls,det", "--expert-steps", "2", "--stage-iters", "3", "--joint-iters", "4",
         "--log-every", "1"]


# --- 1. Core functions: the spec's worked examples and properties ---
def test_router_worked_example_and_topk():
    z = T([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    w, fused = astrea.route(z, T([[2.0, 1.0, 0.0, -1.0]]))
    assert torch.allclose(w, T([[.6439, .2369, .0871, .0321]]), atol=1e-4)
    assert torch.allclose(fused, T([[0.699, 0.324]]), atol=1e-3)
    w2, _ = astrea.route(z, T([[2.0, 1.0, 0.0, -1.0]]), topk=2)  # sparse: the two largest, renormalised
    assert torch.allclose(w2, T([[.7311, .2689, 0, 0]]), atol=1e-4)
    w3, _ = astrea.route(z, T([[2.0, 1.0, 0.0, -1.0]]), temp=2.0)
    assert torch.allclose(w3, F.softmax(T([[1.0, .5, 0, -.5]]), 1))


def test_load_balance_worked_examples():
    assert astrea.load_balance_loss(torch.full((8, 4), 0.25)).item() == pytest.approx(1.0)  # the minimum
    assert astrea.load_balance_loss(F.one_hot(torch.zeros(8, dtype=torch.long), 4).float()).item() == pytest.approx(4.0)
    # balanced on average but one-hot per sample: still 1 (Switch-style, batch means)
    assert astrea.load_balance_loss(torch.eye(4)).item() == pytest.approx(1.0)


def test_stochastic_residual_properties():
    g = torch.Generator().manual_seed(0)
    h, fh = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g)
    assert torch.equal(astrea.stochastic_residual(h, fh, 1.0, True, g), fh + h)  # p = 1: a plain residual block
    assert torch.equal(astrea.stochastic_residual(h, fh, 0.0, True, g), fh)  # p = 0: F(h) alone
    out = astrea.stochastic_residual(h, fh, 0.3, True, g)
    b = ((out - fh) / h)[:, 0]
    assert set(b.round(decimals=4).unique().tolist()) <= {0.0, 1.0}  # per-sample Bernoulli
    assert abs(b.mean().item() - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 4000)
    assert torch.allclose(astrea.stochastic_residual(h, fh, 0.3, False), fh + 0.3 * h)  # eval: the expectation
    assert torch.equal(astrea.stochastic_residual(h, fh, 0.3, False, eval_mode="one"), fh + h)


def test_moco_worked_examples_both_layouts():
    anchors, keys, queue = T([[1.0, 0.0], [0.0, 1.0]]), T([[.6, .8], [0.0, 1.0]]), T([[1.0, 0.0], [-1.0, 0.0]])
    inb = astrea.moco_direction(anchors, keys, queue, 1.0, "inbatch_queue")  # S = [[.6, 0, 1, -1], [.8, 1, 0, 0]]
    assert inb.item() == pytest.approx(1.0571, abs=1e-4)
    qo = astrea.moco_direction(anchors, keys, queue, 1.0, "queue_only")  # logits [.6, 1, -1], [1, 0, 0]
    assert qo.item() == pytest.approx(0.7712, abs=1e-4)
    want = F.cross_entropy(T([[.6, 1.0, -1.0], [1.0, 0.0, 0.0]]) / 0.5, T([0, 0]))  # tau divides the logits
    assert astrea.moco_direction(anchors, keys, queue, 0.5).item() == pytest.approx(want.item(), abs=1e-6)
    both = astrea.moco_loss(anchors, keys, keys, anchors, queue, queue, 1.0, "queue_only")
    want = (astrea.moco_direction(anchors, anchors, queue, 1.0) + astrea.moco_direction(keys, keys, queue, 1.0)) / 2
    assert both.item() == pytest.approx(want.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss is computed in fp32 whatever the inputs
        assert astrea.moco_loss(anchors.bfloat16(), keys, keys, anchors, queue, queue, 0.07).dtype == torch.float32
    z = F.normalize(torch.randn(6, 5), dim=1)
    assert astrea.info_nce(z, z, 0.05) < astrea.info_nce(z, z.roll(1, 0), 0.05)  # aligned pairs: lower loss


def test_bleu_worked_examples():
    a = "a b c d e".split()
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, no brevity penalty: (0.2)^(1/4)
    assert astrea.bleu([a], [["a b c d f".split()]]) == pytest.approx(0.2 ** 0.25, abs=1e-4)
    assert astrea.bleu([a[:4]], [[a]]) == pytest.approx(math.exp(1 - 5 / 4), abs=1e-4)  # brevity penalty
    assert astrea.bleu([a], [[a]]) == pytest.approx(1.0)
    assert astrea.bleu([a], [["e d c b a".split()]]) == 0.0  # no matching 2-gram
    # clipping: a repeated word counts at most as often as in the best reference; the closest reference length
    assert astrea.bleu([["x"] * 4], [[["x", "x", "y", "z"]]], n=1) == pytest.approx(0.5)


def test_recall_at_k_worked_example():
    s = T([[.9, .1, .8, .2], [.3, .95, .2, .1]])  # images 0, 1; captions 0, 1 of image 0 and 2, 3 of image 1
    r = astrea.recall_at_k(s, torch.eye(4), T([0, 0, 1, 1]))  # image features = the rows: s = img @ txt^T
    assert (r["txt_r1"], r["txt_r5"], r["img_r1"], r["img_r5"]) == pytest.approx((50, 100, 25, 100))
    assert r["r_mean"] == pytest.approx((50 + 100 + 100 + 25 + 100 + 100) / 6)


def test_schedule_and_stage_training_sets():
    args = astrea.get_args(["--tiny", "--output-dir", "x"])
    names = [s[0] for s in astrea.schedule(args)]
    assert names == ["expert:classification", "expert:captioning", "expert:detection", "expert:segmentation",
                     "align:classification", "align:captioning", "align:detection", "align:segmentation", "joint"]
    st = astrea.schedule(args)
    assert st[6][3] == ("classification", "captioning", "detection") and st[-1][4] == args.joint_iters
    one = astrea.get_args(["--tiny", "--experts", "classification"])
    assert [s[0] for s in astrea.schedule(one)] == ["expert:classification", "align:classification", "joint"]
    assert astrea.get_args([]).experts == list(astrea.EXPERTS) and astrea.get_args([]).queue_size == 4096
    assert astrea.get_args(["--tiny", "--lr", "0.5"]).lr == 0.5  # an explicit flag wins over the preset
    assert astrea.get_args(["--tiny", "--batch-size=8"]).batch_size == 8
    args.tiny = True
    model = astrea.Astrea(args, 24, type("Tok", (), {"__len__": lambda s: 40, "pad_token_id": 0, "cls_token_id": 2,
                                                   "sep_token_id": 3})())
    dims = {k: e.dim for k, e in model.experts.items()}
    assert len(set(dims.values())) == 4, dims  # heterogeneous widths, one adapter each
    trained = lambda: {".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    astrea.set_stage(model, st[1])
    assert trained() == {"experts.captioning"}
    astrea.set_stage(model, st[4])  # the first alignment stage: no router (one expert)
    assert trained() == {"align.text_encoder", "align.text_proj", "align.fusion", "align.adapters"}
    assert all(not p.requires_grad for k, a in model.align.adapters.items() if k != "classification"
               for p in a.parameters())
    astrea.set_stage(model, st[5])
    assert "align.router" in trained() and not model.align.adapters["classification"][0].weight.requires_grad
    astrea.set_stage(model, st[-1])
    assert "captioner.embed" in trained() and not any(n.startswith("experts") for n in trained())
    assert not model.experts["segmentation"].training and model.align.fusion.training


def test_synthetic_scenes_and_targets():
    args = astrea.get_args(["--tiny"])
    train, test, n = astrea.synthetic_data(args)
    assert n == 24 and len(train) == 2048 and len({it["image"] for it in test}) == len(test) == 100
    a, b = test[0]["image"], test[1]["image"]  # the same objects, other quadrants
    assert [o[:3] for o in a] == [o[:3] for o in b] and a != b
    scene = ((0, 0, 1, 0), (2, 1, 0, 3))  # a big red circle top left, a small blue square bottom right
    caps = astrea.scene_captions(scene)
    assert caps[0] == "a big red circle at the top left and a small blue square at the bottom right"
    img, labels, boxes, mask = astrea.render(scene, 32, seed=1)
    assert img.shape == (3, 32, 32) and labels == [0, 9] and set(mask.unique().tolist()) == {0, 1, 10}
    assert boxes[0][2] <= 0.5 and boxes[1][0] >= 0.5 and boxes[1][1] >= 0.5  # quadrants
    assert torch.equal(astrea.render(scene, 32, 1)[0], img) and not torch.equal(astrea.render(scene, 32, 2)[0], img)
    cls_t, det_t, box_mask = astrea.task_targets(labels, boxes, 24, 32)
    assert cls_t.nonzero().flatten().tolist() == [0, 9] and det_t[0].sum() == 2 and det_t[0, 1, 1] == 1
    assert det_t[0, 2, 2] == 1 and (box_mask >= mask).all() and box_mask.max() == 10


def test_queue_fifo_and_reset():
    q = astrea.Queue(2, 4, seed=0)
    assert torch.allclose(q.image.norm(dim=1), torch.ones(4))
    q.push(T([[1.0, 0], [2, 0]]), T([[3.0, 0], [4, 0]]))
    q.push(T([[5.0, 0], [6, 0]]), T([[7.0, 0], [8, 0]]))
    q.push(T([[9.0, 0], [10, 0]]), T([[11.0, 0], [12, 0]]))  # overwrites the oldest rows
    assert q.image[:, 0].tolist() == [9, 10, 5, 6] and q.text[:, 0].tolist() == [11, 12, 7, 8] and q.ptr == 2
    q.reset(0)
    assert q.ptr == 0 and torch.equal(q.image, astrea.Queue(2, 4, seed=0).image)


def test_check_args_at_world_size():
    astrea.check_args(astrea.get_args([]), 8)  # the spec's 4096-key queue, 64 per process
    with pytest.raises(SystemExit, match="not a multiple of the global batch 768"):
        astrea.check_args(astrea.get_args([]), 12)
    with pytest.raises(SystemExit, match="residual-p"):
        astrea.check_args(astrea.get_args(["--residual-p", "1.5"]), 1)


# --- 2. A --tiny run learns ---
def test_tiny_run_learns(tmp_path):
    p = run_script("astrea.py", "--tiny", "--expert-steps", "20", "--stage-iters", "15", "--joint-iters", "100",
                   "--output-dir", tmp_path, timeout=900)
    m = read_metrics(tmp_path)
    assert list(m)[:2] == ["r_mean", "r_mean_init"] and "random init" in p.stdout and "expert weights:" in p.stdout
    assert m["r_mean"] > m["r_mean_init"] + 15 and m["r_mean"] > 3 * m["r_mean_init"], m
    assert 0 < m["bleu4"] <= 100 and 0 <= m["cls_acc"] <= 100
    assert sum(m[f"weight_{k}"] for k in astrea.EXPERTS) == pytest.approx(1.0, abs=1e-4)
    for k in astrea.EXPERTS:  # every stage printed and recorded
        assert f"align:{k}_r_mean" in m and f"expert:{k}_loss" in m and f"align:{k}:" in p.stdout


# --- 3. Two processes agree with one process (gradients) ---
def _astrea_grads(world, rank, out):
    """Gradients of one joint-stage step on slice `rank` of `world` of a fixed batch of 8, through the training path
    (set_stage, common.distribute: DDP when a process group runs), the residual draws seeded per slice."""
    torch.set_num_threads(1)
    args = astrea.get_args(["--tiny", "--experts", "cls,cap", "--output-dir", str(out)])
    train, _, n = astrea.synthetic_data(args)
    tok = astrea.make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    torch.manual_seed(0)
    model = astrea.Astrea(args, n, tok)
    model_m = common.momentum_copy(model.align).eval()
    with torch.no_grad():  # a momentum model that differs from the online one
        for p in model_m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    queue = astrea.Queue(args.embed_dim, args.queue_size, args.seed)
    ds = astrea.PairSet(train, tok, args, n)
    batch = torch.utils.data.default_collate([ds[(i, 1000 + i)] for i in range(8)])
    args.steps_per_epoch = 64
    stage = astrea.schedule(args)[-1]
    astrea.set_stage(model, stage)
    net = common.distribute(model, torch.device("cpu"))
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    torch.manual_seed(100 + rank)
    loss, _, _ = net(*[x[part] for x in batch], stage=stage, model_m=model_m, queue=queue, cfg=args)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _astrea_grad_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_astrea_grads(world, rank, out), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_mean_of_the_per_process_gradients(tmp_path):
    """The contrastive loss is per process (local batch + the shared queue): DDP must give every process the mean of
    the per-slice gradients, which one process computes slice by slice. A gradient off by a constant factor fails."""
    import torch.multiprocessing as mp
    mp.spawn(_astrea_grad_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    halves = [_astrea_grads(2, r, tmp_path) for r in range(2)]
    assert set(two[0]) == set(halves[0]) and len(halves[0]) > 20
    assert any(k.startswith("align.router") for k in halves[0]) and any(k.startswith("captioner") for k in halves[0])
    for name in halves[0]:
        ref = (halves[0][name] + halves[1][name]) / 2
        for r in range(2):
            err = (two[r][name] - ref).norm()
            assert err <= 1e-4 * ref.norm() + 1e-7, f"{name}: |diff| {err:.3g} vs |grad| {ref.norm():.3g}"


def _gather_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q = astrea.Queue(2, 8, seed=0)
    q.push(torch.full((2, 2), float(rank)), torch.full((2, 2), 10.0 + rank))
    torch.save(q.state_dict(), f"{out}/q{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_fill_the_queue_with_the_gathered_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gather_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    q0, q1 = (torch.load(f"{tmp_path}/q{r}.pt") for r in range(2))
    assert_tensors_close(q0, q1)  # the same queue on every process, in rank order
    assert q0["image"][:4, 0].tolist() == [0, 0, 1, 1] and q0["text"][:4, 0].tolist() == [10, 10, 11, 11]
    assert q0["ptr"].item() == 4


def _sharded_eval(world, rank, out):
    """evaluate() of a tiny random model (all experts, captions) on 21 test scenes and 61 labelled training scenes,
    the images and captions this process embedded; and BLEU of this process's half of a fixed corpus."""
    torch.set_num_threads(1)
    args = astrea.get_args(["--tiny", "--output-dir", str(out), "--workers", "0"])
    train, test, n_classes = astrea.load_data(args)
    tok = astrea.make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    torch.manual_seed(0)
    model, rows = astrea.Astrea(args, n_classes, tok), {"image": 0, "text": 0}
    for key, mod in (("image", model.align.fusion), ("text", model.align.text_proj)):
        mod.register_forward_hook(lambda m, x, y, key=key: rows.update({key: rows[key] + len(x[0])}))
    m = astrea.evaluate(model, test[:21], train[:61], tok, astrea.schedule(args)[-1], args, torch.device("cpu"), "none",
                        captions=True)
    cands = [c.split() for c in ("a b c d", "a b x", "c d e", "a b")]
    refs = [[r.split()] for r in ("a b c d", "a b c", "c d", "a b c")]
    part = slice(rank * 4 // world, (rank + 1) * 4 // world)
    return {"rows": rows, "bleu_part": astrea.bleu(cands[part], refs[part], n=2),
            "captions": sum(len(it["caption"]) for it in test[:21]), **m}


def _sharded_eval_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_sharded_eval(world, rank, out), f"{out}/eval{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each process embeds its shard of the test and labelled train images (11 of 21 and 31 of 61, the last repeated
    on rank 1) and of the captions; retrieval gathers the embeddings and sums the hits; router weights, class sums,
    correct counts and BLEU n-gram counts are summed: the metrics of one process."""
    import torch.multiprocessing as mp
    mp.spawn(_sharded_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/eval{r}.pt") for r in range(2)]
    one = _sharded_eval(1, 0, tmp_path)
    n = one["captions"]
    assert one.pop("rows") == {"image": 82, "text": n}
    assert all(t.pop("rows") == {"image": 42, "text": (n + 1) // 2} for t in two)
    assert 0 < one["r_mean"] < 100 and 0 < one["cls_acc"] and 0 < one["bleu_part"] < 1
    assert all(t == pytest.approx(one) for t in two), (one, two)


# --- 4. Resume is exact, across stages ---
def test_resume_is_exact_and_the_schedule_must_match(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_main_inprocess(astrea, [*SHORT, "--output-dir", a])
    run_main_inprocess(astrea, [*SHORT, "--max-steps", "11", "--output-dir", b])  # one step into the joint stage
    assert load_ckpt(b)["step"] == 11 and load_ckpt(b)["stage"] == 4 and load_ckpt(b)["queue"]["ptr"] == 32
    capsys.readouterr()
    run_main_inprocess(astrea, [*SHORT, "--output-dir", b])
    assert "resumed from" in capsys.readouterr().out
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["step"] == cb["step"] == 14 and ca["stage"] == cb["stage"] == 4
    for key in ("model", "momentum_model", "queue", "optimizer"):
        assert_tensors_close(ca[key], cb[key], path=key)
    assert ca["results"] == cb["results"] and read_metrics(a) == read_metrics(b)
    before = open(os.path.join(b, "checkpoint.pt"), "rb").read()
    with pytest.raises(SystemExit, match="stage schedule"):  # another schedule: refused, checkpoint untouched
        astrea.main([*SHORT, "--stage-iters", "2", "--output-dir", b])
    assert open(os.path.join(b, "checkpoint.pt"), "rb").read() == before


# --- 5. Bad input ---
def _images(root, n=4):
    import torchvision
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "img", exist_ok=True)
    for i in range(n):
        torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), root / "img" / f"{i}.png")


def test_bad_input(tmp_path):
    _images(tmp_path)
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": "0.png", "caption": ["x", "y"]}]))
    files = {"bad": '[\n {"image": "0.png", "caption": "x"},\n {"image": "1.png" "caption": "y"}\n]\n',
             "nokey": json.dumps([{"image": "0.png", "caption": "x"}, {"image": "1.png"}]), "empty": "[]",
             "boxes": json.dumps([{"image": "0.png", "caption": "x", "labels": [1], "boxes": [[.5, .5, .2, .9]]}]),
             "noimg": json.dumps([{"image": "missing.png", "caption": "x"}])}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    root = ["--image-root", str(tmp_path / "img"), "--eval-data", str(test)]
    cases = [(["--data", tmp_path / "missing.json", *root], ["missing.json", "not found"]),
             (["--data", tmp_path / "bad.json", *root], ["bad.json:3", "not valid JSON"]),
             (["--data", tmp_path / "nokey.json", *root], ["nokey.json", "entry 1", "caption"]),
             (["--data", tmp_path / "empty.json", *root], ["empty.json", "non-empty"]),
             (["--data", tmp_path / "boxes.json", *root], ["boxes.json", "entry 0", "boxes"]),
             (["--data", tmp_path / "noimg.json", *root], ["missing.png", "--image-root"]),
             (["--data", tmp_path / "empty.json"], ["--eval-data"]),
             (["--tiny", "--output-dir", other], ["swav", "not 'astrea'"]),
             (["--tiny", "--queue-size", "60"], ["--queue-size 60", "global batch 32"])]
    for n, (flags, words) in enumerate(cases):
        flags = [str(f) for f in flags] + ([] if "--output-dir" in flags else ["--output-dir", str(tmp_path / f"o{n}")])
        with pytest.raises(SystemExit) as e:
            astrea.main(flags)
        assert str(e.value).startswith("error:") and all(w in str(e.value) for w in words), (words, str(e.value))
    with pytest.raises(SystemExit):
        astrea.get_args(["--experts", "cls,dog"])
    p = run_script("astrea.py", "--max-steps", "0", "--output-dir", tmp_path / "offline", check=False)
    assert p.returncode != 0 and "--no-pretrained" in p.stdout.strip().splitlines()[-1], p.stdout[-1000:]
    # a checkpoint of another shape and a NaN loss: one-line errors, the good checkpoint stays untouched
    good, joint = str(tmp_path / "good"), [*SHORT, "--expert-steps", "0", "--stage-iters", "0"]  # 4 joint steps
    run_main_inprocess(astrea, [*joint, "--max-steps", "1", "--output-dir", good])
    before = open(os.path.join(good, "checkpoint.pt"), "rb").read()
    for flags, words in ((["--embed-dim", "16"], ["does not fit"]),
                         (["--lr", "1e30", "--max-steps", "3"], ["step 3", "untouched"])):
        with pytest.raises(SystemExit) as e:  # step 2 blows the weights up; the stage would save at step 4
            astrea.main([*joint, "--output-dir", good, *flags])
        assert all(w in str(e.value) for w in words), str(e.value)
        assert open(os.path.join(good, "checkpoint.pt"), "rb").read() == before


# --- 6. The pretrained path: BERT and the captioning ViT from save_pretrained folders, dropout on ---
def test_pretrained_path_trains_with_dropout(tmp_path):
    _images(tmp_path, 8)
    rows = [{"image": f"{i % 8}.png", "caption": f"a red circle {i}", "labels": [i % 3], "boxes": [[.1, .1, .6, .7]]}
            for i in range(16)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "test.json").write_text(json.dumps([{"image": f"{i}.png", "caption": [f"a blue square {i}"],
                                                     "labels": [i % 3]} for i in range(4)]))
    vit, bert = save_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8), save_tiny_bert(tmp_path / "bert")
    flags = ["--data", tmp_path / "train.json", "--eval-data", tmp_path / "test.json", "--image-root", tmp_path / "img",
             "--experts", "cap", "--caption-vit", vit, "--text-encoder", bert, "--image-res", "32", "--embed-dim",
             "16", "--queue-size", "16", "--batch-size", "8", "--max-len", "12", "--workers", "0", "--expert-steps",
             "1", "--stage-iters", "1", "--joint-iters", "2", "--output-dir", tmp_path / "out"]
    with DropoutRecorder() as rec:
        run_main_inprocess(astrea, flags)
    online = rec.training_calls()
    assert online and all(training for _, training in online), "trained with dropout off"
    assert len({id(m) for m, _ in online}) >= 8  # ViT (its own stage) and BERT dropouts were called
    assert load_ckpt(tmp_path / "out")["step"] == 4 and 0 <= read_metrics(tmp_path / "out")["r_mean"] <= 100


def test_paper_size_experts_build_on_meta_without_download():
    args = astrea.get_args(["--no-pretrained", "--expert-weights", "none"])
    with torch.device("meta"):
        experts = {k: astrea.Expert(k, args, 80, 30522) for k in astrea.EXPERTS}
    assert {k: e.dim for k, e in experts.items()} == {"classification": 512, "captioning": 768,
                                                       "detection": 2048, "segmentation": 1024}
    count = lambda m: sum(p.numel() for p in m.net.parameters())  # noqa: E731
    assert 11.1e6 < count(experts["classification"]) < 11.2e6  # ResNet-18 without its classifier
    assert 85e6 < count(experts["captioning"]) < 87e6  # ViT-B/16


# --- 7. bf16 and compile on CPU ---
@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile", "aot_eager"]], ids=["bf16", "compile"])
def test_bf16_and_compile_run_a_few_steps(tmp_path, flag):
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_main_inprocess(astrea, [*SHORT, "--expert-steps", "1", "--stage-iters", "1", "--joint-iters", "2",
                                "--output-dir", tmp_path, *flag])
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(log) == 6 and all(math.isfinite(r["loss"]) for r in log)
    if flag[0] == "--compile":
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert sum(breaks.values()) == 0, breaks
