"""Tests for cocosoda.py: hand-computed worked examples, the official SoDa quirks, the pretrained path with
dropout on, a --tiny run that learns, two processes = one process (gradients), bf16 and compile, exact resume,
bad input. Mechanics tests use a small CodeSearchNet-format folder written here (fast, and it exercises the
real-data reader); only the --tiny run builds the standard-library corpus."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import cocosoda as cs
import common
import helpers
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_torchrun)


def run_script(*args, **kw):
    """helpers.run_script with one thread: on a shared, oversubscribed CPU two OpenMP threads spin-wait for
    each other and a step can take 10x longer; one thread is as fast on a quiet machine at this model size."""
    return helpers.run_script(*args, threads=1, **kw)

OPS = [("+", "add"), ("-", "subtract"), ("*", "multiply"), ("//", "divide")]


def _example(i):
    op, word = OPS[i % 4]
    return {"url": f"https://example.org/f{i}", "language": "python",
            "code_tokens": ["def", f"f{i}", "(", "x", ")", ":", "return", "x", op, str(i)],
            "docstring_tokens": [word, "x", "and", str(i)]}


def write_csn(root, n_train=64, n_test=16):
    """<root>/python/{train,test,codebase}.jsonl in the CodeSearchNet format of the official preprocess.py."""
    os.makedirs(os.path.join(root, "python"), exist_ok=True)
    files = {"train": range(n_train), "test": range(1000, 1000 + n_test), "codebase": range(1000, 1000 + n_test)}
    for name, idx in files.items():
        with open(os.path.join(root, "python", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(_example(i)) + "\n" for i in idx)
    return root


@pytest.fixture(scope="module")
def csn(tmp_path_factory):
    return write_csn(str(tmp_path_factory.mktemp("csn")))


SMALL = ["--tiny", "--pretrain-langs", "python", "--batch-size", "16"]  # + --data <csn>


# --- 1. worked examples and properties ---
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
Q = torch.tensor([[-1.0], [0.0]])  # (d, K) = (2, 1)


def test_moco_logits_worked_example():
    logits, labels = cs.moco_logits(A, A, Q, t=1.0)
    assert torch.allclose(logits, torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    rows = nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(rows, torch.tensor([0.40761, 0.55144]), atol=1e-5)
    assert abs(rows.mean().item() - 0.47953) < 1e-5
    assert nn.functional.cross_entropy(*cs.moco_logits(A, A, Q, t=0.05)).item() < 1e-8  # ~3e-9
    empty = torch.zeros(2, 0)  # empty queue: in-batch InfoNCE
    inbatch = nn.functional.cross_entropy(A @ A.T, torch.arange(2))
    assert torch.allclose(nn.functional.cross_entropy(*cs.moco_logits(A, A, empty, t=1.0)), inbatch)
    assert torch.equal(cs.moco_logits(A, A, Q, 1.0, offset=4)[1], torch.tensor([4, 5]))


def test_cocosoda_loss_worked_example_and_queue_matters():
    queues = {k: Q for k in cs.QUEUES}
    for intra in (False, True):
        loss = cs.cocosoda_loss(A, A, A, A, queues, t=1.0, scale=1.0, intra=intra)
        assert abs(loss.item() - 0.47953) < 1e-5
    # temperature and scale enter only as scale / t (official: 20 * logits / 0.07)
    a = cs.cocosoda_loss(A, A, A, A, queues, t=0.07, scale=20.0)
    b = cs.cocosoda_loss(A, A, A, A, queues, t=0.07 / 20, scale=1.0)
    assert torch.allclose(a, b)
    # the queues are used (the pre-2f2bf8e bug silently dropped them)
    closer = {k: torch.tensor([[0.9], [0.1]]) for k in cs.QUEUES}
    assert cs.cocosoda_loss(A, A, A, A, closer, 1.0, 1.0).item() > 0.6
    # gradient flows into both online sides (c -> n uses online n), not into the momentum keys
    c, n, ck = A.clone().requires_grad_(), A.clone().requires_grad_(), A.clone().requires_grad_()
    cs.cocosoda_loss(c, n, ck, A, closer, 1.0, 1.0).backward()
    assert c.grad.abs().sum() > 0 and n.grad.abs().sum() > 0 and ck.grad is None
    ft = cs.finetune_loss(A, A, scale=1.0)
    assert torch.allclose(ft, nn.functional.cross_entropy(A @ A.T, torch.arange(2)))


def test_ema_and_ring_queue():
    online, target = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    online.weight.data.fill_(1.0)
    target.weight.data.fill_(0.0)
    common.ema_update_(target, online, 0.999)
    assert abs(target.weight.item() - 0.001) < 1e-7
    q = cs.Queue(3, 4)
    assert torch.allclose(q.tensor.norm(dim=0), torch.ones(4))  # normalised noise
    ptrs = []
    for v in (1.0, 2.0, 3.0):
        q.enqueue(torch.full((2, 3), v))
        ptrs.append(int(q.ptr))
    assert ptrs == [2, 0, 2]
    assert torch.equal(q.tensor[0], torch.tensor([3.0, 3.0, 2.0, 2.0]))  # third enqueue overwrote columns 0-1
    with pytest.raises(AssertionError):
        q.enqueue(torch.zeros(3, 3))


E, M, ID, OP, NUM = 5, 4, 20, 21, 22
IDS = torch.tensor([[0, E, 2, 10, 11, 12, 13, 2, 1, 1]])
TYPES = torch.tensor([[0, E, 2, ID, OP, ID, NUM, 2, 1, 1]])
EDGES = torch.tensor([[True] * 3 + [False] * 4 + [True] * 3])  # prefix, </s>, pads


def test_soft_augment_worked_examples():
    only_4_6 = torch.ones(1, 10, dtype=torch.bool)
    only_4_6[0, [4, 6]] = False  # selection fixed at {4, 6}
    def aug(op, prot, **kw):
        return cs.soft_augment(IDS, TYPES, 1.0, op, M, prot, replace_prob=1.0, **kw)

    assert aug("mask", only_4_6).tolist() == [[0, E, 2, 10, M, 12, M, 2, 1, 1]]
    assert aug("replace_type", only_4_6).tolist() == [[0, E, 2, 10, OP, 12, NUM, 2, 1, 1]]
    assert aug("mask_type", EDGES, target_type=ID).tolist() == [[0, E, 2, M, 11, M, 13, 2, 1, 1]]
    assert aug("replace_type_specified", EDGES, target_type=ID).tolist() == [[0, E, 2, ID, 11, ID, 13, 2, 1, 1]]
    assert aug("mask", EDGES).tolist() == [[0, E, 2, M, M, M, M, 2, 1, 1]]  # p = 1, no 80/10/10 split
    for op in cs.SODA_CYCLE:
        assert torch.equal(cs.soft_augment(IDS, TYPES, 0.0, op, M, EDGES, target_type=ID), IDS)  # p = 0
    # with the 80/10/10 split: protected positions never change, the input is not modified in place
    ids, g = IDS.repeat(200, 1), torch.Generator().manual_seed(0)
    before = ids.clone()
    out = cs.soft_augment(ids, TYPES.repeat(200, 1), 0.5, "mask", M, EDGES.repeat(200, 1), g, vocab_size=30)
    assert torch.equal(ids, before) and torch.equal(out[:, [0, 1, 2, 7, 8, 9]], ids[:, [0, 1, 2, 7, 8, 9]])
    changed = (out != ids)[:, 3:7].float().mean().item()
    assert 0.35 < changed < 0.55  # 0.5 selected, of which 80% masked + ~5% random (some random = same token)


def test_soda_schedule():
    # official loop counts from 1: count % 4 == 0 -> DM, 1 -> DR, 2 -> DRST, 3 -> DMST
    assert [cs.soda_op(s, "paper")[0] for s in range(4)] == ["replace_type", "replace_type_specified",
                                                             "mask_type", "mask"]
    assert cs.soda_op(1, "paper")[1] in cs.TYPES[:6] and cs.soda_op(1, "paper") == cs.soda_op(1, "paper")
    # released code: DR and DRST replace tokens by themselves; DMST masks a type name (a special token)
    assert [cs.soda_op(s, "official")[0] for s in range(8)] == [None, None, "mask_type", "mask"] * 2
    assert {cs.soda_op(s, "official")[1] for s in range(2, 400, 4)} <= set(cs.OFFICIAL_TYPES)
    assert cs.get_args([]).soda_mode == "official" and not cs.get_args([]).intra  # run_cocosoda.sh together


def test_official_dm_protects_special_ids_and_dmst_masks_type_names():
    tok = cs.WordTokenizer.build([{"code_tokens": ["get", "value", "get", "value"], "docstring_tokens": []}])
    # a piece equal to a type name becomes that special token, as the BPE tokenizer splits it out of the text
    ids, _ = cs.Corpus(tok, [["def", "get_name", "(", ")", ":", "return", '"', "value", '"']], 16)[0]
    name, quote = tok.name_ids["name"], tok.name_ids['"']
    assert name in ids.tolist() and quote in ids.tolist() and tok.unk_id in ids.tolist()
    # DM at p = 1 without the 80/10/10 split: every id except the prefix and the special ids is masked
    prot = cs.protected_mask(ids, tok)
    dm = cs.soft_augment(ids, None, 1.0, "mask", tok.mask_id, prot, replace_prob=1.0)
    special = torch.isin(ids, torch.tensor([tok.unk_id, tok.mask_id, name, quote, tok.type_ids["identifier"]]))
    assert torch.equal(dm[special], ids[special]) and torch.equal(dm[:3], ids[:3])
    assert ((dm == tok.mask_id) == ~prot).all() and (~prot).sum() == 2  # "get", "value" (the rest is <unk>)
    # released DMST: the ids are their own type table; the drawn name is masked where it occurs
    dmst = cs.soft_augment(ids, ids, 1.0, "mask_type", tok.mask_id, cs.prefix_mask(ids), target_type=name,
                           replace_prob=1.0)
    assert torch.equal(dmst == tok.mask_id, ids == name)


def test_language_sampler_one_language_per_batch():
    sizes, total = [40, 200, 10], 600
    one = cs.LanguageSampler(sizes, 4, total, seed=1, alpha=0.7, rank=0, world=1)
    two = [cs.LanguageSampler(sizes, 2, total, seed=1, alpha=0.7, rank=r, world=2) for r in range(2)]
    a, b0, b1 = list(one), list(two[0]), list(two[1])
    langs = []
    for step in range(total):  # rank slices make the one-process batch; the whole batch is one language
        batch = a[4 * step:4 * step + 4]
        assert batch == b0[2 * step:2 * step + 2] + b1[2 * step:2 * step + 2] and {k[2] for k in batch} == {step}
        owner = {next(i for i, off in reversed(list(enumerate(one.offsets))) if k[0] >= off) for k in batch}
        assert len(owner) == 1
        langs.append(owner.pop())
    q = torch.tensor([n / 250 for n in sizes]) ** 0.7
    freq = torch.bincount(torch.tensor(langs), minlength=3) / total
    assert torch.allclose(freq, q / q.sum(), atol=0.05)  # official (n_i/N)^0.7, renormalised
    one.start = 123  # resume mid-run: the same batches from that step on
    assert list(one) == a[4 * 123:]


def test_token_types_of_other_languages():
    assert cs.token_types(["func", "x", "chan", ":=", "0x1F"], "go") == ["keyword", "identifier", "keyword",
                                                                         "operator", "number"]
    assert cs.token_types(["public", "void", "f", "(", ")", "10L", "//", "&&"], "java") == [
        "keyword", "keyword", "identifier", "separator", "separator", "number", "comment", "operator"]
    assert cs.token_types(["$x", "echo", "=>", "'a'"], "php") == ["identifier", "keyword", "separator", "string"]
    assert cs.token_types(["@name", "unless", "empty?", "end"], "ruby") == ["identifier", "keyword", "identifier",
                                                                            "keyword"]
    assert cs.token_types(["function", "let", "`t`", "==="], "javascript") == ["keyword", "keyword", "string",
                                                                               "operator"]
    assert cs.token_types(["func"], "python") == ["identifier"]  # a keyword of Go only


def test_token_types_alignment_and_pooling():
    toks = ["def", "getValue", "(", "x", ")", ":", "return", "x", "+", "1.5", "'s'", "->"]
    types = cs.token_types(toks, "python")
    assert types == ["keyword", "identifier", "separator", "identifier", "separator", "separator", "keyword",
                     "identifier", "operator", "number", "string", "separator"]
    tok = cs.WordTokenizer(cs.WordTokenizer.SPECIALS + ["def", "get", "value", "(", ")", "x"])
    corpus = cs.Corpus(tok, [toks[:5]], 12, "python")
    ids, type_ids = corpus[0]
    assert list(corpus.ids) == ids.tolist()[3:9] and corpus.ids.itemsize == 2  # stored: the pieces, 2 bytes each
    kw, ident, sep = (tok.type_ids[t] for t in ("keyword", "identifier", "separator"))
    assert ids.tolist()[:10] == [0, tok.enc_id, 2] + [tok.index[w] for w in ["def", "get", "value", "(", "x", ")"]] + [2]
    assert type_ids.tolist()[3:9] == [kw, ident, ident, sep, ident, sep]  # both pieces of getValue: identifier
    assert ids.tolist()[10:] == [1, 1]
    prot = cs.protected_mask(ids[None], tok)[0]
    assert prot.tolist() == [True] * 3 + [False] * 6 + [True] * 3
    h, mask = torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[True, True, False]])
    assert cs.mean_pool(h, mask).tolist() == [[2.0]]


def test_pretrained_path_adds_type_tokens(tmp_path):
    """--model-name with a BPE tokenizer + RobertaModel on disk (a toy one written here, as UniXcoder's would be):
    <encoder-only> and the type tokens are added, embeddings resized, BPE pieces inherit their word's type."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    d = str(tmp_path / "toy")
    os.makedirs(d)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "d", "e", "f", "de", "def", "g",
                                         "t", "et", "get", "Ġget", "Ġ", "x", "Ġx", "(", "Ġ("])}
    json.dump(vocab, open(os.path.join(d, "vocab.json"), "w"))
    open(os.path.join(d, "merges.txt"), "w").write("#version: 0.2\nd e\nde f\ne t\ng et\nĠ get\nĠ x\nĠ (\n")
    RobertaTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")).save_pretrained(d)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(d)
    args = cs.get_args(["--model-name", d, "--code-len", "12", "--nl-len", "12"])
    tok, enc = cs.build_encoder(args, [])
    assert isinstance(tok, cs.HFTokenizer) and tok.vocab_size == len(vocab) + 1 + len(cs.TYPES) + len(cs.OFFICIAL_TYPES)
    assert enc.backbone.get_input_embeddings().weight.shape[0] == tok.vocab_size
    ids, types = cs.Corpus(tok, [["def", "get", "(", "x"]], 12, "python")[0]  # keyword, identifier, separator, identifier
    assert ids.tolist()[:8] == [0, tok.enc_id, 2, vocab["def"], vocab["Ġget"], vocab["Ġ("], vocab["Ġx"], 2]
    assert types.tolist()[3:7] == [tok.type_ids[t] for t in ("keyword", "identifier", "separator", "identifier")]
    assert enc.encode(ids[None]).norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_mrr_worked_example():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.8], [0.4, 0.6, 0.1]])
    gold = torch.tensor([0, 1, 2])
    sums = cs.rank_sums(scores, gold)  # ranks 1, 2, 3: MRR (1 + 1/2 + 1/3) / 3 = 0.6111, hits at 1, 5, 10
    assert torch.allclose(sums, torch.tensor([1 + 1 / 2 + 1 / 3, 1, 3, 3], dtype=torch.float64))
    assert cs.rank_sums(scores, gold, topk=2)[0].item() == pytest.approx(1.5)  # top-1000 rule: beyond topk counts 0


