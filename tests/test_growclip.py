"""Tests for growclip.py: PIM against the worked example and its properties, the growth operators and the data-aware
space, the loss and metrics at known points, a --tiny run that learns and grows, two processes vs one (gradients),
exact resume across a growth, the pretrained path with dropout on, real-format data, bf16 / compile, bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import common
import growclip
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, save_tiny_bert, save_tiny_vit)

T = torch.tensor
TINY_ARGS = growclip.get_args(["--tiny"])


def tiny_model(arch, vocab=40, seed=0, **kw):
    args = growclip.get_args(["--tiny", *kw.get("flags", [])])
    vit, bert, _ = growclip.load_encoders(args)
    bert.vocab_size = vocab
    torch.manual_seed(seed)
    return growclip.GrowCLIP(arch, vit, bert, args.embed_dim, args.logit_scale_init, args.logit_scale_max)


def tiny_batch(n=8, seed=0, vocab=40):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    ids = torch.randint(5, vocab, (n, 7), generator=g)
    ids[:, 0] = 2
    att = torch.ones_like(ids)
    att[::2, 5:] = 0  # padded captions
    return image, ids * att, att


# --- 1. Core functions: worked examples and properties ---
def test_pim_worked_example():
    new = torch.full((3, 3), 0.5)  # R = 0.5 everywhere, W_old = [[1, 2], [3, 4]], lam = 0.9
    growclip.pim_blend(new, T([[1.0, 2.0], [3.0, 4.0]]), 0.9)
    assert torch.allclose(new, T([[0.95, 1.85, 0.5], [2.75, 3.65, 0.5], [0.5, 0.5, 0.5]]))
    old, grown = nn.Linear(2, 2, bias=False), nn.Linear(3, 3, bias=False)  # the same through pim_inherit
    with torch.no_grad():
        old.weight.copy_(T([[1.0, 2.0], [3.0, 4.0]])), grown.weight.fill_(0.5)
    growclip.pim_inherit(old, grown, 0.9)
    assert torch.allclose(grown.weight, T([[0.95, 1.85, 0.5], [2.75, 3.65, 0.5], [0.5, 0.5, 0.5]]))


def test_grow_config_space_and_selection():
    a1 = growclip.arch_of(TINY_ARGS)  # L_v 1, L_t 1, L_s 1, d 32, head dim 16
    assert (a1["heads"], growclip.arch_cost(a1)) == (2, 3 * 12 * 32 ** 2)
    a = growclip.grow_config(a1, dv=1, ds=2, dwidth=32)
    assert (a["vision_layers"], a["text_layers"], a["shared_layers"], a["width"], a["heads"]) == (2, 1, 3, 64, 4)
    with pytest.raises(ValueError):
        growclip.grow_config(a1, dwidth=8)  # not a multiple of the head dim
    # the data-aware budget: no more data, no growth; twice the data with gamma 2: cost at most x4
    assert growclip.growth_space(a1, 1.0, 1, (0, 16, 32), 2.0) == [a1]
    space = growclip.growth_space(a1, 2.0, 1, (0, 16, 32), 2.0)
    assert a1 in space and all(growclip.arch_cost(c) <= 4 * growclip.arch_cost(a1) for c in space)
    assert len(space) == 8 + 7 + 1  # width 32: all 8 depths; 48: up to 5 layers; 64: (1, 1, 1) only
    best = growclip.select_architecture(space, growclip.size_key)
    assert (best["width"], best["vision_layers"] + best["text_layers"] + best["shared_layers"]) == (64, 3)
    a2 = growclip.growth_space(best, 2.0, 1, (0, 16, 32), 2.0)  # stage 3: ties broken towards shared, then vision
    assert growclip.select_architecture(a2, growclip.size_key) == growclip.grow_config(best, 1, 0, 1, 32)
    assert growclip.select_architecture(space, lambda c: -c["shared_layers"], budget=1e5)["shared_layers"] == 2
    with pytest.raises(ValueError):
        growclip.select_architecture(space, growclip.size_key, budget=1)


def test_grown_model_shapes_and_inheritance():
    a1 = growclip.arch_of(TINY_ARGS)
    old = tiny_model(a1)
    big = growclip.grow_config(a1, 1, 1, 1, 16)
    new = growclip.pim_inherit(old, tiny_model(big, seed=1), 0.9, depth_init="copy_last")
    assert new.vision.config.num_hidden_layers == 2 and len(new.shared) == 2 and new.text.config.num_hidden_layers == 2
    assert new.vision.config.num_attention_heads == new.text.config.num_attention_heads == new.shared[1].heads == 3
    fresh = tiny_model(big, seed=1).state_dict()
    o, n = old.state_dict(), new.state_dict()
    assert n["vision.layers.0.attention.q_proj.weight"].shape == (48, 48)
    for key, src in (("vision.layers.0.attention.q_proj.weight",) * 2,
                     ("vision.layers.1.mlp.fc2.weight", "vision.layers.0.mlp.fc2.weight"),
                     ("text.encoder.layer.1.output.dense.weight", "text.encoder.layer.0.output.dense.weight"),
                     ("shared.1.q.weight", "shared.0.q.weight"), ("text.embeddings.word_embeddings.weight",) * 2,
                     ("logit_scale",) * 2):  # the same layer, a layer new in depth (copy_last), embeddings, scale
        s = tuple(slice(0, k) for k in o[src].shape)
        assert torch.allclose(n[key][s], 0.9 * o[src] + 0.1 * fresh[key][s]), key
        lo, hi = torch.minimum(o[src], fresh[key][s]), torch.maximum(o[src], fresh[key][s])
        assert ((n[key][s] >= lo - 1e-6) & (n[key][s] <= hi + 1e-6)).all()  # between the old and fresh values
    rest = (slice(None), slice(32, None))  # the new columns keep the fresh init
    assert torch.equal(n["shared.0.fc1.weight"][rest], fresh["shared.0.fc1.weight"][rest])
    rnd = growclip.pim_inherit(old, tiny_model(big, seed=1), 0.9)  # 'random': a new layer is the fresh init
    assert torch.equal(rnd.state_dict()["shared.1.q.weight"], fresh["shared.1.q.weight"])
    half = tiny_model(big, seed=1).to(torch.bfloat16)  # PIM keeps the new model's dtype (and device)
    growclip.pim_inherit(old, half, 0.5)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in half.parameters())


def test_pim_limits_are_the_old_and_the_fresh_model():
    a1 = growclip.arch_of(TINY_ARGS)
    old, batch = tiny_model(a1), tiny_batch()
    old.eval()
    same = growclip.pim_inherit(old, tiny_model(a1, seed=3), 1.0).eval()  # m = 1, same shape: the old function
    with torch.no_grad():
        assert torch.equal(same.encode_image(batch[0]), old.encode_image(batch[0]))
        assert torch.equal(same.encode_text(*batch[1:]), old.encode_text(*batch[1:]))
        assert torch.equal(same(*batch), old(*batch))
    zero = growclip.pim_inherit(old, tiny_model(a1, seed=3), 0.0)  # m = 0: the fresh initialisation
    assert_tensors_close(zero.state_dict(), tiny_model(a1, seed=3).state_dict())


def test_clip_loss_and_metrics_at_known_points():
    e = torch.eye(2)
    assert growclip.clip_loss(e, e, T(1.0), gather=False).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    u, w = T([[1.0, 0.0], [0.0, 1.0]]), T([[0.6, 0.8], [1.0, 0.0]])  # u1.w = (0.6, 1), u2.w = (0.8, 0)
    want = (-math.log(math.exp(6) / (math.exp(6) + math.exp(10))) - math.log(1 / (math.exp(8) + 1))
            - math.log(math.exp(6) / (math.exp(6) + math.exp(8))) - math.log(1 / (math.exp(10) + 1))) / 4
    assert growclip.clip_loss(u, w, T(10.0), gather=False).item() == pytest.approx(want, rel=1e-5)
    feats, classes = T([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), T([[1.0, 0.0], [0.0, 1.0]])
    assert growclip.zero_shot_accuracy(feats, classes, T([0, 1, 1])) == pytest.approx(200 / 3)
    sims = T([[0.9, 0.1, 0.8], [0.2, 0.3, 0.95]])  # image 0 owns captions 0, 1; image 1 owns caption 2
    r = growclip.recall_at_k(sims, torch.eye(3), T([0, 0, 1]))  # image features = the rows: sims = img @ txt^T
    assert r["txt_r1"] == 100 and r["img_r1"] == pytest.approx(200 / 3) and r["img_r5"] == 100
    assert r["r_mean"] == pytest.approx((100 * 5 + 200 / 3) / 6)
    tie = growclip.recall_at_k(T([[0.5, 0.5], [0.5, 0.5]]), torch.eye(2), T([0, 1]))  # ties: the lower index first
    assert tie["txt_r1"] == tie["img_r1"] == 50


def test_check_args():
    growclip.check_args(growclip.get_args([]), 8)
    for flags, words in ((["--width", "500"], "multiple of --head-dim"), (["--width-steps", "0,50"], "--width-steps"),
                         (["--pim-momentum", "1.5"], "[0, 1]"), (["--batch-size", "1"], "at least 2"),
                         (["--image-res", "100"], "--patch-size")):
        with pytest.raises(SystemExit, match=words.replace("[", r"\[").replace("]", r"\]")):
            growclip.check_args(growclip.get_args(flags), 1)
    assert growclip.get_args(["--no-pim"]).pim_momentum == 1.0
    assert growclip.get_args(["--tiny", "--width", "64"]).width == 64  # an explicit flag wins over --tiny
    assert growclip.get_args(["--tiny", "--width=64"]).width == 64 and TINY_ARGS.width == 32


# --- 2. A --tiny run learns and grows ---
def test_tiny_run_learns_and_grows(tmp_path):
    p = run_script("growclip.py", "--tiny", "--output-dir", tmp_path, timeout=900)
    m = read_metrics(tmp_path)
    assert list(m)[:2] == ["zeroshot_top1", "zeroshot_top1_init"]
    assert m["zeroshot_top1"] > m["zeroshot_top1_init"] + 10 and m["r_mean"] > 40, m
    assert m["stage1_width"] < m["stage2_width"] < m["stage3_width"] and m["stage1_params"] < m["stage3_params"]
    assert "grown to" in p.stdout and "stage  pairs" in p.stdout
    assert [r["stage_eval"]["stage"] for r in read_log(tmp_path) if "stage_eval" in r] == [1, 2, 3]


# --- 3. Two processes agree with one process holding the same global batch ---
def _grads(world, rank):
    torch.set_num_threads(1)
    a = growclip.grow_config(growclip.arch_of(TINY_ARGS), 0, 0, 1, 16)  # 2 shared layers, width 48
    model = tiny_model(a)
    net = common.distribute(model, torch.device("cpu"))
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = net(*[x[part] for x in tiny_batch()])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_grads(world, rank), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_gradients(tmp_path):
    """Local rows against the gathered global batch (with gradient), DDP's average: every process gets the gradient
    of the global-batch loss that one process computes. A gradient off by a constant factor fails."""
    import torch.multiprocessing as mp
    mp.spawn(_grad_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    loss, one = _grads(1, 0)
    assert (two[0][0] + two[1][0]).item() / 2 == pytest.approx(loss.item(), abs=1e-5)
    assert len(one) > 30 and set(one) == set(two[0][1])
    for name, ref in one.items():
        for r in range(2):
            err = (two[r][1][name] - ref).norm()
            assert err <= 1e-4 * ref.norm() + 1e-7, f"{name}: |diff| {err:.3g} vs |grad| {ref.norm():.3g}"


def _eval(out):
    """evaluate() of a tiny random model on 61 zero-shot images (120 prompts) and 21 test images (42 captions); the
    images and texts this process embedded."""
    torch.set_num_threads(1)
    args = growclip.get_args(["--tiny", "--output-dir", str(out), "--workers", "0"])
    _, _, test, zeroshot = growclip.load_data(args)
    zeroshot = [(n, classes, samples[::2][:61]) for n, classes, samples in zeroshot]  # labels 0, 0, 1, 1, ...
    tok = growclip.make_tokenizer(args, [c for it in test for c in it["caption"]] + [growclip.PROMPT.format(c) for c in
                                                                                     zeroshot[0][1]])
    model, rows = tiny_model(growclip.arch_of(args), vocab=len(tok)), {"image": 0, "text": 0}
    for key, proj in (("image", model.vision_proj), ("text", model.text_proj)):
        proj.register_forward_hook(lambda m, x, y, key=key: rows.update({key: rows[key] + len(x[0])}))
    return {"rows": rows, **growclip.evaluate(model, test[:21], zeroshot, tok, args, torch.device("cpu"), "none")}


def _eval_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_eval(out), f"{out}/eval{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path):
    """Each process embeds its shard of the zero-shot images (31 of 61, the last repeated on rank 1) and sums its
    correct counts; prompts (60 of 120), test images (11 of 21) and captions (21 of 42) are gathered and each
    process ranks a part of the queries: the metrics of one process."""
    import torch.multiprocessing as mp
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/eval{r}.pt") for r in range(2)]
    one = _eval(tmp_path)
    assert one.pop("rows") == {"image": 82, "text": 162}
    assert all(t.pop("rows") == {"image": 42, "text": 81} for t in two)
    assert one["zeroshot_top1"] > 0 and 0 < one["r_mean"] < 100
    assert all(t == pytest.approx(one) for t in two), (one, two)


# --- 4. Resume is exact, across a growth and inside a grown stage ---
def test_resume_is_exact_across_growth(tmp_path):
    flags = ["--tiny", "--epochs", "1", "--log-every", "100"]  # stage 1 = 16 steps, stage 2 = 32 steps
    run_main_inprocess(growclip, [*flags, "--max-steps", "22", "--output-dir", tmp_path / "full"])
    for stop in (10, 19, 22):  # inside stage 1; inside the grown stage 2; the end
        run_main_inprocess(growclip, [*flags, "--max-steps", stop, "--output-dir", tmp_path / "split"])
        assert load_ckpt(tmp_path / "split")["step"] == stop
    a, b = load_ckpt(tmp_path / "full"), load_ckpt(tmp_path / "split")
    assert a["stage"] == b["stage"] == 1 and a["arch"] == b["arch"] and a["arch"]["width"] == 64
    assert a["history"] == b["history"] and len(a["history"]) == 1
    for key in ("model", "optimizer"):
        assert_tensors_close(a[key], b[key], path=key)


# --- 5. Real-format data, the pretrained path with dropout on, proxy search ---
def _json_data(root, sizes=(16, 16, 32)):
    """Image-text chunks in ALBEF's format, a retrieval test JSON and a zero-shot ImageFolder."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    for c in ("red_ball", "blue_box"):
        os.makedirs(root / "zs" / c, exist_ok=True)
        for i in range(2):
            torchvision.utils.save_image(torch.rand(3, 36, 40, generator=g), root / "zs" / c / f"{i}.png")
    os.makedirs(root / "img", exist_ok=True)
    for i in range(8):
        torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), root / "img" / f"{i}.png")
    files = []
    for t, n in enumerate(sizes):
        files.append(root / f"chunk{t}.json")
        files[-1].write_text(json.dumps([{"image": f"{i % 8}.png", "caption": [f"A red ball, {i}!", "a box"]
                                          if i % 2 else f"a blue box {i}"} for i in range(n)]))
    (root / "test.json").write_text(json.dumps([{"image": f"{i}.png", "caption": [f"a ball {i}", "a box"]}
                                                for i in range(4)]))
    return ["--data", ",".join(map(str, files)), "--eval-data", root / "test.json", "--zeroshot-data", root / "zs",
            "--image-root", root / "img"]


