"""Tests for esimcse.py: hand-computed worked examples, a --tiny run that learns, torchrun == one process, exact resume,
bad input. Fixture files are written here; nothing is downloaded."""
import math
import os
import random
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import esimcse as E
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, run_torchrun, save_tiny_bert, save_tiny_roberta)

CLS, SEP = 101, 102


# --- 1. core functions against the worked examples and properties ---
def test_repeat_at_worked_example():
    ids = [101, 1037, 4937, 2938, 102]
    out = E.repeat_at(ids, [1, 3])
    assert out == [101, 1037, 1037, 4937, 2938, 2938, 102]
    assert [t for i, t in enumerate(out) if i not in (2, 5)] == ids  # removing the second copies gives the input


def test_word_repetition_official_rule():
    short = [CLS, 5, 6, 7, SEP]  # L = 5: int(0.32 * 5) = 1 -> randrange(1) = 0 duplicates, always
    for s in range(50):
        assert E.word_repetition(short, 0.32, random.Random(s)) == short
    ids = [CLS] + list(range(1000, 1030)) + [SEP]  # L = 32: int(10.24) = 10 -> n in {0..9}
    seen = set()
    for s in range(400):
        out = E.word_repetition(ids, 0.32, random.Random(s))
        n = len(out) - len(ids)
        seen.add(n)
        assert out[0] == CLS and out[-1] == SEP and out[1] != CLS and out[-2] != SEP  # specials never repeated
        assert list(dict.fromkeys(out)) == ids  # each token kept in order, copies adjacent
        rng = random.Random(s)  # the official draw order: randrange(min(10, int(rate*L))), then sample(1..L-2)
        k = rng.randrange(min(10, int(0.32 * len(ids))))
        assert out == E.repeat_at(ids, rng.sample(range(1, len(ids) - 1), k))
    assert seen == set(range(10))


def test_word_repetition_paper_formula():
    short = [CLS, 5, 6, 7, SEP]  # paper: dup_len ~ U[0, max(2, int(0.32 * 5))] = U{0, 1, 2}
    counts = {len(E.word_repetition(short, 0.32, random.Random(s), paper_formula=True)) - 5 for s in range(200)}
    assert counts == {0, 1, 2}
    tiny = [CLS, 5, SEP]  # never more repetitions than maskable positions
    assert all(len(E.word_repetition(tiny, 0.32, random.Random(s), paper_formula=True)) <= 4 for s in range(50))
    assert E.word_repetition([CLS, SEP], 0.32, random.Random(0), paper_formula=True) == [CLS, SEP]


def test_word_level_repetition():
    for s in range(100):
        out = E.word_level_repetition("a man is playing guitar", 0.32, random.Random(s)).split(" ")
        assert out[-1] == "guitar" and out.count("guitar") == 1  # the last word is never chosen
        assert list(dict.fromkeys(out)) == "a man is playing guitar".split()
        assert len(out) - 5 <= 1  # randrange(min(10, 5, max(2, int(1.6)))) = randrange(2)
    assert E.word_level_repetition("hello", 0.32, random.Random(0)) == "hello"


def test_collate_pads_both_views_to_one_length():
    ids, mask = E.collate([([1, 2, 3], [1, 2, 2, 3]), ([1, 4], [1, 4])], pad_id=0)
    assert ids.shape == mask.shape == (2, 2, 4)
    assert ids[0, 0].tolist() == [1, 2, 3, 0] and mask[0, 0].tolist() == [1, 1, 1, 0]
    assert ids[1, 1].tolist() == [1, 4, 0, 0] and mask[1, 1].sum() == 2


def test_esimcse_loss_worked_example():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[-1.0, 0.0]])
    loss = E.esimcse_loss(z, z, q, temp=1.0)  # rows [1, 0, -1] and [0, 1, 0], targets 0 and 1
    rows = [math.log(math.e + 1 + math.exp(-1)) - 1, math.log(2 + math.e) - 1]
    assert abs(rows[0] - 0.40761) < 1e-5 and abs(rows[1] - 0.55144) < 1e-5
    assert abs(loss.item() - 0.47953) < 1e-5
    assert E.esimcse_loss(z, z, q, temp=0.05).item() < 1e-8  # ~3e-9
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    plain = F.cross_entropy(F.normalize(z1) @ F.normalize(z2).T / 0.05, torch.arange(6))
    for empty in (None, torch.empty(0, 8)):  # empty queue = SimCSE's in-batch InfoNCE
        assert torch.allclose(E.esimcse_loss(z1, z2, empty), plain)
    # the queue only adds negatives: the loss grows with it, and the scale of embeddings does not matter (cosine)
    assert E.esimcse_loss(z1, z2, torch.randn(10, 8)) > plain
    assert torch.allclose(E.esimcse_loss(3 * z1, 0.5 * z2), plain)
    # per-rank rows with an offset into the global positives average to the full-batch loss
    halves = [E.esimcse_loss(z1[i:i + 3], z2, None, offset=i) for i in (0, 3)]
    assert torch.allclose(sum(halves) / 2, plain)