# --- 2. the pretrained path: trains with dropout on, the momentum encoder too (official) ---
@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return helpers.save_tiny_roberta(str(tmp_path_factory.mktemp("roberta")))


FAST = ["--pretrain-langs", "python", "--batch-size", "16", "--queue-size", "32", "--code-len", "32", "--nl-len", "16",
        "--workers", "0", "--momentum", "0.99", "--lr", "1e-3"]  # + --data <csn>; no --tiny: no evaluation first


def test_pretrained_path_trains_with_dropout(tmp_path, csn, tiny_roberta):
    with DropoutRecorder() as rec:
        run_main_inprocess(cs, ["--model-name", tiny_roberta, "--data", csn, *FAST, "--max-steps", "2",
                                "--output-dir", tmp_path / "out"])
    online = rec.training_calls()
    momentum = [(m, t) for m, t, g in rec.calls if not g and t]  # no-grad calls in train mode: the keys
    assert online and all(t for _, t in online), "online encoder trained with dropout off"
    assert len(momentum) == len(online), "momentum encoder not in train mode (official: dropout in the keys)"
    assert {m for m, _ in online}.isdisjoint(m for m, _ in momentum)  # two encoders, each with its dropout
    assert os.path.isfile(tmp_path / "out" / "metrics.json")
    tok = cs.HFTokenizer(tiny_roberta)  # the type names are split out of the code text (official tokenizer)
    assert tok.name_ids["name"] in tok(["get", "filename"], 20)[0]


