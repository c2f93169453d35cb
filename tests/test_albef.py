"""Tests for albef.py: hand-computed worked examples and properties, a --tiny run that learns, two processes vs one
process holding the same global batch, exact resume, and bad input."""
import collections
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import albef
import common
from helpers import (DropoutRecorder, assert_tensors_close, load_ckpt, read_log, read_metrics, run_script, run_torchrun,
                     save_tiny_bert, save_tiny_vit)

T = torch.tensor


# --- 1. Core functions: worked examples (numbers computed by hand in float64) and properties ---
def test_itc_worked_examples():
    s_i2t, s_t2i = T([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]), T([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    hard = torch.eye(2, 3)
    assert albef.itc_loss(s_i2t, s_t2i, hard, hard).item() == pytest.approx(0.3654, abs=1e-4)  # example 1
    teacher = T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tgt = albef.soft_targets(teacher, hard, 0.4)
    assert torch.allclose(tgt[0], T([0.8304, 0.0848, 0.0848]), atol=1e-4)
    assert albef.itc_loss(s_i2t, s_t2i, tgt, tgt).item() == pytest.approx(0.6621, abs=1e-4)  # example 2


def test_soft_targets_properties():
    g = torch.Generator().manual_seed(0)
    s, s_m = torch.randn(4, 9, generator=g) * 3, torch.randn(4, 9, generator=g) * 3
    hard = torch.eye(4, 9)
    assert torch.allclose(albef.soft_targets(s_m, hard, 0.4).sum(1), torch.ones(4))
    # alpha = 0 is the hard loss; alpha = 1 with teacher = student is the student's entropy
    assert albef.itc_loss(s, s, albef.soft_targets(s_m, hard, 0.0), hard) == albef.itc_loss(s, s, hard, hard)
    entropy = -(F.softmax(s, 1) * F.log_softmax(s, 1)).sum(1).mean()
    assert torch.allclose(albef.itc_loss(s, s, albef.soft_targets(s, hard, 1.0), albef.soft_targets(s, hard, 1.0)),
                          entropy, atol=1e-6)


def test_idx_targets_worked_example():
    t = albef.idx_targets(T([7, 7, 9]), T([7, 7, 9, 9, -100]))  # example 3: queued idx 9 is a positive
    assert torch.allclose(t, T([[.5, .5, 0, 0, 0], [.5, .5, 0, 0, 0], [0, 0, .5, .5, 0]]))


def test_hard_negatives_worked_example_and_never_the_positive():
    logits = T([[5.0, 4.0, 1.0], [2.0, 6.0, 2.0], [0.0, 3.0, 4.0]])
    official = F.softmax(logits, 1).fill_diagonal_(0)  # example 4: the official weights...
    assert torch.allclose(official, T([[0, .2654, .0132], [.0177, 0, .0177], [.0132, .2654, 0]]), atol=1e-4)
    w = albef.hard_negative_weights(logits)  # ...and the distribution multinomial draws from them
    assert torch.allclose(w, T([[0, .9526, .0474], [.5, 0, .5], [.0474, .9526, 0]]), atol=1e-4)
    assert torch.allclose(w, official / official.sum(1, keepdim=True), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    sims, idx = torch.randn(8, 8, generator=g), T([0, 0, 1, 1, 2, 2, 3, 3])
    for _ in range(50):
        neg_img, neg_txt = albef.sample_hard_negatives(sims, sims.T, generator=g)
        assert (neg_img != torch.arange(8)).all() and (neg_txt != torch.arange(8)).all()
        neg_img, neg_txt = albef.sample_hard_negatives(sims, sims.T, idx, generator=g)
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()  # retrieval: never the same image
    assert albef.itm_labels(4).tolist() == [1] * 4 + [0] * 8


def test_degenerate_rows_do_not_crash():
    sims = T([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0], [0.0, 0.0, 1e4]])  # a dominant positive (tiny temperature)
    official = F.softmax(sims, 1).fill_diagonal_(0)
    with pytest.raises(RuntimeError):  # the known 'invalid multinomial distribution' of the official recipe
        torch.multinomial(official[0], 1)
    neg_img, neg_txt = albef.sample_hard_negatives(sims, sims)
    assert (neg_img != torch.arange(3)).all() and (neg_txt != torch.arange(3)).all()
    nan = torch.full((3, 3), float("nan"))  # NaN sims (fp16 overflow): uniform over the other items
    assert (albef.sample_hard_negatives(nan, nan)[0] != torch.arange(3)).all()
    albef.sample_hard_negatives(sims, sims, idx=T([5, 5, 5]))  # every item shows the same image
    with pytest.raises(ValueError):
        albef.sample_hard_negatives(sims[:1, :1], sims[:1, :1])  # batch of 1


def test_mlm_worked_example_and_masking():
    loss = albef.mlm_distill_loss(T([[2.0, 1.0, 0.0]]), T([0]), T([[.5, .3, .2]]), 0.4)
    assert loss.item() == pytest.approx(0.6876, abs=1e-4)  # example 5
    ignored = albef.mlm_distill_loss(T([[2.0, 1.0, 0.0], [9.0, 0.0, 0.0]]), T([0, -100]), T([[.5, .3, .2]] * 2), 0.4)
    assert ignored.item() == pytest.approx(0.6876, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (400, 30), generator=g)
    ids[:, 0], ids[:, 20:] = 2, 0  # [CLS] ... [PAD]
    masked, labels = albef.mask_tokens(ids, 100, 4, 0, 2, 0.15, generator=g)
    sel = labels != -100
    assert not sel[:, 0].any() and not sel[:, 20:].any()  # never [CLS] or [PAD]
    assert abs(sel[:, 1:20].float().mean().item() - 0.15) < 0.01
    assert abs((masked[sel] == 4).float().mean().item() - 0.8) < 0.03
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(masked[~sel], ids[~sel])


def _dot(img):  # (x, y) centroid of the red dot, fill excluded
    a = np.asarray(img).astype(float)
    d = np.clip(a[..., 0] - a[..., 1], 0, None)
    ys, xs = np.nonzero(d)
    return (xs * d[ys, xs]).sum() / d[ys, xs].sum(), (ys * d[ys, xs]).sum() / d[ys, xs].sum()


def test_random_augment_is_the_official_one():
    """RandomAugment(2, 7) of the official dataset/randaugment.py: two ops with replacement from its 10, each with
    p 0.5; at M=7 brightness/sharpness 1.36, shear 0.21 about the top-left corner, translate 7 px, rotate 21 deg,
    random signs, grey fill (torchvision's RandAugment at bin 7 of 11 would always apply both ops, translate
    ~81 px at 256 px, brightness 1 +- 0.63 and fill black)."""
    from PIL import Image
    ra, apply = albef.RandomAugment(2, 7), albef.RandomAugment.apply
    random.seed(0)
    levels = {op: {v if v is None else round(v, 6) for v in (ra.level(op) for _ in range(200))} for op in ra.OPS}
    assert levels["Brightness"] == levels["Sharpness"] == {1.36}
    assert levels["ShearX"] == {0.21, -0.21} and levels["Rotate"] == {21.0, -21.0}
    assert levels["TranslateY"] == {7.0, -7.0} and levels["Identity"] == {None}
    applied, orig = [], albef.RandomAugment.apply
    albef.RandomAugment.apply = staticmethod(lambda img, op, v: applied.append(op) or img)
    try:
        per_call = []
        for _ in range(4000):
            n = len(applied)
            ra(None)
            per_call.append(len(applied) - n)
    finally:
        albef.RandomAugment.apply = staticmethod(orig)
    assert abs(np.mean(per_call) - 1.0) < 0.05 and 0.2 < np.mean(np.array(per_call) == 2) < 0.3  # Binomial(2, .5)
    freq = collections.Counter(applied)
    assert set(freq) == set(ra.OPS) and min(freq.values()) > 0.8 * len(applied) / 10
    img = np.zeros((40, 40, 3), np.uint8)
    img[20, 10, 0] = 255  # a red dot at x 10, y 20
    pil = Image.fromarray(img)
    assert _dot(apply(pil, "TranslateX", 7.0)) == pytest.approx((3, 20), abs=0.05)  # cv2: x -> x - 7, in pixels
    assert _dot(apply(pil, "TranslateY", -7.0)) == pytest.approx((10, 27), abs=0.05)
    assert _dot(apply(pil, "ShearX", 0.21)) == pytest.approx((10 + 0.21 * 20, 20), abs=0.15)  # about (0, 0)
    assert _dot(apply(pil, "ShearY", 0.21)) == pytest.approx((10, 20 + 0.21 * 10), abs=0.15)
    assert _dot(apply(pil, "Rotate", 90.0)) == pytest.approx((20, 30), abs=1.0)  # counter-clockwise about the centre
    out = np.asarray(apply(pil, "TranslateX", 7.0))
    assert out.shape == (40, 40, 3) and (out[:, -7:] == 128).all() and out.dtype == np.uint8  # grey fill
    flat = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    assert np.asarray(apply(flat, "Brightness", 1.36))[0, 0, 0] == 136


def test_alpha_warm_up_and_lr_worked_examples():
    assert albef.alpha_at(0, 250, 1000, 0.4) == pytest.approx(0.1)  # example 9
    assert albef.alpha_at(0, 1000, 1000, 0.4) == pytest.approx(0.4)
    assert albef.alpha_at(1, 3, 1000, 0.4) == pytest.approx(0.4)
    assert albef.albef_lr(0, 150) == pytest.approx(1.45e-5)  # example 10
    assert albef.albef_lr(0, 1000) == pytest.approx(5.5e-5)
    assert albef.albef_lr(0, 5000) == pytest.approx(1e-4)
    assert albef.albef_lr(1, 0) == pytest.approx(9.975e-5, rel=1e-3)
    assert albef.albef_lr(15, 0) == pytest.approx(5.5e-5)
    assert albef.albef_lr(29, 0) == pytest.approx(1.025e-5, rel=1e-3)


def test_queue_fifo_and_momentum():
    q = torch.zeros(3, 4)
    ptr = albef.dequeue_and_enqueue(q, 0, T([[1.0, 1, 1], [2, 2, 2]]))  # example 7
    assert ptr == 2 and q[:, :2].T.tolist() == [[1, 1, 1], [2, 2, 2]] and q[:, 2:].abs().sum() == 0
    ptr = albef.dequeue_and_enqueue(q, ptr, T([[3.0, 3, 3], [4, 4, 4]]))
    assert ptr == 0 and q[0].tolist() == [1, 2, 3, 4]
    albef.dequeue_and_enqueue(q, ptr, T([[5.0, 5, 5], [6, 6, 6]]))
    assert q[0].tolist() == [5, 6, 3, 4]  # the oldest columns are overwritten
    with pytest.raises(ValueError):
        albef.dequeue_and_enqueue(q, 0, torch.ones(3, 3))
    queue = albef.Queue(8, 6, seed=1)
    assert torch.allclose(queue.image.norm(dim=0), torch.ones(6)) and (queue.idx == -100).all()
    queue.push(torch.ones(2, 8), torch.ones(2, 8), T([3, 4]))
    assert queue.ptr.item() == 2 and queue.idx[0, :2].tolist() == [3, 4]
    # EMA (example 6) on the momentum copy of the encoders; the copy never requires gradients
    args = albef.get_args(["--tiny"])
    enc = albef.build_encoders(args, 40)
    enc_m = common.momentum_copy(enc)
    assert all(not p.requires_grad for p in enc_m.parameters())
    with torch.no_grad():
        enc_m.text_proj.bias.fill_(1.0), enc.text_proj.bias.fill_(0.0)
    common.ema_update_(enc_m, enc, 0.995)
    assert torch.allclose(enc_m.text_proj.bias, torch.full((32,), 0.995))
    common.ema_update_(enc_m, enc, 0.995)
    assert torch.allclose(enc_m.text_proj.bias, torch.full((32,), 0.990025))
    assert (enc.text_proj.bias == 0).all()  # the student is untouched
    assert not hasattr(enc.text_encoder.bert.encoder.layer[1], "crossattention")  # text layers: no cross-attention
    assert hasattr(enc.text_encoder.bert.encoder.layer[2], "crossattention")


def test_recall_at_k_worked_example_and_rerank():
    s_i2t = T([[.9, .1, .8, .2], [.3, .95, .2, .1]])  # example 8
    r = albef.recall_at_k(s_i2t, s_i2t.T, [[0, 1], [2, 3]], [0, 0, 1, 1])
    assert (r["txt_r1"], r["txt_r5"], r["img_r1"], r["img_r5"]) == pytest.approx((50, 100, 25, 100))
    assert r["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (25 + 100 + 100) / 3) / 2)
    ties = T([[-100.0, -100.0, -100.0]])  # ties rank left first (a stable sort): column 0 first, column 2 third
    assert [albef.recall_at_k(ties, ties, [[c]], [0, 0, 0])["txt_r1"] for c in (0, 2)] == [100, 0]
    sims = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    calls = []

    def itm(img, txt, rows, block):
        calls.append(len(img))
        return (img * 10 + txt).float()
    s_i2t, s_t2i = albef.rerank_topk(sims, 3, itm, range(5))
    top_i2t, top_t2i = sims.topk(3, dim=1).indices, sims.T.topk(3, dim=1).indices
    for i in range(5):  # only each row's top-k entries are ITM scores, every other entry is -100
        assert sorted(s_i2t[i][s_i2t[i] != -100].tolist()) == sorted((i * 10 + top_i2t[i]).float().tolist())
    for j in range(7):  # t2i: the same pair score, image * 10 + text
        assert sorted(s_t2i[j][s_t2i[j] != -100].tolist()) == sorted((top_t2i[j] * 10 + j).float().tolist())
    pairs = {(i, int(c)) for i in range(5) for c in top_i2t[i]} | {(int(r), j) for j in range(7) for r in top_t2i[j]}
    assert sum(calls) == len(pairs) < 5 * 3 + 7 * 3  # a pair in both top-k lists is scored once
    # two image shards, texts in blocks (the last text repeated, as a shard pads): the two parts add up to the whole
    # (what the sum over processes does), and every pair is scored once, by the owner of its image
    blocks = [(T([0, 1, 2, 3]), None), (T([4, 5, 6, 6]), None)]
    calls.clear()
    a, b = albef.rerank_topk(sims, 3, itm, [0, 1, 2], blocks), albef.rerank_topk(sims, 3, itm, [3, 4], blocks)
    assert sum(calls) == len(pairs)
    for whole, x, y in zip((s_i2t, s_t2i), a, b):
        assert torch.equal(x + y, torch.where(whole == -100, -200.0, whole))


def test_pre_caption_and_synthetic_captions():
    assert albef.pre_caption("A  Dog's <person>, jumping-over/the (red) fence!\n") == "a dogs person jumping over the red fence"
    assert albef.pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    caps = albef.scene_captions(("red", "circle", "blue", "square", True))
    assert caps[0] == "a red circle above a blue square" and all("red circle" in c and "blue square" in c for c in caps)
    train, test, _ = albef.synthetic_data(albef.get_args(["--tiny"]))
    assert len({it["image"] for it in test}) == len(test) == 100  # distinct scenes: retrieval is well defined
    img = albef.render(test[0]["image"], 32)
    assert img.shape == (3, 32, 32) and torch.isfinite(img).all()


def test_paper_size_model_builds_on_meta_without_download():
    args = albef.get_args(["--no-pretrained"])
    assert (args.queue_size, args.momentum, args.alpha, args.embed_dim, args.image_res) == (65536, 0.995, 0.4, 256, 256)
    with torch.device("meta"):
        model = albef.ALBEF(albef.build_encoders(args, 30522), args.temp)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.enc.visual_encoder) == 85_844_736  # ViT-B/16 at 256 px: 16 x 16 patches + [CLS]
    bert = model.enc.text_encoder
    assert len(bert.bert.encoder.layer) == 12 and bert.config.hidden_size == 768
    assert sum(hasattr(layer, "crossattention") for layer in bert.bert.encoder.layer) == 6
    assert 123e6 < count(bert) < 124.5e6  # BERT-base + MLM head + 6 cross-attention blocks
    assert 209e6 < count(model) < 211e6


def test_official_json_formats_train_and_evaluate(tmp_path):
    """Real images in the official formats: pretraining [{image, caption}] and retrieval [{image, caption,
    image_id}] for training, [{image, caption: [...]}] for evaluation, paths relative to --image-root."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    os.makedirs(tmp_path / "img")
    for i in range(8):
        torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), tmp_path / "img" / f"{i}.png")
    pre = [{"image": f"{i % 8}.png", "caption": [f"A photo, number {i}!", "a PHOTO"] if i % 2 else f"photo {i}"}
           for i in range(16)]
    ret = [{"image": f"{i % 8}.png", "caption": f"photo {i}", "image_id": f"id{i % 8}"} for i in range(16)]
    test = [{"image": f"{i}.png", "caption": [f"photo {i}", "a photo"]} for i in range(4)]
    for name, obj in (("pre", pre), ("ret", ret), ("test", test)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    args = albef.get_args(["--tiny", "--mode", "retrieval", "--data", str(tmp_path / "ret.json"), "--eval-data",
                           str(tmp_path / "test.json"), "--image-root", str(tmp_path / "img")])
    with pytest.raises(SystemExit, match="--val-data"):  # retrieval keeps the epoch best on val: a val set is needed
        albef.load_data(args)
    args.val_data = str(tmp_path / "test.json")
    train, ev, val = albef.load_data(args)
    assert [idx for _, _, idx in train[:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 0]  # image ids -> contiguous idx
    assert ev[0]["caption"] == ["photo 0", "a photo"] and ev[0]["image"].endswith("0.png")
    for mode, data, more in (("pretrain", "pre.json", []),  # then fine-tune from it at 48 px (positions resized)
                             ("retrieval", "ret.json", ["--init", str(tmp_path / "pretrain" / "checkpoint.pt"),
                                                        "--image-res", "48", "--val-data", str(tmp_path / "test.json")])):
        out = tmp_path / mode
        albef.main(["--tiny", "--mode", mode, "--data", str(tmp_path / data), "--eval-data", str(tmp_path / "test.json"),
                    "--image-root", str(tmp_path / "img"), "--max-steps", "2", "--output-dir", str(out), *more])
        m = read_metrics(out)
        assert 0 <= m["r_mean"] <= 100 and load_ckpt(out)["step"] == 2
        assert load_ckpt(out)["queue"]["ptr"].item() == 32
    evals = [r for r in read_log(tmp_path / "retrieval") if "val" in r]  # Retrieval.py: val + test every epoch
    assert [r["epoch"] for r in evals] == [0, 1] and all("test" in r for r in evals)
    best = max(evals, key=lambda r: (r["val"]["r_mean"], -r["epoch"]))  # the first epoch with the best val
    m = read_metrics(tmp_path / "retrieval")
    assert m["best_epoch"] == best["epoch"] and m["r_mean"] == best["test"]["r_mean"] == evals[best["epoch"]]["test"]["r_mean"]
    assert load_ckpt(tmp_path / "retrieval", "best.pt")["epoch"] == best["epoch"]
    pre, ft = load_ckpt(tmp_path / "pretrain")["model"], load_ckpt(tmp_path / "retrieval")["model"]
    assert ft["enc.visual_encoder.embeddings.position_embeddings"].shape == (1, 1 + 36, 64)  # 6 x 6 patches of 8 px
    word, head = "enc.text_encoder.bert.embeddings.word_embeddings.weight", "enc.text_encoder.cls.predictions.bias"
    assert not torch.equal(pre[word], ft[word]) and torch.equal(pre[head], ft[head])  # fine-tuning: no MLM head


def _json_data(root, n_train=16, n_test=4):
    """Real images and captions in the official pretraining / evaluation JSON formats."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "img", exist_ok=True)
    for i in range(8):
        torchvision.utils.save_image(torch.rand(3, 40, 48, generator=g), root / "img" / f"{i}.png")
    (root / "pre.json").write_text(json.dumps([{"image": f"{i % 8}.png", "caption": f"a red circle {i}"}
                                               for i in range(n_train)]))
    (root / "test.json").write_text(json.dumps([{"image": f"{i}.png", "caption": [f"a blue square {i}"]}
                                                for i in range(n_test)]))
    return ["--data", root / "pre.json", "--eval-data", root / "test.json", "--image-root", root / "img"]


def test_pretrained_path_trains_with_dropout(tmp_path):
    """ViT and BERT from local save_pretrained folders (as a lab passes them): from_pretrained returns eval-mode
    modules; every dropout of the online model must be in training mode in the training step, and the momentum
    model (run in train mode by the official code) too."""
    vit, bert = save_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8), save_tiny_bert(tmp_path / "bert", layers=4)
    flags = [*_json_data(tmp_path), "--vit", vit, "--text-encoder", bert, "--fusion-layer", "2", "--image-res", "32",
             "--embed-dim", "16", "--queue-size", "16", "--batch-size", "8", "--max-len", "16", "--k-test", "2",
             "--workers", "0", "--max-steps", "2", "--epochs", "1", "--output-dir", tmp_path / "out"]
    with DropoutRecorder() as rec:
        albef.main([str(f) for f in flags])
    online = rec.training_calls()
    assert online and all(training for _, training in online), "online model trained with dropout off"
    ckpt = load_ckpt(tmp_path / "out")
    assert ckpt["step"] == 2
    model_m_calls = [(m, t) for m, t, grad in rec.calls if not grad and t]
    assert len({id(m) for m, _ in model_m_calls}) >= len({id(m) for m, _ in online}) // 2, \
        "momentum model did not run in train mode"
    assert len({id(m) for m, _ in online}) >= 8  # ViT and BERT dropouts (embeddings and every layer) were called


@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile", "aot_eager"]])
def test_bf16_and_compile_run_a_few_steps(tmp_path, flag):
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    albef.main(["--tiny", "--max-steps", "3", "--epochs", "1", "--log-every", "1", "--k-test", "2",
                "--output-dir", str(tmp_path), *flag])
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(log) == 3 and all(torch.isfinite(T(r["loss"])) for r in log)
    if flag[0] == "--compile":  # one graph for the step, recompiled once when alpha starts to ramp (a float
        # marked dynamic after its first change); a host sync or a data-dependent shape would break it
        counters = torch._dynamo.utils.counters
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_retrieval_mode_takes_the_official_config():
    """--mode retrieval: configs/Retrieval_coco.yaml unless a flag is given; given flags always win over presets."""
    a = albef.get_args(["--mode", "retrieval"])
    assert (a.image_res, a.batch_size, a.lr, a.min_lr, a.warmup_lr, a.warmup_steps, a.epochs, a.max_len, a.k_test) == \
        (384, 32, 1e-5, 1e-6, 1e-5, 1, 5, 30, 256)
    assert albef.albef_lr(0, 150, a.lr, a.warmup_lr, a.min_lr, a.warmup_steps, 100, a.epochs) == 1e-5  # flat warm-up
    a = albef.get_args(["--mode", "retrieval", "--epochs=10", "--k-test", "128", "--lr", "1e-4"])  # Flickr
    assert (a.epochs, a.k_test, a.lr, a.image_res) == (10, 128, 1e-4, 384)
    assert albef.get_args(["--tiny", "--epochs", "30"]).epochs == 30  # equal to the default, but given
    assert albef.get_args(["--mode", "retrieval", "--tiny"]).image_res == 32 and albef.get_args([]).image_res == 256
    albef.check_args(albef.get_args(["--mode", "retrieval"]), 8)  # 65536 % (32 x 8) == 0


def test_check_args_at_world_size():
    albef.check_args(albef.get_args([]), 8)  # 65536 % (64 x 8) == 0: the paper's 8-GPU setting
    with pytest.raises(SystemExit, match="not a multiple of the global batch 768"):
        albef.check_args(albef.get_args([]), 12)
    with pytest.raises(SystemExit, match="at least 2"):
        albef.check_args(albef.get_args(["--batch-size", "1"]), 1)


# --- 2. A --tiny run learns ---
def test_tiny_run_learns(tmp_path):
    p = run_script("albef.py", "--tiny", "--output-dir", tmp_path, timeout=600)
    m = read_metrics(tmp_path)
    assert list(m)[:2] == ["r_mean", "r_mean_init"] and "random init" in p.stdout
    assert m["r_mean"] > m["r_mean_init"] + 10 and m["r_mean"] > 2.5 * m["r_mean_init"], m
    assert os.path.exists(tmp_path / "checkpoint.pt") and read_log(tmp_path)[-1]["eval"]["r_mean"] == m["r_mean"]


# --- 3. Two processes agree with one process holding the same global batch ---
def test_two_processes_match_one(tmp_path):
    flags = ("--tiny", "--max-steps", "1", "--log-every", "1")
    run_script("albef.py", *flags, "--batch-size", "16", "--output-dir", tmp_path / "one")
    run_torchrun("albef.py", *flags, "--batch-size", "8", "--output-dir", tmp_path / "two", nproc=2)
    one, two = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "two")
    # the queue holds the all-gathered momentum features of the global batch, in the same order
    assert_tensors_close(one["queue"], two["queue"], atol=1e-5)
    assert one["queue"]["ptr"].item() == 16
    # ALBEF's ITC uses the *local* batch + the shared queue as negatives (official): at step 1 the student equals
    # the momentum model (no dropout in tiny), so the queued features of the one-process run give both losses
    q0 = albef.Queue(32, 64, seed=42)
    v, t = one["queue"]["image"][:, :16].T, one["queue"]["text"][:, :16].T
    tau = T(0.07)

    def itc(v, t):  # alpha = 0 at step 1 (warm-up): one-hot targets
        s_i2t, s_t2i = v @ torch.cat([t, q0.text.T]).T / tau, t @ torch.cat([v, q0.image.T]).T / tau
        hard = torch.eye(len(v), len(v) + 64)
        return albef.itc_loss(s_i2t, s_t2i, hard, hard).item()
    loss_one, loss_two = read_log(tmp_path / "one")[0]["loss_itc"], read_log(tmp_path / "two")[0]["loss_itc"]
    assert loss_one == pytest.approx(itc(v, t), abs=1e-5)
    assert loss_two == pytest.approx((itc(v[:8], t[:8]) + itc(v[8:], t[8:])) / 2, abs=1e-5)  # mean over ranks
    assert_tensors_close(one["queue"]["image"][:, 16:], q0.image[:, 16:])  # the rest is the seeded initial queue