def test_pretrained_path_grows_and_trains_with_dropout(tmp_path):
    """ViT and BERT from local save_pretrained folders (from_pretrained returns eval mode): every dropout call of the
    training steps runs in train mode, before and after the growths, on real-format chunks."""
    vit, bert = save_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8), save_tiny_bert(tmp_path / "bert")
    args = growclip.get_args(["--tiny", *_json_data(tmp_path)])
    train, sizes, test, zs = growclip.load_data(args)
    assert sizes == [16, 32, 64] and train[1][1] == ["a red ball 1", "a box"] and zs[0][1] == ["blue box", "red ball"]
    flags = [*_json_data(tmp_path), "--tiny", "--vit", vit, "--text-encoder", bert, "--batch-size", "8", "--epochs",
             "1", "--output-dir", tmp_path / "out"]
    with DropoutRecorder() as rec:
        run_main_inprocess(growclip, flags)
    online = rec.training_calls()
    assert online and all(training for _, training in online), "trained with dropout off"
    assert len({id(m) for m, _ in online}) >= 16  # dropouts of the first and the grown models were called
    ckpt, m = load_ckpt(tmp_path / "out"), read_metrics(tmp_path / "out")
    assert ckpt["step"] == 2 + 4 + 8 and ckpt["arch"]["width"] > 32 and ckpt["arch"]["text_layers"] >= 2
    assert 0 <= m["zeroshot_top1"] <= 100 and "r_mean" in m and "zeroshot_zs" in m