# --- 3. --tiny learns on held-out standard-library functions; the fine-tuning stage runs from its export ---
def test_tiny_learns_and_finetune_stage(tmp_path, csn):
    out = str(tmp_path / "tiny")
    p = run_script("cocosoda.py", "--tiny", "--output-dir", out, timeout=280)
    m = read_metrics(out)
    assert list(m)[0] == "mrr" and {"r@1", "r@5", "r@10", "mrr_init"} <= set(m)
    assert m["mrr"] > m["mrr_init"] + 0.08, p.stdout[-2000:]
    assert "mrr_init" in p.stdout and os.path.isfile(os.path.join(out, "encoder", cs.WordTokenizer.FILE))
    ft = str(tmp_path / "ft")
    run_main_inprocess(cs, ["--tiny", "--mode", "finetune", "--data", csn, "--model-name", os.path.join(out, "encoder"),
                            "--batch-size", "16", "--epochs", "2", "--output-dir", ft])
    assert "momentum_model" not in load_ckpt(ft) and math.isfinite(read_metrics(ft)["mrr"])
    assert load_ckpt(ft)["step"] == 8  # 2 epochs of 64 pairs / 16


def test_finetune_validates_at_epoch_ends(tmp_path, csn):
    data = str(tmp_path / "csn")
    shutil.copytree(csn, data)
    shutil.copy(os.path.join(data, "python", "test.jsonl"), os.path.join(data, "python", "valid.jsonl"))
    out = str(tmp_path / "ft")
    run_main_inprocess(cs, ["--mode", "finetune", "--data", data, "--from-scratch", "--hidden-size", "16",
                            "--num-layers", "1", "--num-heads", "2", *FAST, "--epochs", "2", "--eval-steps", "1",
                            "--output-dir", out])
    assert [r["step"] for r in read_log(out) if "valid_mrr" in r] == [4, 8]  # not every --eval-steps
    assert os.path.isfile(os.path.join(out, "best.pt"))


