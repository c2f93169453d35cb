"""Tests for ctp.py: the spec's worked examples (compatible momentum update, momentum contrast, topology KL, MLM
distillation, BWT) and properties, a --tiny sequence where CTP learns and forgets less than sequential fine-tuning,
two processes vs one (gradients), exact resume in the middle of a later task, bad input, the pretrained path with
dropout on, and bf16 / compile."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ctp
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, save_tiny_bert, save_tiny_vit)

T = torch.tensor


# --- 1. Core functions: worked examples and properties ---
def _filled(*values):
    mods = [nn.Linear(2, 2) for _ in values]
    with torch.no_grad():
        for m, v in zip(mods, values):
            for p in m.parameters():
                p.fill_(v)
    return mods


def test_compatible_momentum_update_worked_examples():
    mom, student, ref = _filled(1.0, 3.0, 2.0)
    ctp.ctp_momentum_update(mom, student, ref, m=0.9)  # 0.9 * 1 + 0.05 * 3 + 0.05 * 2
    assert all(torch.allclose(p, torch.full_like(p, 1.15)) for p in mom.parameters())
    mom, student = _filled(1.0, 3.0)
    ctp.ctp_momentum_update(mom, student, None, m=0.995)  # task 0: plain EMA, 0.995 * 1 + 0.005 * 3
    assert all(torch.allclose(p, torch.full_like(p, 1.01)) for p in mom.parameters())
    assert all((p == 3).all() for p in student.parameters())  # the student is untouched
    torch.manual_seed(0)  # after one update every parameter lies in the convex hull of the three models
    mom, student, ref = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(5, 4)
    before = [torch.stack([a.detach().clone(), b.detach(), c.detach()]) for a, b, c in
              zip(mom.parameters(), student.parameters(), ref.parameters())]
    ctp.ctp_momentum_update(mom, student, ref, m=0.9)
    for p, stack in zip(mom.parameters(), before):
        assert (p >= stack.min(0).values - 1e-7).all() and (p <= stack.max(0).values + 1e-7).all()
        assert torch.allclose(p, 0.9 * stack[0] + 0.05 * stack[1] + 0.05 * stack[2])


def test_momentum_contrast_worked_example():
    v, w_m, q = T([[1.0, 0.0], [0.0, 1.0]]), T([[.6, .8], [0.0, 1.0]]), T([[1.0, 0.0], [-1.0, 0.0]])
    # S = [[.6, 0, 1, -1], [.8, 1, 0, 0]], one-hot targets (0, 1): rows 1.1764 and 0.9378. Both directions are made
    # identical (text = image, both momentum sets and queues equal), so the halved sum is that mean.
    loss = ctp.momentum_contrast_loss(v, v, w_m, w_m, q, q, tau=1.0)
    assert loss.item() == pytest.approx(1.0571, abs=1e-4)
    rows = F.cross_entropy(T([[.6, 0, 1, -1], [.8, 1, 0, 0]]), T([0, 1]), reduction="none")
    assert torch.allclose(rows, T([1.1764, 0.9378]), atol=1e-4)


V = T([[1.0, 0.0], [0.0, 1.0], [.6, .8]])
V_REF = T([[1.0, 0.0], [.6, .8], [0.0, 1.0]])


def test_topology_intra_modal_worked_example():
    eye = torch.eye(3, dtype=torch.bool)
    s, s_ref = (V @ V.T).masked_fill(eye, -1000.0), (V_REF @ V_REF.T).masked_fill(eye, -1000.0)
    assert torch.allclose(F.softmax(s_ref, 1)[0], T([0.0, .6457, .3543]), atol=1e-4)
    assert torch.allclose(F.softmax(s, 1)[0], T([0.0, .3543, .6457]), atol=1e-4)
    assert ctp.topology_kl(s_ref, s, 1.0).item() == pytest.approx(0.08629, abs=1e-4)
    assert ctp.topology_kl(s_ref, s, 0.07).item() == pytest.approx(3.0112, abs=1e-3)
    # through topology_loss: text equal to its reference, so KL_t2t = 0 and l_intra = KL_i2i / 2
    w = T([[.8, .6], [0.0, 1.0], [1.0, 0.0]])
    _, l_intra = ctp.topology_loss(V, w, V_REF, w, tau=1.0)
    assert l_intra.item() == pytest.approx(0.08629 / 2, abs=1e-4)
    naive = (F.softmax(s_ref / 0.07, 1) * (F.softmax(s_ref / 0.07, 1).log() - F.softmax(s / 0.07, 1).log())).sum()
    assert torch.isnan(naive)  # the masked entries: 0 * log 0 with log(softmax); kl_div gives exactly 0 there


def test_topology_cross_modal_worked_example_and_properties():
    w, w_ref = T([[.8, .6], [0.0, 1.0], [1.0, 0.0]]), T([[1.0, 0.0], [0.0, 1.0], [.6, .8]])
    assert ctp.topology_kl(V_REF @ w_ref.T, V @ w.T, 1.0).item() == pytest.approx(0.09717, abs=1e-4)
    assert ctp.topology_kl(V_REF @ w_ref.T, V @ w.T, 0.07).item() == pytest.approx(6.1570, abs=1e-3)
    l_cross, _ = ctp.topology_loss(V, w, V_REF, w_ref, tau=1.0)
    kl_t2i = ctp.topology_kl(w_ref @ V_REF.T, w @ V.T, 1.0)
    assert l_cross.item() == pytest.approx((0.09717 + kl_t2i.item()) / 2, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_() for _ in range(2))
    assert all(x.item() == pytest.approx(0.0, abs=1e-6) for x in ctp.topology_loss(img, txt, img.detach(),
                                                                                    txt.detach()))
    img_ref, txt_ref = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
    l_cross, l_intra = ctp.topology_loss(img, txt, img_ref, txt_ref, tau=0.07)
    (l_cross + l_intra).backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0 and l_intra > 0


def test_mlm_distillation_masking_and_queue():
    assert ctp.mlm_distill_loss(T([[2.0, 0.0]]), T([[1.0, 1.0]]), T([0])).item() == pytest.approx(1.1269, abs=1e-4)
    two = ctp.mlm_distill_loss(T([[2.0, 0.0], [9.0, -9.0]]), T([[1.0, 1.0], [0.0, 5.0]]), T([0, -100]))
    assert two.item() == pytest.approx(1.1269, abs=1e-4)  # label -100: ignored
    assert ctp.mlm_distill_loss(T([[2.0, 0.0]]), T([[1.0, 1.0]]), T([-100])).item() == 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (400, 30), generator=g)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 2, 3, 0  # [CLS] ... [SEP] [PAD]...
    masked, labels = ctp.mask_tokens(ids, 100, 4, (0, 2), 0.15, generator=g)
    sel = labels != -100
    assert not sel[:, 0].any() and not sel[:, 21:].any() and sel[:, 20].any()  # [SEP] may be masked
    assert abs(sel[:, 1:21].float().mean().item() - 0.15) < 0.01
    assert abs((masked[sel] == 4).float().mean().item() - 0.8) < 0.03
    assert abs((masked[sel] == ids[sel]).float().mean().item() - 0.1) < 0.03
    q = torch.zeros(4, 2)
    ptr = ctp.dequeue_and_enqueue(q, 0, T([[1.0, 1], [2, 2]]))
    ptr = ctp.dequeue_and_enqueue(q, ptr, T([[3.0, 3], [4, 4]]))
    assert ptr == 0 and q[:, 0].tolist() == [1, 2, 3, 4]
    ptr = ctp.dequeue_and_enqueue(q, ptr, T([[5.0, 5], [6, 6]]))
    assert ptr == 2 and q[:, 0].tolist() == [5, 6, 3, 4]  # wraps modulo K, the oldest rows go first
    with pytest.raises(ValueError):
        ctp.dequeue_and_enqueue(q, 0, torch.ones(3, 2))


def test_recall_bwt_and_heat_map(tmp_path):
    assert ctp.bwt([80, 70, 60], [75, 66, 60]) == pytest.approx(4.5)
    sims = T([[0.9, 0.1, 0.0], [0.8, 0.2, 0.5], [0.0, 0.1, 0.3]])  # image 1 ranks its caption 3rd
    r = ctp.itm_recall(sims, torch.eye(3))  # image features = the rows: sims = img @ txt^T
    assert r["tr1"] == pytest.approx(200 / 3) and r["tr5"] == 100 and r["ir1"] == pytest.approx(200 / 3)
    assert r["r_mean"] == pytest.approx((200 / 3 * 2 + 100 * 4) / 6)
    # official t2i: each text's own top-k row; image 1's top-1 row drops text 1, text 1's row keeps image 1
    r = ctp.itm_recall(T([[0.9, 0.1], [0.8, 0.5]]), torch.eye(2), k_test=1)
    assert r["tr1"] == 50 and r["ir1"] == 100
    tie = ctp.itm_recall(T([[0.5, 0.5], [0.5, 0.5]]), torch.eye(2))  # ties: the lower index first
    assert tie["tr1"] == tie["ir1"] == 50
    assert ctp.keep_topk(sims, 1).tolist()[1] == [0.800000011920929, -100.0, -100.0]
    ctp.heat_map([[50.0, None], [20.0, 100.0]], str(tmp_path / "m.png"), cell=24)
    import torchvision
    img = torchvision.io.read_image(str(tmp_path / "m.png"))
    assert img.shape == (3, 48, 48) and not torch.equal(img[:, :24, :24], img[:, 24:, 24:])


def test_check_args_at_world_size():
    ctp.check_args(ctp.get_args([]), 4)  # official: 4 x 128 = 512 divides the queue of 1024
    ctp.check_args(ctp.get_args(["--batch-size", "64"]), 8)
    ctp.check_args(ctp.get_args(["--batch-size", "32"]), 16)
    with pytest.raises(SystemExit, match="not a multiple of the global batch 2048"):
        ctp.check_args(ctp.get_args([]), 16)
    ctp.check_args(ctp.get_args(["--method", "finetune"]), 16)  # no queue
    with pytest.raises(SystemExit, match="names a task twice"):
        ctp.check_args(ctp.get_args(["--tasks", "food,food"]), 1)
    a = ctp.get_args(["--tiny", "--lr", "0.5"])
    assert a.lr == 0.5 and a.queue_size == 256  # explicit flags win over the tiny preset
    assert ctp.task_list(ctp.get_args(["--data", "P9D", "--task-order", "reverse"]))[0] == "3C数码"


# --- 2. A --tiny sequence learns, and CTP forgets less than sequential fine-tuning ---
def test_tiny_ctp_forgets_less_than_finetune(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    methods = ("ctp", "finetune")
    with ThreadPoolExecutor(2) as pool:  # one core each
        runs = list(pool.map(lambda m: run_script("ctp.py", "--tiny", "--method", m, "--output-dir", tmp_path / m,
                                                  timeout=900, threads=1), methods))
    out = {m: read_metrics(tmp_path / m) for m in methods}
    for m, p in zip(methods, runs):
        assert f"{m}: r_mean after task" in p.stdout and os.path.exists(tmp_path / m / "matrix.png")
    c, f = out["ctp"], out["finetune"]
    assert list(c)[:2] == ["r_mean", "r_mean_init"]
    assert c["r_mean"] > c["r_mean_init"] + 10 and f["r_mean"] > f["r_mean_init"] + 5, (c, f)
    assert c["forgetting"] < f["forgetting"] - 3, (c["forgetting"], f["forgetting"])
    assert read_log(tmp_path / "ctp")[-1]["eval"]["r_mean"] == c["r_mean"]


# --- 3. Two processes agree with one process ---
def _setup(out):
    """Tiny student, momentum and (perturbed) reference models, a queue, and a fixed batch of 8 task-0 pairs."""
    torch.set_num_threads(1)
    args = ctp.get_args(["--tiny", "--output-dir", str(out), "--queue-size", "16"])
    tasks = ctp.task_list(args)
    train, test = ctp.synthetic_data(args, tasks)
    tok = ctp.make_tokenizer(args, [t for d in tasks for _, t in train[d] + test[d]])
    torch.manual_seed(0)
    model = ctp.build_model(args, len(tok))
    model_m, ref = common.momentum_copy(model), common.momentum_copy(model)
    with torch.no_grad():  # the reference differs from the student, so that L_tp has a gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    queue = ctp.Queue(args.embed_dim, args.queue_size, args.seed)
    ds = ctp.PairSet(train[tasks[0]], tok, args)
    batch = torch.utils.data.default_collate([ds[(i, 1000 + i)] for i in range(8)])
    return args, model, model_m, ref, queue, batch


GLOBAL_TERMS, LOCAL_TERMS = ("ita", "tp"), ("cmc", "mlm", "md")


def _grads(world, rank, out):
    """Per group of loss terms: the gradients of one step through the training path (common.distribute: DDP when
    a process group runs) on slice `rank` of `world` of the fixed batch."""
    args, model, model_m, ref, queue, batch = _setup(out)
    net = common.distribute(model, torch.device("cpu"))
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    res = {}
    for group in (GLOBAL_TERMS, LOCAL_TERMS):
        model.zero_grad(set_to_none=True)
        terms, _ = net(*[x[part] for x in batch], model_m=model_m, ref=ref, queue=queue, tau=args.tau)
        # the other terms with weight 0 keep every parameter in the graph (DDP waits for all of them)
        sum(v * (1.0 if k in group else 0.0) for k, v in terms.items()).backward()
        res[group] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return res


def _grad_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_grads(world, rank, out), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _close(got, want, what):
    assert set(got) == set(want) and len(want) > 20, what
    for name in want:
        err = (got[name] - want[name]).norm()
        assert err <= 1e-4 * want[name].norm() + 1e-7, f"{what} {name}: |diff| {err:.3g} vs {want[name].norm():.3g}"


def test_two_processes_match_one_process_gradients(tmp_path):
    """ITA and L_tp use the all-gathered batch (with gradient): two processes of 4 give the gradient of one process
    holding all 8. L_cmc (local batch + queue) and the MLM terms are per process by design (official): DDP gives the
    mean of the per-slice gradients. A gradient off by a constant factor fails either comparison."""
    import torch.multiprocessing as mp
    mp.spawn(_grad_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    one = _grads(1, 0, tmp_path)
    halves = [_grads(2, r, tmp_path)[LOCAL_TERMS] for r in range(2)]  # no process group here: plain slices
    mean = {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}
    for r in range(2):
        _close(two[r][GLOBAL_TERMS], one[GLOBAL_TERMS], f"rank {r} ita+tp")
        _close(two[r][LOCAL_TERMS], mean, f"rank {r} cmc+mlm+md")


def _eval(world, rank, out):
    """evaluate() of a tiny random model on test splits of 23, 16 and 24 pairs; the images and titles embedded."""
    torch.set_num_threads(1)
    args = ctp.get_args(["--tiny", "--output-dir", str(out), "--workers", "0"])
    tasks = ctp.task_list(args)
    train, test = ctp.synthetic_data(args, tasks)
    tok = ctp.make_tokenizer(args, [t for d in tasks for _, t in train[d] + test[d]])
    torch.manual_seed(0)
    model, rows = ctp.build_model(args, len(tok)), {"image": 0, "text": 0}
    for key, proj in (("image", model.vision_proj), ("text", model.text_proj)):
        proj.register_forward_hook(lambda m, x, y, key=key: rows.update({key: rows[key] + len(x[0])}))
    splits = [test[tasks[0]][:23], test[tasks[1]], test[tasks[2]]]
    assert [len(s) for s in splits] == [23, 16, 24]
    per_task, prefix = ctp.evaluate(model, splits, tok, args, torch.device("cpu"), "none")
    return {"rows": rows, "per_task": per_task, "prefix": prefix}


def _eval_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_eval(world, rank, out), f"{out}/eval{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each process embeds its shard of every split (12 + 8 + 12 pairs of 63, the last of split 0 repeated on
    rank 1) and ranks its shard of the queries; the gathered embeddings and the summed hit counts give the
    one-process R@K of every split and union."""
    import torch.multiprocessing as mp
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/eval{r}.pt") for r in range(2)]
    one = _eval(1, 0, tmp_path)
    assert one["rows"] == {"image": 63, "text": 63} and all(t["rows"] == {"image": 32, "text": 32} for t in two)
    assert 0 < one["prefix"][-1]["r_mean"] < 100
    for t in two:
        for key in ("per_task", "prefix"):
            assert [pytest.approx(m) for m in one[key]] == t[key], key


