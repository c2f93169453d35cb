"""Tests for msd.py: hand-computed worked examples, the accumulation window (A micro-batches = one batch of A*b), a --tiny
run that learns, two processes = one process on the same global batch (gradients, and the main path), exact resume,
the pretrained path with dropout, bf16 and compile, augmentation ranges and uint8 path, real-format data, bad input."""
import contextlib
import functools
import json
import os
import random
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch._dynamo.utils import counters
from torchvision.transforms import v2

import common
import msd
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_main_inprocess,
                     run_script, run_torchrun, save_tiny_bert)

SHORT = ("--tiny", "--max-steps", "2", "--log-every", "1", "--probe-fractions", "1.0")


# 1. Core functions: worked examples and properties
def test_window_positive_columns():
    t = msd.diag_targets(2, 4 + 3, offset=2)  # A = 2, b = 2, Q = 3: micro-batch j = 1
    assert t.nonzero().tolist() == [[0, 2], [1, 3]]


def test_itc_worked_examples():
    s_i2t, s_t2i = torch.tensor([[2.0, 0, 1], [0, 2, 1]]), torch.tensor([[1.0, 0, 0], [0, 3, 0]])
    hard = msd.diag_targets(2, 3)
    assert msd.itc_loss(s_i2t, s_t2i, hard, hard).item() == pytest.approx(0.3654, abs=1e-4)
    y = msd.soft_targets(torch.tensor([[1.0, 0, 0], [0, 1, 0]]), hard, 0.4)
    assert torch.allclose(y[0], torch.tensor([0.8304, 0.0848, 0.0848]), atol=1e-4)
    assert msd.itc_loss(s_i2t, s_t2i, y, y).item() == pytest.approx(0.6621, abs=1e-4)
    sim_m = torch.randn(5, 9)
    assert torch.allclose(msd.soft_targets(sim_m, msd.diag_targets(5, 9, 3), 0.4).sum(1), torch.ones(5))
    assert torch.equal(msd.soft_targets(sim_m, hard.new_zeros(5, 9), 0.0), hard.new_zeros(5, 9))


def test_binary_auc():
    assert msd.binary_auc([0.9, 0.4, 0.6, 0.2], [1, 0, 1, 0]) == 1.0
    assert msd.binary_auc([0.9, 0.7, 0.6, 0.2], [1, 0, 0, 1]) == 0.5
    assert msd.binary_auc([0.5, 0.5, 0.1], [1, 0, 0]) == 0.75  # a tie counts one half
    assert np.isnan(msd.binary_auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]  # brute force Mann-Whitney
    assert msd.binary_auc(s, y) == pytest.approx(np.mean(pairs))


def test_ema_worked_example():
    teacher, student = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    teacher.weight.data.fill_(1.0)
    student.weight.data.fill_(0.0)
    msd.momentum_update(teacher, student, 0.995)
    assert teacher.weight.item() == pytest.approx(0.995)
    msd.momentum_update(teacher, student, 0.995)
    assert teacher.weight.item() == pytest.approx(0.990025)
    assert student.weight.item() == 0.0


def test_queue_fifo():
    q = torch.zeros(3, 4)
    keys = torch.arange(6.0).view(2, 3)  # (B, D)
    assert msd.dequeue_and_enqueue(q, 0, keys) == 2
    assert torch.equal(q[:, :2], keys.t()) and not q[:, 2:].any()
    assert msd.dequeue_and_enqueue(q, 2, keys + 10) == 0
    assert torch.equal(q[:, 2:], keys.t() + 10)
    fq = msd.FeatureQueue(3, 4)
    assert fq.keys(keys, keys)[0].shape == (2, 3)  # empty slots are not keys
    fq.enqueue_(keys, -keys)
    ki, kt = fq.keys(keys, keys)
    assert ki.shape == (4, 3) and torch.equal(kt[2:], -keys) and (fq.ptr, fq.filled) == (2, 2)


def test_alpha_warmup():
    assert msd.alpha_at(0, 250, 1000, 0.4) == pytest.approx(0.1)
    assert msd.alpha_at(0, 1000, 1000, 0.4) == pytest.approx(0.4)
    assert msd.alpha_at(1, 7, 1000, 0.4) == pytest.approx(0.4)
    assert msd.alpha_at(0, 0, 1000, 0.4, warmup_epochs=0) == 0.4


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.3, 0.95, 0.2, 0.1]])
    pos = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    r = msd.recall_at_k(sim, pos, ks=(1, 5))
    assert (r["i2t_r1"], r["i2t_r5"], r["t2i_r1"], r["t2i_r5"]) == (50.0, 100.0, 25.0, 100.0)