# --- 4. two processes agree with one process holding the same global batch: loss, GRADIENTS, queues ---
def _grad_worker(rank, world, init, csn, out):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    args = cs.get_args(["--tiny", "--data", csn, "--pretrain-langs", "python", "--dropout", "0",
                        "--batch-size", str(16 // world), "--soda-mode", "paper"])
    parts, pools = cs.load_data(args)
    common.seed_everything(args.seed)
    tok, model = cs.build_encoder(args, parts[0][1])
    parts, _ = cs.tokenise(tok, parts, pools, args)
    momentum_model = common.momentum_copy(model)
    g = torch.Generator().manual_seed(3047)
    queues = nn.ModuleDict({k: cs.Queue(model.backbone.config.hidden_size, 32, g) for k in cs.QUEUES})
    ds = cs.CodeSearchDataset(parts, tok, args)
    sampler = cs.LanguageSampler([len(ds)], args.batch_size, 8, args.seed)
    for step in (2, 3):  # DMST then DM (both views augmented): the real step function, then enqueue
        sampler.start = step
        batch = torch.utils.data.default_collate([ds[k] for k in list(sampler)[:args.batch_size]])
        train_model = common.distribute(model, torch.device("cpu"))
        model.zero_grad()
        loss, keys = cs.step_loss(train_model, momentum_model, queues, batch, args)
        loss.backward()
        cs.enqueue_all(queues, keys)
    mean_loss = common.all_reduce_sum(loss.detach().clone()) / world  # collective: every rank
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": {k: p.grad for k, p in model.named_parameters()},
                    "queues": queues.state_dict()}, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_equal_one_gradients(tmp_path, csn):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _grad_worker(0, 1, None, csn, one)
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "init"), csn, two), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
    for k, g in a["grads"].items():  # a gradient off by a constant factor (1/world, x2) fails here
        if g is not None:  # (+ 1e-7: the key biases have gradient 0 up to rounding, ~1e-10)
            assert (b["grads"][k] - g).norm() <= 1e-3 * g.norm() + 1e-7, k
    assert_tensors_close(a["queues"], b["queues"], atol=1e-5)