# --- 4. Resume is exact, in the middle of a later task ---
def test_resume_mid_task_is_exact(tmp_path):
    flags = ("--tiny", "--epochs", "1", "--log-every", "5")  # 10 steps per task: step 15 is inside task 1
    run_script("ctp.py", *flags, "--max-steps", "18", "--output-dir", tmp_path / "full")
    run_script("ctp.py", *flags, "--max-steps", "15", "--output-dir", tmp_path / "split")
    mid = load_ckpt(tmp_path / "split")
    assert mid["step"] == 15 and mid["task"] == 1 and mid["ref_model"] is not None and len(mid["rows"]) == 1
    p = run_script("ctp.py", *flags, "--max-steps", "18", "--output-dir", tmp_path / "split")
    assert "resumed" in p.stdout
    a, b = load_ckpt(tmp_path / "full"), load_ckpt(tmp_path / "split")
    assert a["step"] == b["step"] == 18
    for key in ("model", "momentum_model", "ref_model", "queue", "optimizer", "rows"):
        assert_tensors_close(a[key], b[key], path=key)
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "split")


# --- 5. Bad input ---
def _p9d(root, n=8):
    """A tiny P9D folder: train.json by industry, test.json flat, images in train_images/ and gallery_images/."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    for sub in ("train_images", "gallery_images"):
        os.makedirs(root / sub, exist_ok=True)
    train, test = {}, {}
    for k, ind in enumerate(("家居用品", "母婴")):
        train[ind] = {f"{ind}{i}": {"title": f"红色 杯子 {i}!", "cate_name": "杯子"} for i in range(n)}
        test.update({f"t{k}{i}": {"title": f"蓝色 {i}", "industry_name": ind, "cate_name": "c"} for i in range(4)})
        for i in range(n):
            torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), root / "train_images" / f"{ind}{i}.jpg")
    for i in test:
        torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), root / "gallery_images" / f"{i}.jpg")
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False, indent=1))
    (root / "test.json").write_text(json.dumps(test, ensure_ascii=False, indent=1))
    return root


def test_p9d_layout_trains_and_evaluates(tmp_path):
    root = _p9d(tmp_path / "p9d")
    train, test = ctp.load_p9d(ctp.get_args(["--data", str(root), "--tasks", "母婴,家居用品"]), ["母婴", "家居用品"])
    assert list(train) == ["母婴", "家居用品"] and train["母婴"][0][1] == "红色 杯子 0"  # pre_caption drops '!'
    assert [len(test[t]) for t in test] == [4, 4] and test["家居用品"][0][0].endswith("gallery_images/t00.jpg")
    out = tmp_path / "out"
    ctp.main(["--tiny", "--data", str(root), "--tasks", "家居用品,母婴", "--batch-size", "4", "--queue-size", "8",
              "--epochs", "2", "--output-dir", str(out)])
    m = read_metrics(out)
    assert load_ckpt(out)["step"] == 8 and 0 <= m["r_mean"] <= 100 and "r_mean_母婴" in m


def test_bad_input(tmp_path):
    root = _p9d(tmp_path / "p9d")
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (root / "train.json").read_text().splitlines()
    lines[3] = lines[3].replace('"title":', '"title"')  # line 4: a missing colon
    (bad / "train.json").write_text("\n".join(lines))
    (bad / "test.json").write_text((root / "test.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "albef"}, other / "checkpoint.pt")
    cases = [  # (flags, words the one-line error must contain); each exits before training
        (["--data", tmp_path / "missing"], ["missing/train.json", "not found"]),
        (["--data", bad, "--tasks", "家居用品"], ["bad/train.json:4", "not valid JSON"]),
        (["--data", root, "--tasks", "家居用品,食品"], ["train.json", "no industry '食品'", "--tasks"]),
        (["--tiny", "--output-dir", other], ["albef", "not 'ctp'"]),
        (["--tiny", "--tasks", "household,toys"], ["synthetic data", "--tasks"]),
    ]
    for n, (flags, words) in enumerate(cases):
        flags = [str(f) for f in flags] + ([] if "--output-dir" in flags else ["--output-dir", str(tmp_path / f"o{n}")])
        with pytest.raises(SystemExit) as e:
            ctp.main(flags)
        assert str(e.value).startswith("error:") and all(w in str(e.value) for w in words), (words, str(e.value))
    os.remove(root / "gallery_images" / "t10.jpg")
    with pytest.raises(SystemExit, match="t10.jpg not found"):
        ctp.main(["--tiny", "--data", str(root), "--tasks", "家居用品,母婴", "--output-dir", str(tmp_path / "img")])
    p = run_script("ctp.py", "--tiny", "--queue-size", "60", "--output-dir", tmp_path / "q", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stdout
    assert "error: --queue-size 60 is not a multiple of the global batch 32" in p.stdout.strip().splitlines()[-1]
    p = run_script("ctp.py", "--max-steps", "0", "--output-dir", tmp_path / "offline", check=False)
    assert p.returncode != 0 and "--no-pretrained" in p.stdout.strip().splitlines()[-1], p.stdout[-1000:]
    # a checkpoint of other tasks or another method, of another shape, and a NaN loss: one-line errors, the
    # good checkpoint untouched
    good = str(tmp_path / "good")
    ctp.main(["--tiny", "--epochs", "1", "--max-steps", "2", "--output-dir", good])
    before = open(os.path.join(good, "checkpoint.pt"), "rb").read()
    for flags, words in ((["--task-order", "reverse"], ["trained on the tasks", "--tasks"]),
                         (["--method", "finetune"], ["trained on the tasks", "--method"]),
                         (["--embed-dim", "16"], ["does not fit"]),
                         (["--lr", "1e30", "--max-steps", "4", "--log-every", "1"], ["loss is", "untouched"])):
        with pytest.raises(SystemExit) as e:
            ctp.main(["--tiny", "--epochs", "1", "--output-dir", good, *flags])
        assert all(w in str(e.value) for w in words), str(e.value)
        assert open(os.path.join(good, "checkpoint.pt"), "rb").read() == before


# --- 6. The pretrained path: ViT and BERT from local save_pretrained folders, dropout on while training ---
def test_pretrained_path_trains_with_dropout(tmp_path):
    vit = save_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8)
    bert = save_tiny_bert(tmp_path / "bert", layers=4)
    flags = ["--vit", vit, "--text-encoder", bert, "--fusion-layer", "2", "--image-size", "32", "--embed-dim", "16",
             "--queue-size", "16", "--batch-size", "8", "--max-words", "16", "--workers", "0", "--max-steps", "2",
             "--tasks", "household", "--output-dir", tmp_path / "out"]
    with DropoutRecorder() as rec:
        run_main_inprocess(ctp, flags)
    online = rec.training_calls()
    assert online and all(training for _, training in online), "the student trained with dropout off"
    assert len({id(m) for m, _ in online}) >= 8  # ViT and BERT dropouts (embeddings and every layer) were called
    momentum = {id(m) for m, t, grad in rec.calls if not grad and t}  # task 0: the momentum model in train mode
    assert len(momentum) >= len({id(m) for m, _ in online}) // 2, "momentum model did not run in train mode"
    assert load_ckpt(tmp_path / "out")["step"] == 2


# --- 7. bf16 and compile on CPU ---
@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile", "aot_eager"]])
def test_bf16_and_compile_run_a_few_steps(tmp_path, flag):
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ctp.main(["--tiny", "--epochs", "1", "--max-steps", "12", "--log-every", "1", "--output-dir", str(tmp_path), *flag])
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(log) == 12 and all(torch.isfinite(T(r["loss"])) for r in log) and "tp" in log[-1]
    if flag[0] == "--compile":
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert not breaks, breaks