def test_proxy_search_picks_the_lowest_held_out_loss(tmp_path, capsys):
    run_main_inprocess(growclip, ["--tiny", "--search", "proxy", "--proxy-candidates", "2", "--proxy-iters", "2",
                                  "--epochs", "1", "--max-steps", "17", "--output-dir", tmp_path])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("proxy scores")]
    assert len(lines) == 1
    scores = {a.strip(): float(s) for a, s in (x.rsplit(":", 1) for x in lines[0][len("proxy scores: "):].split(";"))}
    assert len(scores) == 2 and growclip.arch_str(load_ckpt(tmp_path)["arch"]) == min(scores, key=scores.get)


# --- 6. bf16 and compile ---
@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile", "aot_eager"]])
def test_bf16_and_compile_run_a_few_steps(tmp_path, flag):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run_main_inprocess(growclip, ["--tiny", "--max-steps", "3", "--epochs", "1", "--log-every", "1",
                                  "--output-dir", tmp_path, *flag])
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    if flag[0] == "--compile":  # no graph break, one graph for the three steps
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert dict(counters["stats"])["unique_graphs"] == 1, dict(counters["stats"])


# --- 7. Bad input ---
def test_bad_input(tmp_path):
    flags = _json_data(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"image": "0.png", "caption": "x"},\n {"image": "1.png" "caption": "y"}\n]\n')
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps([{"image": "0.png", "caption": "x"}, {"image": "1.png"}]))
    noimg = tmp_path / "noimg.json"
    noimg.write_text(json.dumps([{"image": "missing.png", "caption": "x"}]))
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    rest = flags[2:]
    cases = [
        (["--data", tmp_path / "missing.json", *rest], ["missing.json", "not found"]),
        (["--data", bad, *rest], ["bad.json:3", "not valid JSON"]),
        (["--data", nokey, *rest], ["nokey.json", "entry 1", "caption"]),
        (["--data", noimg, *rest], ["missing.png", "--image-root"]),
        ([*flags[:2], "--zeroshot-data", tmp_path / "nodir"], ["nodir", "class folders"]),
        (["--data", flags[1]], ["--eval-data"]),
        (["--tiny", "--output-dir", other], ["swav", "not 'growclip'"]),
        (["--tiny", "--text-encoder", tmp_path / "nobert", "--max-steps", "0"], ["--text-encoder", "from scratch"]),
    ]
    for n, (case, words) in enumerate(cases):
        argv = [str(f) for f in case] + ([] if "--output-dir" in case else ["--output-dir", str(tmp_path / f"o{n}")])
        with pytest.raises(SystemExit) as e:
            growclip.main(argv)
        assert str(e.value).startswith("error:") and all(w in str(e.value) for w in words), (words, str(e.value))
    # from the command line: non-zero exit, one line, no traceback
    p = run_script("growclip.py", "--tiny", "--width", "40", "--output-dir", tmp_path / "w", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "error: --width 40 is not a multiple of --head-dim 16"
    p = run_script("growclip.py", "--tiny", "--vit", "google/vit-base-patch16-224", "--output-dir", tmp_path / "hub",
                   check=False)  # offline (the helpers set HF_HUB_OFFLINE): a hub name cannot be reached
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode != 0 and last.startswith("error:") and "--vit" in last and "from scratch" in last, last
    # stages that do not match the checkpoint, a checkpoint of another shape, a NaN loss: the checkpoint survives
    good = str(tmp_path / "good")
    growclip.main(["--tiny", "--max-steps", "1", "--output-dir", good])
    before = open(os.path.join(good, "checkpoint.pt"), "rb").read()
    for case, words in ((["--stages", "2"], ["stages of", "--stages"]), (["--embed-dim", "16"], ["does not fit"]),
                        (["--lr", "1e30", "--max-steps", "4", "--log-every", "1", "--warmup", "0"],
                         ["loss is", "untouched"])):
        with pytest.raises(SystemExit) as e:
            growclip.main(["--tiny", "--output-dir", good, *case])
        assert all(w in str(e.value) for w in words), str(e.value)
        assert open(os.path.join(good, "checkpoint.pt"), "rb").read() == before