def _pool_eval(csn):
    """evaluate() of a tiny random encoder on the 16 x 16 pool, 3 queries a block, recording the rows this process
    embedded, the score blocks it ranked and what it gathered."""
    torch.set_num_threads(1)
    args = cs.get_args(["--tiny", "--data", csn, "--pretrain-langs", "python"])
    parts, pools = cs.load_data(args)
    common.seed_everything(args.seed)
    tok, model = cs.build_encoder(args, parts[0][1])
    pool = cs.tokenise(tok, parts, pools, args)[1]["test"]
    rec, encode, sums, gather = {"embedded": 0, "blocks": [], "gathered": []}, model.encode, cs.rank_sums, common.concat_all_gather

    def encode_rows(ids):
        rec["embedded"] += len(ids)
        return encode(ids)

    def ranked(scores, gold):
        rec["blocks"].append(tuple(scores.shape))
        return sums(scores, gold)

    def gathered(x):
        rec["gathered"].append(tuple(x.shape))
        return gather(x)
    model.encode, cs.rank_sums, common.concat_all_gather = encode_rows, ranked, gathered
    try:
        metrics = cs.evaluate(model, pool, 4, torch.device("cpu"), "none", chunk=3)
    finally:
        cs.rank_sums, common.concat_all_gather = sums, gather
    return {"metrics": metrics, "stored": pool[0].ids.itemsize, **rec}