def test_zero_shot_and_probe():
    img, cls = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    centred, raw = msd.zero_shot_logits(img, cls), msd.zero_shot_logits(img, cls, center=False)
    assert torch.allclose(raw, img @ cls.t()) and torch.allclose(centred.sum(1), torch.zeros(6), atol=1e-6)
    assert torch.equal(centred.argmax(1), raw.argmax(1))
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(80, 2, generator=g) < 0.5).float()
    x = torch.cat([y * 2 + 0.3 * torch.randn(80, 2, generator=g), torch.randn(80, 3, generator=g)], 1)
    assert msd.linear_probe_auc(x[:60], y[:60], x[60:], y[60:]) > 0.95


def test_word_tokenizer():
    tok = msd.WordTokenizer.build(["Small opacity.", "no effusion."])
    out = tok(["small effusion, opacity"], max_length=6)
    words = [tok.vocab[i] for i in out["input_ids"][0].tolist()]
    assert words == ["[CLS]", "small", "effusion", "[UNK]", "opacity", "[SEP]"]
    assert out["attention_mask"].tolist() == [[1] * 6]


def test_augmentation_ranges_are_the_recipe(monkeypatch):
    """The drawn parameters span exactly the recipe's ranges (rotation +-5 deg, scale 0.95-1.05, shift +-4% of S,
    brightness and contrast 0.8-1.2), no flip; uint8 out, a function of the sample seed alone."""
    seen = {k: [] for k in ("angle", "scale", "translate", "brightness", "contrast")}
    TF = v2.functional
    affine, bright, contrast = TF.affine, TF.adjust_brightness, TF.adjust_contrast

    def rec_affine(img, angle, translate, scale, shear, **kw):
        seen["angle"].append(angle)
        seen["scale"].append(scale)
        seen["translate"] += translate
        assert shear == [0.0, 0.0]
        return affine(img, angle=angle, translate=translate, scale=scale, shear=shear, **kw)

    monkeypatch.setattr(TF, "affine", rec_affine)
    monkeypatch.setattr(TF, "adjust_brightness", lambda img, f: seen["brightness"].append(f) or bright(img, f))
    monkeypatch.setattr(TF, "adjust_contrast", lambda img, f: seen["contrast"].append(f) or contrast(img, f))
    monkeypatch.setattr(TF, "horizontal_flip", lambda *a: pytest.fail("a flip swaps left and right in reports"))
    ds = msd.SyntheticXray(4, 0, 50, augment=True)
    out = [ds[(i % 4, seed)][0] for i, seed in enumerate(range(400))]
    for k, (lo, hi) in {"angle": (-5, 5), "scale": (0.95, 1.05), "translate": (-2, 2), "brightness": (0.8, 1.2),
                        "contrast": (0.8, 1.2)}.items():
        v = torch.tensor(seen[k], dtype=torch.float64)
        assert lo <= v.min() < lo + 0.05 * (hi - lo) and hi - 0.05 * (hi - lo) < v.max() <= hi, (k, v.min(), v.max())
    assert out[0].dtype == torch.uint8 and out[0].shape == (1, 50, 50)
    assert torch.equal(ds[(0, 0)][0], out[0]) and not torch.equal(ds[(0, 4)][0], out[0])


def test_uint8_pipeline_equals_the_float_recipe(tmp_path):
    """The PIL/uint8 path (grey decode, resize, augmentation) gives the images of the same recipe on float tensors
    up to rounding (a few nearest-neighbour edge pixels aside), and the model normalises uint8 as float / 255."""
    def reference(x, seed):  # the recipe on a float (1, S, S) tensor in [0, 1]
        rng, s = random.Random(seed), x.shape[-1]
        x = v2.functional.affine(x, angle=rng.uniform(-5, 5), scale=rng.uniform(0.95, 1.05), shear=[0.0, 0.0],
                                 translate=[round(rng.uniform(-0.04, 0.04) * s) for _ in range(2)])
        return v2.functional.adjust_contrast(v2.functional.adjust_brightness(x, rng.uniform(0.8, 1.2)),
                                             rng.uniform(0.8, 1.2))

    g = torch.Generator().manual_seed(0)
    big = F.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(375, 500), mode="bicubic").clamp(0, 1)[0]
    v2.functional.to_pil_image(big).save(tmp_path / "x.jpg", quality=95)
    ds = msd.ReportDataset([(str(tmp_path / "x.jpg"), "r", None)], 64, augment=True)
    grey = v2.functional.pil_to_tensor(torchvision.datasets.folder.pil_loader(tmp_path / "x.jpg").convert("L"))
    grey = v2.functional.resize(grey, [64, 64], antialias=True).float() / 255
    assert (v2.functional.pil_to_tensor(ds.load(0)[0]).float() / 255 - grey).abs().mean() < 1.5 / 255
    for seed in range(8):
        ours = ds[(0, seed)][0].float() / 255
        assert (ours - reference(grey, seed)).abs().mean() < 2.5 / 255, seed
    model = msd.build_model(msd.get_args(["--tiny"]), vocab_size=30).eval()
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    want = model.visual((x.float().expand(-1, 3, -1, -1) / 255 - model.mean) / model.std)
    torch.testing.assert_close(model.image_features(x)[0], want)