def test_esimcse_loss_is_fp32_inside_autocast():
    # logits at 1/tau = 20: a bf16 matmul inside autocast would move them by ~0.1; the loss opts out of autocast
    torch.manual_seed(0)
    z1, z2, q = (torch.randn(16, 64).bfloat16() for _ in range(3))
    ref = E.esimcse_loss(z1.float(), z2.float(), q.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = E.esimcse_loss(z1, z2, q)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_queue_fifo():
    q = E.EmbeddingQueue(3)
    assert len(q) == 0 and q.get() is None
    a, b, c, d = (torch.full((1, 2), float(v)) for v in range(4))
    q.enqueue(torch.cat([a, b]))
    q.enqueue(torch.cat([c, d]))
    assert len(q) == 3 and torch.equal(q.get(), torch.cat([b, c, d]))  # oldest dropped first
    x = torch.ones(1, 2, requires_grad=True)
    q.enqueue(x * 2)
    assert not q.get().requires_grad  # no gradient through the queue
    state = q.state_dict()
    q2 = E.EmbeddingQueue(3)
    q2.load_state_dict(state)
    assert torch.equal(q2.get(), q.get())
    q.reset()
    assert len(q) == 0
    q0 = E.EmbeddingQueue(0)  # --queue-size 0 = SimCSE
    q0.enqueue(torch.ones(4, 2))
    assert len(q0) == 0 and q0.get() is None


def test_momentum_update():
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.ones_(online.weight), torch.nn.init.zeros_(target.weight)
    common.ema_update_(target, online, 0.995)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.005))
    for _ in range(9):
        common.ema_update_(target, online, 0.995)
    assert torch.allclose(target.weight, torch.full((2, 2), 1 - 0.995 ** 10))