def _pool_worker(rank, world, init, csn, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.save(_pool_eval(csn), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process_and_holds_a_shard(tmp_path, csn):
    """Each process embeds half of the queries and of the candidates (8 + 8 of 16 each), gathers only the candidate
    embeddings (once, fp32) and scores its queries in (3, 16) blocks; the sums over processes give the one-process
    MRR and R@k. Token ids are stored in 2 bytes."""
    mp.spawn(_pool_worker, args=(2, str(tmp_path / "init"), csn, str(tmp_path)), nprocs=2, join=True)
    two, one = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)], _pool_eval(csn)
    assert one["embedded"] == 32 and one["blocks"] == [(3, 16)] * 5 + [(1, 16)] and one["stored"] == 2
    for t in two:
        assert t["embedded"] == 16 and t["blocks"] == [(3, 16), (3, 16), (2, 16)] and t["gathered"] == [(8, 64)]
        assert t["metrics"] == pytest.approx(one["metrics"], abs=1e-12) and one["metrics"]["mrr"] > 0


def test_torchrun_two_processes_run_like_one(tmp_path, csn):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common_args = ["--tiny", "--data", csn, "--pretrain-langs", "python", "--dropout", "0", "--max-steps", "2",
                   "--log-every", "1"]
    run_main_inprocess(cs, [*common_args, "--batch-size", "16", "--output-dir", one])
    run_torchrun("cocosoda.py", *common_args, "--batch-size", "8", "--output-dir", two, nproc=2)
    l1, l2 = [r["loss"] for r in read_log(one) if "loss" in r], [r["loss"] for r in read_log(two) if "loss" in r]
    assert abs(l1[0] - l2[0]) < 1e-5 * abs(l1[0]), (l1, l2)
    a, b = load_ckpt(one), load_ckpt(two)
    assert a["step"] == b["step"] == 2 and b["world_size"] == 2
    assert_tensors_close(a["queues"], b["queues"], atol=1e-5)
    assert_tensors_close(a["momentum_model"], b["momentum_model"], atol=1e-5)