def test_paper_size_model_builds_offline():
    args = msd.get_args(["--no-pretrained"])
    model = msd.build_model(args, vocab_size=100)
    assert isinstance(model.visual.fc, torch.nn.Identity) and model.vision_proj.in_features == 2048
    assert model.text.config.hidden_size == 768 and model.text.config.num_hidden_layers == 12
    assert model.text_proj.out_features == 256 and model.temp.item() == pytest.approx(0.07)


# The core claim: in window mode A micro-batches of b give the gradient of one batch of A*b
def tiny_parts(n=4):
    torch.manual_seed(0)
    args = msd.get_args(["--tiny"])
    model = msd.build_model(args, vocab_size=30)  # GroupNorm CNN + BERT without dropout: no BN, no dropout
    teacher, queue = common.momentum_copy(model), msd.FeatureQueue(args.embed_dim, 8)
    for buf in (queue.image, queue.text):  # half full, so the queue takes part in the loss
        buf[:, :4] = F.normalize(torch.randn(args.embed_dim, 4), dim=0)
    queue.ptr = queue.filled = 4
    images, ids = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8), torch.randint(4, 30, (n, 10))
    ids[:, 0] = 2
    return model, teacher, queue, (images, ids, torch.ones_like(ids))


class RecordingSGD(torch.optim.SGD):
    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def accumulate(mode, chunks, alpha, intra=False, n=4, compile=None, amp=None, steps=1):
    """One window (or `steps`) of msd_accum_step on this process's contiguous slice of a global batch of n pairs, the
    model wrapped as main wraps it (DDP when world > 1); plain SGD records the gradient that it applies."""
    model, teacher, queue, batch = tiny_parts(n)
    student = common.distribute(model, torch.device("cpu"), compile)
    opt = RecordingSGD(model.parameters(), lr=0.1)
    local = [x.chunk(common.get_world_size())[common.get_rank()] for x in batch]
    micro = list(zip(*(x.chunk(chunks) for x in local)))
    amp = functools.partial(common.autocast, torch.device("cpu"), amp) if amp else contextlib.nullcontext
    for _ in range(steps):
        stats = msd.msd_accum_step(student, teacher, micro, opt, queue, alpha, 0.995, mode, intra, amp=amp)
    return opt.grads, teacher, queue, stats


@pytest.mark.parametrize("alpha,intra", [(0.0, False), (0.4, True)])
def test_window_mode_equals_one_big_batch(alpha, intra):
    g_win, t_win, q_win, s_win = accumulate("window", 2, alpha, intra)  # A = 2 micro-batches of b = 2
    g_big, t_big, q_big, s_big = accumulate("window", 1, alpha, intra)  # one batch of A*b = 4
    for a, b in zip(g_win, g_big):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert torch.allclose(s_win["loss"], s_big["loss"], atol=1e-6)
    assert_tensors_close(t_win.state_dict(), t_big.state_dict(), atol=1e-6)
    assert torch.allclose(q_win.image, q_big.image, atol=1e-6) and (q_win.ptr, q_win.filled) == (0, 8)
    g_naive = accumulate("naive", 2, alpha, intra)[0]
    assert max((a - b).abs().max().item() for a, b in zip(g_naive, g_big)) > 1e-4


def test_ema_and_enqueue_once_per_window(monkeypatch):
    calls = {"ema": 0, "enqueue": 0}
    ema, enqueue = msd.momentum_update, msd.FeatureQueue.enqueue_

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(msd, "momentum_update", count("ema", ema))
    monkeypatch.setattr(msd.FeatureQueue, "enqueue_", count("enqueue", enqueue))
    for mode, expected in (("window", 1), ("naive", 4)):
        calls.update(ema=0, enqueue=0)
        _, _, queue, _ = accumulate(mode, 4, 0.4)
        assert calls == {"ema": expected, "enqueue": expected} and queue.ptr == 0  # (4 + 4) % 8