def test_spearman():
    assert abs(E.spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12
    assert abs(E.spearman([1, 1, 2], [1, 2, 3]) - 0.8660254) < 1e-6  # ties get average ranks (= scipy)
    assert E.rank_average([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert abs(E.spearman([1, 2, 3], [30, 20, 10]) + 1) < 1e-12
    assert E.spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_synthetic_pairs_gold_by_construction():
    s1, s2, gold = E.synthetic_pairs(200, seed=5)
    assert (s1, s2, gold) == E.synthetic_pairs(200, seed=5)
    assert set(gold) == {0.0, 1.25, 2.5, 3.75, 5.0}
    assert len({len(s.split()) for s in s1}) > 10  # lengths vary
    assert all(s.endswith(" .") for s in s1 + s2)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _stsb_dir(root):
    rows = ["main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.",
            "main-news\theadlines\t2016\t0012\t4\tDriver backs into stroller\tDriver backs off\tsrc1\tsrc2",
            "main-captions\tMSRvid\t2012test\t0005\t0.500\tA man plays a flute.\tA dog runs on grass."]
    for split in ("dev", "test"):
        _write(os.path.join(root, f"sts-{split}.csv"), rows)
    return root


def test_load_sts_formats(tmp_path):
    s1, s2, gold = E.load_sts(os.path.join(_stsb_dir(str(tmp_path / "stsb")), "sts-dev.csv"), "stsb")
    assert gold == [5.0, 4.0, 0.5] and s1[1] == "Driver backs into stroller" and s2[2] == "A dog runs on grass."
    sick = str(tmp_path / "SICK_test_annotated.txt")
    _write(sick, ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment",
                  "6\tThere is no boy playing\tA boy is playing\t3.3\tCONTRADICTION",
                  "7\tA man is cooking\tA man cooks\t4.9\tENTAILMENT"])
    assert E.load_sts(sick, "sick") == (["There is no boy playing", "A man is cooking"],
                                        ["A boy is playing", "A man cooks"], [3.3, 4.9])
    year = str(tmp_path / "STS13-en-test")
    for k, sub in enumerate(E.STS_SUBSETS["STS13"]):
        _write(os.path.join(year, f"STS.input.{sub}.txt"), [f"a {sub}\tb {sub}", "c\td"])
        _write(os.path.join(year, f"STS.gs.{sub}.txt"), [str(k), ""])  # empty gold: pair dropped (SentEval)
    s1, s2, gold = E.load_sts(year, "sts_year_dir")  # "all" setting: subsets concatenated
    assert gold == [0.0, 1.0, 2.0] and s1 == ["a FNWN", "a headlines", "a OnWN"]


# --- 2. a --tiny run learns, exports a transformers model, and --eval-only reproduces it ---
def test_tiny_run_learns_and_exports(tmp_path):
    out = str(tmp_path / "tiny")
    run_script("esimcse.py", "--tiny", "--output-dir", out, threads=1)
    m = read_metrics(out)
    assert list(m)[0] == "sts_avg"
    assert m["sts_avg"] > m["sts_avg_init"] + 5, m  # random init ~67, trained ~83 (Spearman x 100)
    assert any("dev" in r for r in read_log(out)) and "eval" in read_log(out)[-1]
    from transformers import AutoModel, AutoTokenizer
    model, tok = AutoModel.from_pretrained(os.path.join(out, "encoder")), AutoTokenizer.from_pretrained(
        os.path.join(out, "encoder"))
    best = load_ckpt(out)["best"]
    assert best["step"] > 0
    assert_tensors_close(model.state_dict(), best["encoder"])  # the export is the model kept by dev selection
    b = tok(["a man cuts bread .", "she paints it ."], padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model(**b).last_hidden_state[:, 0]
    assert torch.allclose(cls, E.encode(model, tok, ["a man cuts bread .", "she paints it ."],
                                        torch.device("cpu")), atol=1e-5)
    E.main(["--tiny", "--eval-only", "--output-dir", out])
    assert abs(read_metrics(out)["sts_avg"] - m["sts_avg"]) < 1e-6


# --- 3. two processes == one process with the same global batch ---
def test_torchrun_matches_single_process(tmp_path):
    # dropout 0: dropout masks depend on each process's RNG stream, so only word repetition (seeded per sample)
    # may differ between the views; then both layouts must compute the same numbers.
    args = ["--tiny", "--max-steps", "3", "--log-every", "1", "--dropout", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("esimcse.py", *args, "--batch-size", "16", "--output-dir", one, threads=1)
    run_torchrun("esimcse.py", *args, "--batch-size", "8", "--output-dir", two, nproc=2)
    la = [r["loss"] for r in read_log(one) if "loss" in r]
    lb = [r["loss"] for r in read_log(two) if "loss" in r]
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-5 * abs(x), (la, lb)
    a, b = load_ckpt(one), load_ckpt(two)
    assert a["queue"]["buf"].shape == (48, 128)  # 3 global batches of 16 gathered keys
    assert_tensors_close(a["queue"], b["queue"], atol=1e-5)
    assert_tensors_close(a["momentum_model"], b["momentum_model"], atol=1e-5)
    # Adam divides by sqrt(v): rounding differences in near-zero gradients move a weight by up to ~lr (2e-3)
    assert_tensors_close(a["model"], b["model"], atol=2e-3)


# --- 4. exact resume ---
def test_resume_is_exact(tmp_path):
    args = ["--tiny", "--eval-steps", "2", "--log-every", "1"]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    run_script("esimcse.py", *args, "--max-steps", "6", "--output-dir", full, threads=1)
    run_script("esimcse.py", *args, "--max-steps", "3", "--output-dir", half, threads=1)
    p = run_script("esimcse.py", *args, "--max-steps", "6", "--output-dir", half, threads=1)
    assert "resumed" in p.stdout
    a, b = load_ckpt(full), load_ckpt(half)
    assert a["step"] == b["step"] == 6
    for k in ("model", "momentum_model", "queue", "optimizer", "best"):
        assert_tensors_close(a[k], b[k], path=k)
    assert [r.get("loss") for r in read_log(full) if "loss" in r][3:] == \
           [r.get("loss") for r in read_log(half) if "loss" in r][3:]


# --- 5. bad input: one-line errors, non-zero exit, the last good checkpoint untouched ---
def _fails(argv, *needles):
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error:") and all(n in msg for n in needles), msg


def test_bad_input(tmp_path):
    d = str(tmp_path)
    _fails(["--tiny", "--data", f"{d}/nope.txt", "--output-dir", f"{d}/o"], "does not exist")
    _fails(["--tiny", "--data", d, "--output-dir", f"{d}/o"], "is a folder")
    _write(f"{d}/empty.txt", ["", "  "])
    _fails(["--tiny", "--data", f"{d}/empty.txt", "--output-dir", f"{d}/o"], "holds no sentences")
    with open(f"{d}/latin1.txt", "wb") as f:
        f.write(b"a sentence\nanother one\ncaf\xe9 au lait\n")
    _fails(["--tiny", "--data", f"{d}/latin1.txt", "--output-dir", f"{d}/o"], "line 3", "UTF-8")
    _fails(["--tiny", "--queue-size", "-1", "--output-dir", f"{d}/o"], "--queue-size")
    stsb = _stsb_dir(f"{d}/stsb")
    os.remove(f"{stsb}/sts-test.csv")
    _fails(["--tiny", "--stsb-path", stsb, "--output-dir", f"{d}/o"], "sts-test.csv")
    _write(f"{stsb}/sts-test.csv", ["genre\tfile\tyear\t0001\t5.0\tonly one sentence"])
    _fails(["--tiny", "--stsb-path", stsb, "--output-dir", f"{d}/o"], "sts-test.csv line 1", "columns")
    _write(f"{stsb}/sts-test.csv", ["a\tb\tc\td\tfive\ts1\ts2"])
    _fails(["--tiny", "--stsb-path", stsb, "--output-dir", f"{d}/o"], "line 1", "not a number")
    _fails(["--tiny", "--sts-dir", f"{d}/nosts", "--output-dir", f"{d}/o"], "STS12-en-test", "does not exist")

    # a checkpoint from another method, of another shape, and a NaN loss leave the checkpoint untouched
    out = f"{d}/run"
    os.makedirs(out)
    common.save_checkpoint(f"{out}/checkpoint.pt", "swav", 0, {})
    _fails(["--tiny", "--output-dir", out], "'swav', not 'esimcse'")
    shutil.rmtree(out)
    run_script("esimcse.py", "--tiny", "--max-steps", "2", "--output-dir", out, threads=1)
    with open(f"{out}/checkpoint.pt", "rb") as f:
        good = f.read()
    _fails(["--tiny", "--queue-size", "64", "--output-dir", out], "queue size 160")
    p = run_script("esimcse.py", "--tiny", "--max-steps", "6", "--lr", "1e30", "--log-every", "1",
                   "--output-dir", out, check=False, threads=1)
    assert p.returncode != 0 and "error: loss is nan" in p.stdout, p.stdout[-2000:]
    with open(f"{out}/checkpoint.pt", "rb") as f:
        assert f.read() == good


def test_check_args():
    ok = E.get_args(["--data", "wiki1m_for_simcse.txt", "--model", "bert-base-uncased", "--batch-size", "8"])
    E.check_args(ok, 8)  # the README's 8-GPU line: global batch 64, queue 160 = 2.5 x
    for argv, needle in ((["--queue-size", "-1"], "--queue-size"), (["--eval-steps", "-1"], "--eval-steps"),
                         (["--dup-type", "word", "--paper-formula"], "--paper-formula"), (["--temp", "0"], "--temp")):
        with pytest.raises(SystemExit, match=needle):
            E.check_args(E.get_args(argv), 1)


# --- 6. the pretrained path: a save_pretrained folder trains with dropout on; momentum encoder start ---
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pretrained_path_trains_with_dropout(tmp_path, kind):
    path = (save_tiny_bert if kind == "bert" else save_tiny_roberta)(str(tmp_path / kind))
    out = str(tmp_path / "out")
    init = "random" if kind == "bert" else "copy"
    with DropoutRecorder() as rec:
        run_main_inprocess(E, ["--tiny", "--model", path, "--max-steps", "2", "--eval-steps", "1",
                               "--momentum-init", init, "--output-dir", out])
    train = rec.training_calls()
    assert train and all(t for _, t in train), "a dropout module ran in eval mode during the training forward"
    # embedding dropout + attention-output and FFN-output dropout of each of the 2 layers
    assert len({id(m) for m, _ in train}) >= 5
    assert all(not t for _, t, g in rec.calls if not g)  # momentum encoder and evaluation: dropout off (official)
    assert read_metrics(out)["best_step"] in (1, 2)
    ck = load_ckpt(out)
    from transformers import AutoModel
    pre = AutoModel.from_pretrained(path).state_dict()
    key = "embeddings.word_embeddings.weight"
    # after 2 EMA steps at 0.995 the momentum encoder is 99% its start: a random draw, or the pretrained weights
    close = torch.allclose(ck["momentum_model"][key], pre[key], atol=1e-3 * pre[key].abs().max().item())
    assert close == (init == "copy")


# --- 7. bf16 and compile on CPU; evaluation in fp32; --eval-steps 0 ---
def test_bf16_training_and_fp32_evaluation(tmp_path):
    calls = []  # (online encoder?, training, autocast on) for every encoder forward

    def hook(module, inputs):
        if type(module).__name__ == "BertModel":
            calls.append((next(module.parameters()).requires_grad, module.training, torch.is_autocast_enabled("cpu")))
    h = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        run_main_inprocess(E, ["--tiny", "--amp", "bf16", "--max-steps", "3", "--eval-steps", "2",
                               "--log-every", "1", "--output-dir", str(tmp_path)])
    finally:
        h.remove()
    online_train = [a for o, t, a in calls if o and t]
    evaluation = [a for o, t, a in calls if o and not t]
    momentum = [a for o, t, a in calls if not o]
    assert len(online_train) == len(momentum) == 3 and all(online_train) and all(momentum)  # bf16 in training
    assert evaluation and not any(evaluation)  # evaluation without autocast (official: fp32)
    assert all(math.isfinite(r["loss"]) for r in read_log(str(tmp_path)) if "loss" in r)


def test_compile_aot_eager_without_graph_breaks_or_recompiles(tmp_path):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    steps = 4  # batches of different lengths
    run_main_inprocess(E, ["--tiny", "--compile", "aot_eager", "--max-steps", steps, "--eval-steps", "0",
                           "--log-every", "1", "--output-dir", str(tmp_path)])
    breaks = sum(counters["graph_break"].values())
    frames = counters["stats"]["unique_graphs"]
    print(f"graph breaks {breaks}, unique graphs {frames}, stats {dict(counters['stats'])}")
    assert breaks == 0, dict(counters["graph_break"])
    assert frames <= 1, dict(counters["stats"])  # one graph for every length: no recompilation per batch
    m = read_metrics(str(tmp_path))
    assert "best_dev" not in m and math.isfinite(m["sts_avg"])  # --eval-steps 0: no selection, the last model


# --- 3b. gradients of two processes == one process with the same global batch ---
GLOBAL_B = 16


def _grad_step(rank, world, B):
    """One real train_step on rows [rank*B, (rank+1)*B) of a fixed global batch; returns grads, loss, queue."""
    torch.set_num_threads(1)
    args = E.get_args(["--tiny", "--dropout", "0", "--clip-grad", "1e9", "--batch-size", str(B)])
    sentences = E.synthetic_sentences(256, seed=0)
    common.seed_everything(0)
    encoder, tok = E.build_encoder(args, sentences)
    momentum = common.momentum_copy(type(encoder)(encoder.config)).eval()
    encoder.train()
    queue = E.EmbeddingQueue(args.queue_size)
    queue.enqueue(torch.randn(20, encoder.config.hidden_size, generator=torch.Generator().manual_seed(1)))
    ds = E.SentenceDataset(sentences, tok, args)
    ids, mask = E.collate([ds[(i, 1000 + i)] for i in range(rank * B, (rank + 1) * B)], tok.pad_token_id)
    L = max(len(v) for i in range(GLOBAL_B) for v in ds[(i, 1000 + i)])
    ids = F.pad(ids, (0, L - ids.shape[-1]), value=tok.pad_token_id)  # the common padded length of the global batch
    mask = F.pad(mask, (0, L - mask.shape[-1]))
    opt = torch.optim.SGD(encoder.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = common.distribute(encoder, torch.device("cpu"))
    loss = E.train_step(model, encoder, momentum, queue, opt, scaler, ids, mask, args, rank, torch.device("cpu"))
    return {"grads": {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None},
            "loss": loss, "queue": queue.get().clone()}


def _grad_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_grad_step(rank, world, GLOBAL_B // world), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gradients_match_one_process():
    one = _grad_step(0, 1, GLOBAL_B)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_grad_worker, args=(2, f"{d}/init", d), nprocs=2, join=True)
        two = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    assert len(one["grads"]) > 10
    for r in range(2):  # DDP all-reduces: every rank holds the gradient of the global-batch loss
        g1 = torch.cat([g.flatten() for g in one["grads"].values()])
        g2 = torch.cat([two[r]["grads"][n].flatten() for n in one["grads"]])
        err = ((g2 - g1).norm() / g1.norm()).item()
        assert err < 1e-4, f"rank {r}: relative gradient error {err:.3g}, scale {(g2 @ g1 / (g1 @ g1)).item():.4f}"
        assert torch.allclose(two[r]["queue"], one["queue"], atol=1e-5)  # gathered keys in rank order
    assert abs((two[0]["loss"] + two[1]["loss"]) / 2 - one["loss"]) < 1e-4  # mean of per-rank losses