# --- 5. GPU settings as far as a CPU allows: bf16 (loss in fp32 outside autocast) and compile ---
def test_bf16_loss_in_fp32(tmp_path, csn, monkeypatch):
    seen, orig = [], cs.moco_logits

    def recording(*a, **kw):
        logits, labels = orig(*a, **kw)
        seen.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return logits, labels
    monkeypatch.setattr(cs, "moco_logits", recording)
    run_main_inprocess(cs, ["--tiny", "--data", csn, *FAST, "--amp", "bf16", "--max-steps", "2",
                            "--output-dir", tmp_path / "bf16"])
    assert seen and all(s == (torch.float32, False) for s in seen), seen[:2]
    # the pre-training logits at scale 20 / 0.07: in bf16 their error would reach ~1 (measured in the report)
    torch.manual_seed(0)
    c, n = (nn.functional.normalize(torch.randn(16, 64), dim=-1) for _ in range(2))
    queues = {k: nn.functional.normalize(torch.randn(64, 32), dim=0) for k in cs.QUEUES}
    ref = cs.cocosoda_loss(c, n, c, n, queues)
    with torch.autocast("cpu", torch.bfloat16):
        low = cs.cocosoda_loss(c, n, c, n, queues)
    assert (low - ref).abs() > 1e-4 * ref  # what computing it inside autocast would cost


def test_compile_aot_eager_no_recompiles(tmp_path, csn):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_main_inprocess(cs, ["--tiny", "--data", csn, *FAST, "--compile", "aot_eager", "--max-steps", "3",
                            "--output-dir", tmp_path / "compiled"])
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph, no recompile per step
    torch._dynamo.reset()


# --- 6. resume: 4 steps in one go == 2 steps, stop, 2 more ---
@pytest.fixture(scope="module")
def resumed(tmp_path_factory, csn):
    root = tmp_path_factory.mktemp("resume")
    full, part = str(root / "full"), str(root / "part")
    run_main_inprocess(cs, [*SMALL, "--data", csn, "--max-steps", "4", "--output-dir", full])
    run_main_inprocess(cs, [*SMALL, "--data", csn, "--max-steps", "2", "--output-dir", part])
    run_main_inprocess(cs, [*SMALL, "--data", csn, "--max-steps", "4", "--output-dir", part])
    return full, part