# --- 4. Resume is exact ---
def test_resume_is_exact(tmp_path):
    run_script("albef.py", "--tiny", "--max-steps", "6", "--output-dir", tmp_path / "full")
    run_script("albef.py", "--tiny", "--max-steps", "3", "--output-dir", tmp_path / "split")
    assert load_ckpt(tmp_path / "split")["step"] == 3
    p = run_script("albef.py", "--tiny", "--max-steps", "6", "--output-dir", tmp_path / "split")
    assert "resumed" in p.stdout
    a, b = load_ckpt(tmp_path / "full"), load_ckpt(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for key in ("model", "momentum_model", "queue", "optimizer"):
        assert_tensors_close(a[key], b[key], path=key)


# --- 5. Bad input ---
def test_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"image": "a.jpg", "caption": "x"},\n {"image": "b.jpg" "caption": "y"}\n]\n')
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": "a.jpg", "caption": ["x", "y"]}]))
    ret = tmp_path / "ret.json"
    ret.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]))
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"method": "swav"}, other / "checkpoint.pt")
    cases = [  # (flags, words the one-line error must contain); run in-process: each exits before training
        (["--data", tmp_path / "missing.json", "--eval-data", test], ["missing.json", "not found"]),
        (["--data", bad, "--eval-data", test], ["bad.json:3", "not valid JSON"]),
        (["--data", nokey, "--eval-data", test], ["nokey.json", "entry 1", "caption"]),
        (["--data", empty, "--eval-data", test], ["empty.json", "non-empty"]),
        (["--data", ret, "--eval-data", test], ["a.jpg", "not found", "--image-root"]),
        (["--tiny", "--output-dir", other], ["swav", "not 'albef'"]),
    ]
    for n, (flags, words) in enumerate(cases):
        flags = [str(f) for f in flags] + ([] if "--output-dir" in flags else ["--output-dir", str(tmp_path / f"o{n}")])
        with pytest.raises(SystemExit) as e:
            albef.main(flags)
        assert str(e.value).startswith("error:") and all(w in str(e.value) for w in words), (words, str(e.value))
    # from the command line: non-zero exit, a one-line message, no traceback
    p = run_script("albef.py", "--tiny", "--queue-size", "60", "--output-dir", tmp_path / "q", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stdout
    assert "error: --queue-size 60 is not a multiple of the global batch 16" in p.stdout.strip().splitlines()[-1]
    # pretrained weights that cannot be reached (tests run offline): a clear error naming the alternatives
    p = run_script("albef.py", "--max-steps", "0", "--output-dir", tmp_path / "offline", check=False)
    assert p.returncode != 0 and "--no-pretrained" in p.stdout.strip().splitlines()[-1], p.stdout[-1000:]
    # a checkpoint of another shape, and a NaN loss: one-line errors, the good checkpoint stays untouched
    good = str(tmp_path / "good")
    albef.main(["--tiny", "--max-steps", "1", "--output-dir", good])
    before = open(os.path.join(good, "checkpoint.pt"), "rb").read()
    for flags, words in ((["--embed-dim", "16"], ["does not fit"]),
                         (["--lr", "1e30", "--warmup-lr", "1e30", "--max-steps", "3", "--log-every", "1"],
                          ["loss is", "at step 3", "untouched"])):  # step 2 blows the weights up
        with pytest.raises(SystemExit) as e:
            albef.main(["--tiny", "--output-dir", good, *flags])
        assert all(w in str(e.value) for w in words), str(e.value)
        assert open(os.path.join(good, "checkpoint.pt"), "rb").read() == before



def _albef_grads(world, rank, out):
    """Gradients of one ALBEF step on slice `rank` of `world` of a fixed batch of 8 pairs, through the training
    path (common.distribute: DDP when a process group runs, ALBEF.forward), the hard negatives drawn with a
    seed per slice."""
    torch.set_num_threads(1)
    args = albef.get_args(["--tiny", "--output-dir", str(out)])
    train = albef.synthetic_data(args)[0]
    tok = albef.make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    torch.manual_seed(0)
    model = albef.ALBEF(albef.build_encoders(args, len(tok)), args.temp)
    model_m = common.momentum_copy(model.enc)
    queue = albef.Queue(args.embed_dim, args.queue_size, args.seed)
    ds = albef.PairSet(train, tok, args)
    batch = albef.collate([ds[(i, 1000 + i)] for i in range(8)], pad_id=tok.pad_token_id)
    net = common.distribute(model, torch.device("cpu"))
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    torch.manual_seed(100 + rank)
    itc, itm, mlm, _ = net(*[x[part] for x in batch], alpha=0.4, model_m=model_m, queue=queue, mode="pretrain")
    (itc + itm + mlm).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _albef_grad_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_albef_grads(world, rank, out), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_mean_of_the_per_process_gradients(tmp_path):
    """ITC is local per process by design (official): DDP must give every process the mean of the per-slice
    gradients, which one process computes slice by slice. A gradient off by a constant factor fails."""
    import torch.multiprocessing as mp
    mp.spawn(_albef_grad_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    halves = [_albef_grads(2, r, tmp_path) for r in range(2)]  # this process: no process group, no DDP
    assert set(two[0]) == set(halves[0]) and len(halves[0]) > 20
    for name in halves[0]:
        ref = (halves[0][name] + halves[1][name]) / 2
        for r in range(2):
            err = (two[r][name] - ref).norm()
            assert err <= 1e-4 * ref.norm() + 1e-7, f"{name}: |diff| {err:.3g} vs |grad| {ref.norm():.3g}"


def _retrieval_eval(out):
    """evaluate() of a tiny random ALBEF on 7 test images (35 captions), recording what this process embedded, gathered
    and fused, and the score matrices it ranked."""
    args = albef.get_args(["--tiny", "--workers", "0", "--k-test", "4", "--output-dir", str(out)])
    train, test, _ = albef.synthetic_data(args)
    tok = albef.make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    torch.manual_seed(0)
    model = albef.ALBEF(albef.build_encoders(args, len(tok)), args.temp)
    rec = collections.defaultdict(list)

    def counted(name, fn, rows=lambda a: len(a[0])):
        def wrapper(*a):
            rec[name].append(rows(a))
            return fn(*a)
        return wrapper
    enc, recall, gather = model.enc, albef.recall_at_k, common.concat_all_gather
    for name, fn in (("images", "image"), ("texts", "text"), ("pairs", "fusion")):  # rows embedded, pairs fused
        setattr(enc, fn, counted(name, getattr(enc, fn)))
    albef.recall_at_k = counted("scores", recall, lambda a: (a[0].clone(), a[1].clone()))
    common.concat_all_gather = counted("gathered", gather, lambda a: tuple(a[0].shape[1:]))
    try:
        metrics = albef.evaluate(model, test[:7], tok, args, torch.device("cpu"), "none")
    finally:
        albef.recall_at_k, common.concat_all_gather = recall, gather
    return {"metrics": metrics, **{k: rec[k] if k in ("scores", "gathered") else sum(rec[k]) for k in rec}}


def _eval_worker(rank, world, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_retrieval_eval(out), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_sharded_retrieval_equals_one_process_and_holds_a_shard(tmp_path):
    """Two processes give the one-process score matrices and metrics, while each embeds only its shard of the images
    (4 + 4 of 7, the last repeated) and texts (18 + 18 of 35), gathers no image tokens (only E-dim features, text ids
    and text tokens) and fuses only its share of the top-k pairs (each pair once over both)."""
    import torch.multiprocessing as mp
    mp.spawn(_eval_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(f"{tmp_path}/{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    one = _retrieval_eval(tmp_path)
    assert (one["images"], one["texts"]) == (7, 35) and [(t["images"], t["texts"]) for t in two] == [(4, 18)] * 2
    assert two[0]["pairs"] + two[1]["pairs"] == one["pairs"] and min(t["pairs"] for t in two) > 0
    for t in two:
        assert all(len(s) < 2 or s[0] != 17 for s in t["gathered"]), t["gathered"]  # tokens: 1 + 16 patches
        assert t["metrics"] == pytest.approx(one["metrics"], abs=1e-9), (t["metrics"], one["metrics"])
        for (a, b), (c, d) in zip(t["scores"], one["scores"]):  # re-ranked, then ITC
            assert_tensors_close(a, c, atol=1e-5), assert_tensors_close(b, d, atol=1e-5)


def _official_state_dict(enc, vocab, retrieval=False, seed=0):
    """Random tensors in the key layout and shapes of the released checkpoints (timm ViT, xbert BERT, *_m copies,
    queues), for this file's tiny sizes (width 64, 2 ViT blocks, 4 BERT layers with 2 fusion layers, 32 px)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    d, sd = 64, {}
    for m in ("", "_m"):
        v = f"visual_encoder{m}."
        sd.update({v + "cls_token": r(1, 1, d), v + "pos_embed": r(1, 17, d), v + "patch_embed.proj.weight": r(d, 3, 8, 8),
                   v + "patch_embed.proj.bias": r(d), v + "norm.weight": 1 + r(d), v + "norm.bias": r(d)})
        for n in range(2):
            b = f"{v}blocks.{n}."
            sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                       b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                       b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d),
                       b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
        for k, t in enc.text_encoder.state_dict().items():  # xbert keeps transformers' BERT names
            if retrieval and k.startswith("cls."):
                continue  # the retrieval model's BERT has no MLM head and no 'bert.' prefix
            sd[f"text_encoder{m}." + (k.removeprefix("bert.") if retrieval else k)] = r(*t.shape)
        if not retrieval:  # the decoder is tied to the word embeddings and its bias to the head's bias, as in BERT
            sd[f"text_encoder{m}.cls.predictions.decoder.weight"] = sd[f"text_encoder{m}.bert.embeddings.word_embeddings.weight"]
            sd[f"text_encoder{m}.cls.predictions.decoder.bias"] = sd[f"text_encoder{m}.cls.predictions.bias"]
        for p in ("vision_proj", "text_proj"):
            sd.update({f"{p}{m}.weight": r(32, d), f"{p}{m}.bias": r(32)})
    sd.update({"itm_head.weight": r(2, d), "itm_head.bias": r(2), "temp": torch.tensor(0.05),
               "image_queue": F.normalize(r(32, 64), dim=0), "text_queue": F.normalize(r(32, 64), dim=0),
               "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return sd


def _timm_vit(sd, x, pre="visual_encoder."):
    """The official (timm) ViT forward written from the state dict: pre-norm blocks, fused qkv, eps 1e-6."""
    ln = lambda t, k: F.layer_norm(t, (64,), sd[k + ".weight"], sd[k + ".bias"], 1e-6)  # noqa: E731
    x = F.conv2d(x, sd[pre + "patch_embed.proj.weight"], sd[pre + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([sd[pre + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[pre + "pos_embed"]
    for n in range(2):
        b = f"{pre}blocks.{n}."
        q, k, v = F.linear(ln(x, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(
            len(x), -1, 3, 2, 32).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, pre + "norm")


@pytest.mark.parametrize("layout", ["pretrain", "retrieval"])
def test_released_checkpoints_load(tmp_path, layout):
    """ALBEF.pth / ALBEF_4M.pth (pretraining) and mscoco.pth / flickr30k.pth (retrieval) in the official layout load
    through --init: the image encoder computes what the timm ViT of the state dict computes (q, k, v split right),
    BERT, projections, ITM head, temperature, momentum copies and queues arrive, positions are resized."""
    args = albef.get_args(["--tiny", "--embed-dim", "32", "--queue-size", "64"])
    model = albef.ALBEF(albef.build_encoders(args, 50), args.temp)
    model_m, queue = common.momentum_copy(model.enc), albef.Queue(32, 64, 0)
    sd = _official_state_dict(model.enc, 50, retrieval=layout == "retrieval")
    torch.save({"model": sd, "config": {"image_res": 32}, "epoch": 29}, tmp_path / "ALBEF.pth")
    head = {k: v.clone() for k, v in model.enc.text_encoder.cls.state_dict().items()}
    albef.load_init(str(tmp_path / "ALBEF.pth"), model, model_m, queue, 16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.enc.visual_encoder(pixel_values=x).last_hidden_state, _timm_vit(sd, x),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model_m.visual_encoder(pixel_values=x).last_hidden_state,
                                   _timm_vit(sd, x, "visual_encoder_m."), atol=1e-5, rtol=1e-4)
    bert = "bert.encoder.layer.3.crossattention.self.value.weight"
    src = "text_encoder." + (bert if layout == "pretrain" else bert.removeprefix("bert."))
    assert torch.equal(model.enc.text_encoder.state_dict()[bert], sd[src])
    assert torch.equal(model_m.text_encoder.state_dict()[bert], sd[src.replace("encoder.", "encoder_m.", 1)])
    assert torch.equal(model.enc.vision_proj.weight, sd["vision_proj.weight"]) and model.temp.item() == pytest.approx(0.05)
    assert torch.equal(model_m.text_proj.bias, sd["text_proj_m.bias"]) and torch.equal(model.itm_head.bias, sd["itm_head.bias"])
    assert torch.equal(queue.image, sd["image_queue"]) and torch.equal(queue.text, sd["text_queue"])
    mlm = model.enc.text_encoder.cls.state_dict()
    assert all(torch.equal(mlm[k], sd[f"text_encoder.cls.{k}"] if layout == "pretrain" else head[k])
               for k in head if not k.startswith("predictions.decoder"))  # the decoder is the word embeddings
    model384 = albef.ALBEF(albef.build_encoders(albef.get_args(["--tiny", "--image-res", "48"]), 50), args.temp)
    albef.load_init(str(tmp_path / "ALBEF.pth"), model384, common.momentum_copy(model384.enc), queue, 36)
    assert model384.enc.visual_encoder.embeddings.position_embeddings.shape == (1, 37, 64)  # 4 x 4 -> 6 x 6 patches
    del sd["visual_encoder.blocks.1.attn.qkv.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(SystemExit, match="broken.pth does not fit"):
        albef.load_init(str(tmp_path / "broken.pth"), model, model_m, queue, 16)