def _grad_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads, teacher, queue, stats = accumulate("window", 2, 0.4, intra=True, n=8)  # A = 2 micro-batches of b = 2
    torch.save({"grads": grads, "teacher": teacher.state_dict(), "queue": queue.state_dict(), "loss": stats["loss"]},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gradients_match_one():
    """After a full window of A micro-batches (no_sync for the first A - 1), the gradient that the optimizer applies
    on each of 2 processes equals the one-process gradient of the same global window of 8 pairs: a loss or gradient
    scale off by any constant factor (1/world, 2) fails at this tolerance."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_grad_worker, args=(2, f"{d}/init", d), nprocs=2, join=True)
        res = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    grads, teacher, queue, stats = accumulate("window", 2, 0.4, intra=True, n=8)  # 2 micro-batches of 4
    for r in res:
        for i, (a, b) in enumerate(zip(r["grads"], grads)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=f"gradient {i}")
        assert_tensors_close(r["teacher"], teacher.state_dict(), atol=1e-6, path="teacher")
        assert_tensors_close(r["queue"], queue.state_dict(), atol=1e-6, path="queue")
    assert (res[0]["loss"] + res[1]["loss"]) / 2 == pytest.approx(stats["loss"].item(), rel=1e-5)


def test_compile_and_bf16_steps():
    """--compile aot_eager with --amp bf16 on msd_accum_step: one graph, no graph break, no recompilation after the
    first step; the loss (logits and KL outside autocast) is fp32."""
    torch._dynamo.reset()
    counters.clear()
    _, _, _, stats = accumulate("window", 2, 0.4, intra=True, compile="aot_eager", amp="bf16")
    first = dict(counters["stats"])
    _, _, _, stats = accumulate("window", 2, 0.4, intra=True, compile="aot_eager", amp="bf16", steps=3)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert dict(counters["stats"]) == first and first["unique_graphs"] == 1, (first, dict(counters["stats"]))
    assert stats["loss"].dtype == torch.float32 and torch.isfinite(stats["loss"])
    torch._dynamo.reset()


# 2. --tiny learns
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("msd_tiny")
    return out, run_script("msd.py", "--tiny", "--output-dir", out, threads=1)


def test_tiny_learns(tiny_run):
    out, proc = tiny_run
    m = read_metrics(out)
    assert list(m)[0] == "zs_auc"
    assert m["zs_auc"] > m["zs_auc_init"] + 0.15, m
    assert m["r_mean"] > m["r_mean_init"] + 12, m
    assert m["probe_auc_100pct"] > m["probe_auc_100pct_init"] + 0.1, m
    assert "zs_auc" in proc.stdout and "r_mean" in proc.stdout and "init" in proc.stdout
    assert read_log(out)[-1]["eval"]["zs_auc"] == m["zs_auc"]


# 3. two processes agree with one process holding the same global batch
@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("msd_one")
    run_script("msd.py", *SHORT, "--batch-size", "16", "--output-dir", out, threads=1)
    return out


def test_two_processes_match_one(one_proc, tmp_path):
    run_torchrun("msd.py", *SHORT, "--batch-size", "8", "--output-dir", tmp_path)
    one, two = read_log(one_proc), read_log(tmp_path)
    for a, b in zip(one[:2], two[:2]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    c1, c2 = load_ckpt(one_proc), load_ckpt(tmp_path)
    for k in ("queue", "model", "momentum_model"):
        assert_tensors_close(c1[k], c2[k], atol=1e-5, path=k)
    assert c1["queue"]["_extra_state"] == c2["queue"]["_extra_state"] == {"ptr": 0, "filled": 64}
    assert len(c2["ranks"]) == 2 and c2["world_size"] == 2


# 4. resume: 20 steps in one go = 10 steps, stop, resume to 20 (mid-epoch resume, then across an epoch end)
def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--tiny", "--probe-fractions", "1.0", "--log-every", "5")
    run_script("msd.py", *args, "--max-steps", "20", "--output-dir", a, threads=1)
    run_script("msd.py", *args, "--max-steps", "10", "--output-dir", b, threads=1)
    assert load_ckpt(b)["step"] == 10
    proc = run_script("msd.py", *args, "--max-steps", "20", "--output-dir", b, threads=1)
    assert "resumed" in proc.stdout
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert cb["step"] == 20
    for k in ("model", "momentum_model", "queue", "optimizer"):
        assert_tensors_close(ca[k], cb[k], path=k)
    assert ca["queue"]["_extra_state"] == cb["queue"]["_extra_state"]
    assert read_metrics(a)["zs_auc"] == read_metrics(b)["zs_auc"]
    assert read_metrics(b)["zs_auc_init"] == read_metrics(a)["zs_auc_init"]


# 5. real format and bad input
def write_real(root, n_train=40, n_test=12):
    """A folder in the real format: PNGs, train.jsonl, test.csv, prompts.json (from the synthetic generator)."""
    os.makedirs(root / "img", exist_ok=True)
    lines, rows = [], ["image,caption,labels"]
    for i in range(n_train + n_test):
        findings, report = msd.synthetic_case(i)
        msd.draw_case(findings, i, 32).save(root / "img" / f"{i}.png")
        labels = [int(any(f["cls"] == c for f in findings)) for c in msd.CLASSES]
        if i < n_train:
            lines.append(json.dumps({"image": f"img/{i}.png", "caption": report, "labels": labels}))
        else:
            rows.append(f'img/{i}.png,"{report}",{" ".join(map(str, labels))}')
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    (root / "prompts.json").write_text(json.dumps(msd.synthetic_prompts()))


def test_real_format(tmp_path):
    write_real(tmp_path / "data")
    msd.main(["--tiny", "--data", str(tmp_path / "data"), "--max-steps", "1", "--output-dir", str(tmp_path / "o")])
    m = read_metrics(tmp_path / "o")
    assert {"zs_auc", "r_mean", "probe_auc_100pct", "zs_auc_init"} <= set(m)


def test_bad_input(one_proc, tmp_path):
    data = tmp_path / "data"
    write_real(data)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "checkpoint.pt"
    ckpt.write_bytes((one_proc / "checkpoint.pt").read_bytes())
    before = ckpt.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (data / "train.jsonl").read_text().splitlines()

    def fails(match, *argv, out=tmp_path / "o", setup=None):
        if setup:
            setup()
        with pytest.raises(SystemExit, match=match):
            msd.main(["--tiny", "--output-dir", str(out), *argv])

    fails("does-not-exist is not a folder", "--data", str(tmp_path / "does-not-exist"))
    fails("has no train.jsonl or train.csv", "--data", str(empty))
    for name, bad, match in (
            ("json", "{not json", r"train.jsonl:2: not valid JSON"),
            ("key", '{"image": "img/0.png"}', r"train.jsonl:2: needs the keys"),
            ("labels", '{"image": "img/0.png", "caption": "x", "labels": [1]}', r"train.jsonl:2: 'labels'"),
            ("image", '{"image": "nope.png", "caption": "x", "labels": [0, 0, 0, 0, 0]}', r"nope.png not found")):
        d = broken / name
        d.mkdir()
        for f in ("test.csv", "prompts.json"):
            (d / f).write_bytes((data / f).read_bytes())
        os.symlink(data / "img", d / "img")
        (d / "train.jsonl").write_text("\n".join([lines[0], bad] + lines[2:]) + "\n")
        fails(match, "--data", str(d))
    fails("--queue-size 48 is not a multiple of the window of 32", "--queue-size", "48")
    fails("does not fit this MSDModel", "--embed-dim", "16", out=ckpt_dir)
    fails("loss is (nan|inf)", "--lr", "1e30", "--max-steps", "6", "--log-every", "1", out=ckpt_dir)
    assert ckpt.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    proc = run_script("msd.py", "--tiny", "--output-dir", other, check=False, threads=1)
    assert proc.returncode != 0 and "checkpoint of 'swav', not 'msd'" in proc.stdout


def test_pretrained_path_trains_with_dropout(tmp_path):
    """A text model from a local save_pretrained folder, as a lab passes it: from_pretrained returns eval mode,
    and every dropout of the online model must be in training mode in the training step."""
    bert = save_tiny_bert(tmp_path / "bert")
    with DropoutRecorder() as rec:
        run_main_inprocess(msd, ["--tiny", "--text-model", bert, "--max-steps", "2", "--probe-fractions", "1.0",
                                 "--output-dir", tmp_path / "out"])
    online = rec.training_calls()
    assert online and all(training for _, training in online), "online text model trained with dropout off"
    assert len({id(m) for m, _ in online}) >= 5  # embeddings + 2 layers x (attention output, output) of BERT
    assert load_ckpt(tmp_path / "out")["step"] == 2