def test_resume_is_exact(resumed):
    a, b = (load_ckpt(d) for d in resumed)
    assert a["step"] == b["step"] == 4
    for k in ("model", "momentum_model", "queues", "optimizer"):
        assert_tensors_close(a[k], b[k], path=k)


# --- 7. bad input ---
def _fails(argv, expect, ckpt_dir=None):
    before = open(os.path.join(ckpt_dir, "checkpoint.pt"), "rb").read() if ckpt_dir else None
    with pytest.raises(SystemExit, match=expect):
        cs.main([str(a) for a in argv])
    if ckpt_dir:
        assert open(os.path.join(ckpt_dir, "checkpoint.pt"), "rb").read() == before


def test_bad_data_files(tmp_path, csn):
    def load(data):  # the files are read when iterated
        parts, pools = cs.load_data(cs.get_args(["--tiny", "--data", data, "--pretrain-langs", "python"]))
        return [list(part) for _, part in parts], pools

    bad = str(tmp_path / "bad")
    os.makedirs(os.path.join(bad, "python"))
    with pytest.raises(SystemExit, match="train.jsonl not found"):  # empty folder
        load(bad)
    with pytest.raises(SystemExit, match="is not a directory"):
        load(str(tmp_path / "missing"))
    shutil.copytree(csn, bad, dirs_exist_ok=True)
    train = os.path.join(bad, "python", "train.jsonl")
    lines = open(train).read().splitlines()
    open(train, "w").write("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(SystemExit, match="train.jsonl line 2 is not valid JSON"):
        load(bad)
    open(train, "w").write("\n".join([lines[0], json.dumps({"code_tokens": ["x"]}), *lines[2:]]) + "\n")
    with pytest.raises(SystemExit, match="line 2 has no 'docstring_tokens'"):
        load(bad)
    open(train, "w").write("")
    with pytest.raises(SystemExit, match="is empty"):
        load(bad)
    shutil.copy(os.path.join(csn, "python", "train.jsonl"), train)
    with open(os.path.join(bad, "python", "test.jsonl"), "a") as f:
        f.write(json.dumps(_example(5000)) + "\n")
    with pytest.raises(SystemExit, match="is not in python/codebase.jsonl"):
        load(bad)


def test_check_args_queue_and_launch_lines():
    ok = [["--data", "dataset", "--batch-size", "16"],
          ["--mode", "finetune", "--data", "dataset", "--lang", "python", "--batch-size", "16", "--model-name",
           "runs/cocosoda/encoder", "--output-dir", "runs/cocosoda_python"]]
    for argv in ok:  # the README's 8-GPU lines: global batch 128 divides K = 1024
        cs.check_args(cs.get_args(argv), 8)
    with pytest.raises(SystemExit, match="not a positive multiple of the global batch 2048"):
        cs.check_args(cs.get_args(["--data", "dataset"]), 16)  # the default per-process batch on 16 processes
    with pytest.raises(SystemExit, match="not a positive multiple of the global batch"):
        cs.check_args(cs.get_args(["--tiny", "--queue-size", "100"]), 1)


def test_bad_input_cli(tmp_path, csn, resumed):
    with pytest.raises(SystemExit, match="--from-scratch"):
        cs.build_encoder(cs.get_args(["--mode", "finetune", "--model-name", str(tmp_path / "no_model")]), [])
    other = str(tmp_path / "other")
    os.makedirs(other)
    torch.save({"method": "swav"}, os.path.join(other, "checkpoint.pt"))
    _fails([*SMALL, "--data", csn, "--output-dir", other], "not 'cocosoda'", ckpt_dir=other)
    for extra, expect in ((["--hidden-size", "32"], "does not fit this"),
                          (["--lr", "1e30", "--max-steps", "8", "--log-every", "1"], "error: loss is")):
        run = str(tmp_path / f"copy{len(extra)}")
        shutil.copytree(resumed[1], run)
        _fails([*SMALL, "--data", csn, *extra, "--output-dir", run], expect, ckpt_dir=run)
