"""CTP: vision-language continual pretraining with compatible momentum contrast and topology preservation.

Paper: "CTP: Towards Vision-Language Continual Pretraining via Compatible Momentum Contrast and Topology
Preservation", Hongguang Zhu, Yunchao Wei, Xiaodan Liang, Chunjie Zhang, Yao Zhao. ICCV 2023, arXiv:2308.07146.
Official code: github.com/KevinLight831/CTP (its losses, momentum update and task protocol are reproduced).

Method. An ALBEF-style model (ViT image encoder, BERT text encoder whose last layers fuse text with image tokens by
cross-attention) is pretrained on a sequence of domains (the 9 industries of P9D), without exemplars. At each task
start the student is frozen into a reference model theta_{t-1}, and the momentum model is re-copied from it and then
updated by a *compatible* EMA that absorbs student and reference alike, so queued momentum features stay compatible
with old knowledge (L_cmc). Topology preservation (L_tp) keeps the student's in-batch image-text, text-image,
image-image and text-text similarity distributions close (KL) to the reference model's. In-batch ITA, MLM and MLM
distillation from the momentum model complete the objective. `--method finetune` is the sequential fine-tuning
lower bound (SeqF: L_ita + L_mlm, nothing kept between tasks but the weights).

Where: the compatible momentum update: `ctp_momentum_update`; L_cmc with queues: `momentum_contrast_loss`,
`dequeue_and_enqueue`; L_ita: `ita_loss`; L_tp: `topology_kl`, `topology_loss`; MLM and L_md: `mask_tokens`,
`mlm_distill_loss`; one step: `ctp_losses`; the task protocol: `main`; R@K, forgetting, BWT: `itm_recall`, `bwt`,
`evaluate`. Inferred (flags or --tiny only): the built-in domains, the tiny model, a vocabulary of the titles when
BERT is built from scratch, the loss weights (--w-*, official 1), --reset-queue (official: off). Not here:
multimodal retrieval (mAP@k), the per-epoch evaluation of the official loop, the replay variant CTP_ER.

Launch:
  python ctp.py --tiny                                     # CPU smoke run: 3 synthetic domains, < 1 minute
  python ctp.py --tiny --method finetune                   # the sequential fine-tuning baseline, same data
  python ctp.py --data /data/P9D --batch-size 128          # one GPU (P9D: train.json, test.json, *_images/)
  torchrun --nproc_per_node=4 ctp.py --data /data/P9D      # official: 4 x 128 = 512, 5 epochs per task
  torchrun --nproc_per_node=8 ctp.py --data /data/P9D --batch-size 64
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 ctp.py \\
      --data /data/P9D --batch-size 32                     # 16 GPUs, the same global batch 512
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torchvision.datasets.folder import pil_loader
from tqdm import tqdm
import transformers
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, ViTConfig, ViTModel

import common

# --- Arguments ---
P9D_TASKS = ("家居用品", "家装家饰", "食品/保健", "美容护理", "服饰鞋包", "车品配件", "母婴", "运动/户外", "3C数码")
SYNTH_TASKS = ("household", "furnishings", "food")
TINY = dict(epochs=5, batch_size=32, lr=1e-3, min_lr=1e-4, workers=0, log_every=10, image_size=32, embed_dim=32,
            queue_size=256, fusion_layer=2, max_words=16, momentum0=0.9)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="CTP (arXiv 2308.07146): continual VLP with compatible momentum "
                                "contrast and topology preservation")
    p.add_argument("--data", default="synthetic", help="'synthetic' (3 built-in domains), or a P9D folder: "
                   "train.json (by industry), test.json, train_images/, gallery_images/")
    p.add_argument("--output-dir", default="runs/ctp")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (official max_epoch 5)")
    p.add_argument("--batch-size", type=int, default=128, help="per process (official: 128 x 4 GPUs = 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr, restarted at every task (official)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42, help="official: 42 + rank")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the student (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps of the whole sequence")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=["ctp", "finetune"], default="ctp", help="ctp: L_ita + L_mlm + L_cmc + L_md "
                   "(+ L_tp from task 2 on); finetune: the SeqF baseline, L_ita + L_mlm")
    m.add_argument("--tasks", default=None, help="comma-separated task (industry) names in training order "
                   "(default: the official P9D order, or the synthetic domains)")
    m.add_argument("--task-order", choices=["default", "reverse"], default="default",
                   help="official base_seqF.yaml / base_seqF_reverse.yaml")
    m.add_argument("--vit", default="facebook/deit-base-patch16-224", help="ViT-B/16 initialised from DeiT-B/16: "
                   "HF name or local dir")
    m.add_argument("--text-encoder", default="bert-base-chinese", help="BERT (weights and tokenizer): HF name or "
                   "local dir; cross-attention layers are newly initialised")
    m.add_argument("--no-pretrained", action="store_true", help="[inferred] ViT-B/16 + BERT-base from scratch with "
                   "a vocabulary of the titles (characters for Chinese): no download")
    m.add_argument("--fusion-layer", type=int, default=6, help="first BERT layer of the fusion encoder (6 text + 6 "
                   "fusion layers)")
    m.add_argument("--image-size", type=int, default=224)
    m.add_argument("--embed-dim", type=int, default=256, help="dim of the projected [CLS] features")
    m.add_argument("--tau", type=float, default=0.07, help="contrastive temperature tau, fixed")
    m.add_argument("--distill-t", type=float, default=1.0, help="MLM distillation temperature T_d")
    m.add_argument("--queue-size", type=int, default=1024, help="queue length K per modality")
    m.add_argument("--momentum0", type=float, default=0.995, help="m of the plain EMA on the first task")
    m.add_argument("--momentum", type=float, default=0.9, help="m of the compatible update on later tasks: "
                   "theta_m <- m theta_m + (1-m)/2 theta + (1-m)/2 theta_{t-1}")
    m.add_argument("--mlm-prob", type=float, default=0.15, help="MLM masking probability")
    m.add_argument("--max-words", type=int, default=30, help="text length in tokens (official max_words)")
    m.add_argument("--k-test", type=int, default=10, help="top-k similarities kept per row for R@K (official)")
    m.add_argument("--min-lr", type=float, default=1e-6, help="end of the per-task cosine")
    for name, what in (("ita", "L_ita"), ("cmc", "L_cmc"), ("tp", "L_tp"), ("mlm", "L_mlm"), ("md", "L_md")):
        m.add_argument(f"--w-{name}", type=float, default=1.0, help=f"[inferred] weight of {what} (official code: 1)")
    m.add_argument("--reset-queue", action="store_true", help="[inferred] re-initialise the queues at each task "
                   "start (official: they carry over)")
    args = p.parse_args(argv)
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if args.tiny:  # tiny values only where the flag was not given explicitly
        for k, v in TINY.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    return args


def task_list(args):
    tasks = args.tasks.split(",") if args.tasks else list(SYNTH_TASKS if args.data == "synthetic" else P9D_TASKS)
    return tasks[::-1] if args.task_order == "reverse" else tasks


def check_args(args, world):
    """Every check that depends on the flags and the number of processes alone (no files)."""
    global_batch = args.batch_size * world
    tasks = task_list(args)
    if len(set(tasks)) != len(tasks) or not all(tasks):
        raise SystemExit(f"error: --tasks {','.join(tasks)} names a task twice or an empty task")
    if args.data == "synthetic" and not set(tasks) <= set(SYNTH_TASKS):
        raise SystemExit(f"error: the synthetic data has the tasks {','.join(SYNTH_TASKS)}; --tasks names others")
    if args.batch_size < 2:
        raise SystemExit("error: --batch-size must be at least 2 (in-batch contrast)")
    if args.method == "ctp" and args.queue_size % global_batch:  # official: an assert, no trimming
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a multiple of the global batch {global_batch} "
                         f"({args.batch_size} x {world} processes); change --batch-size or --queue-size")
    return args


# --- Data ---
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's, as official
COLORS = {"red": (.9, .15, .15), "green": (.15, .75, .25), "blue": (.2, .35, 1.), "yellow": (.95, .9, .15),
          "purple": (.65, .2, .8), "white": (.97, .97, .97)}
SHAPES = ("circle", "square", "triangle", "cross")
BACKDROPS = {"black": (.08, .08, .08), "gray": (.5, .5, .5), "brown": (.45, .28, .12), "pink": (.95, .65, .7)}
# [inferred] each synthetic domain names two of the three attributes of an item and leaves the third as nuisance,
# and has its own background: sequential training on one domain makes the model blind to what the others need.
TITLES = {"household": lambda c, s, b: f"a {c} {s}", "furnishings": lambda c, s, b: f"a {s} on {b}",
          "food": lambda c, s, b: f"a {c} thing on {b}"}


def pre_caption(text, max_words=30):
    """Official cleaning: lower-case, . ! " ( ) * # : ; ~ to spaces, whitespace collapsed, first max_words words."""
    text = re.sub(r"\s+", " ", re.sub(r"[.!\"()*#:;~]", " ", text.lower())).strip()
    return " ".join(text.split(" ")[:max_words])


def render(domain, item, res):
    """An item (colour, shape, backdrop) with the domain's lighting; size, position and noise from the seeded RNGs."""
    c, s, b = item
    yy, xx = torch.meshgrid(torch.arange(res) + .5, torch.arange(res) + .5, indexing="ij")
    k = SYNTH_TASKS.index(domain)
    light = (torch.ones(res, res), .6 + .8 * xx / res, 1 + .25 * torch.randn(res, res))[k]  # the domain's look
    img = torch.tensor(BACKDROPS[b])[:, None, None] * light * random.uniform(.8, 1.2) + .04 * torch.randn(3, res, res)
    r = res * random.uniform(.16, .24)
    cy, cx = res * random.uniform(.3, .7), res * random.uniform(.3, .7)
    dy, dx = yy - cy, xx - cx
    mask = {"circle": dy ** 2 + dx ** 2 <= r * r, "square": (dy.abs() <= .8 * r) & (dx.abs() <= .8 * r),
            "triangle": (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),
            "cross": ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r))}[s]
    img[:, mask] = torch.tensor(COLORS[c])[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_data(args, tasks):
    """P9D-like: per domain, training items (image, title) drawn at random; the test split has one item per title."""
    items = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKDROPS]
    rng = random.Random(args.seed)
    n = 320 if args.tiny else 20000
    train, test = {}, {}
    for d in tasks:
        train[d] = [((d, it), TITLES[d](*it)) for it in rng.choices(items, k=n)]
        by_title = {}
        for it in rng.sample(items, len(items)):
            by_title.setdefault(TITLES[d](*it), it)
        test[d] = [((d, it), title) for title, it in sorted(by_title.items())]
    return train, test


def read_json(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; --data takes a P9D folder (train.json, test.json, "
                         "train_images/, gallery_images/) or synthetic")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(obj, dict) or not obj:
        raise SystemExit(f"error: {path} must hold a non-empty JSON object of items")
    return obj


def load_p9d(args, tasks):
    """train.json {industry: {item_id: {title, ...}}}: iterate industry first (P9D #1/#2); test.json flat
    {item_id: {title, industry_name, ...}}, filtered by industry in file order. -> train, test {task: [(path, title)]}
    """
    root = args.data
    tj, sj = os.path.join(root, "train.json"), os.path.join(root, "test.json")
    train_json, test_json = read_json(tj), read_json(sj)
    train, test = {}, {t: [] for t in tasks}
    for t in tasks:
        if not isinstance(train_json.get(t), dict):
            raise SystemExit(f"error: {tj} has no industry {t!r}; its industries are {','.join(train_json)}; "
                             "fix --tasks")
        train[t] = []
        for item_id, info in train_json[t].items():
            if not isinstance(info, dict) or "title" not in info:
                raise SystemExit(f"error: {tj}: item {item_id} of {t} has no 'title'")
            train[t].append((os.path.join(root, "train_images", f"{item_id}.jpg"), pre_caption(info["title"])))
    for item_id, info in test_json.items():
        if not isinstance(info, dict) or "title" not in info or "industry_name" not in info:
            raise SystemExit(f"error: {sj}: item {item_id} needs 'title' and 'industry_name'")
        if info["industry_name"] in test:
            test[info["industry_name"]].append((os.path.join(root, "gallery_images", f"{item_id}.jpg"),
                                                pre_caption(info["title"])))
    for t in tasks:
        if not test[t]:
            raise SystemExit(f"error: {sj} has no test item of industry {t!r}")
        for path in (train[t][0][0], test[t][0][0]):
            if not os.path.isfile(path):
                raise SystemExit(f"error: image {path} not found; download the P9D images into {root}")
    return train, test


def words(text):
    """[inferred] the vocabulary units of a from-scratch tokenizer: Chinese characters, words and punctuation."""
    return re.findall(r"[\u3400-\u9fff]|\w+|[^\w\s]", text.lower())


def make_tokenizer(args, titles):
    if not (args.tiny or args.no_pretrained):
        try:
            tok = BertTokenizer.from_pretrained(args.text_encoder)
            error = "" if len(tok) > len(tok.all_special_tokens) else "no vocabulary found"
        except OSError as e:
            error = str(e).splitlines()[0]
        if error:
            raise SystemExit(f"error: cannot load the tokenizer of {args.text_encoder!r} ({error}); pass a local "
                             "BERT directory with --text-encoder, or --no-pretrained")
        return tok
    vocab = sorted({w for t in titles for w in words(t)})
    path = os.path.join(args.output_dir, "vocab.txt")
    tmp = f"{path}.tmp{os.getpid()}"  # every rank writes the same file atomically
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocab) + "\n")
    os.replace(tmp, path)
    return BertTokenizer(path)


class RandAugmentOfficial(T.RandAugment):
    """RandAugment(2 ops, magnitude 5 of 10, as the official scale) over the official op list."""
    OPS = {"Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
           "TranslateY", "Rotate"}

    def _augmentation_space(self, num_bins, image_size):
        return {k: v for k, v in super()._augmentation_space(num_bins, image_size).items() if k in self.OPS}


class PairSet(torch.utils.data.Dataset):
    """(uint8 image, ids, attention, MLM ids, MLM labels). Augmentation and mask depend on the sampler's per-sample
    seed only, so resumed and multi-process runs see the same batches. Test sets: a plain index, no augmentation."""

    def __init__(self, items, tok, args, train=True):
        self.items, self.tok, self.args, self.train = items, tok, args, train
        res, bicubic = args.image_size, T.InterpolationMode.BICUBIC
        self.transform = T.Compose([  # official: crop (scale 0.2-1), flip, RandAugment; test: resize
            T.RandomResizedCrop(res, (0.2, 1.0), interpolation=bicubic), T.RandomHorizontalFlip(),
            RandAugmentOfficial(2, 5, 11), T.PILToTensor()] if train else
            [T.Resize((res, res), interpolation=bicubic), T.PILToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, seed = key if self.train else (key, self.args.seed * 1000003 + key)
        image, title = self.items[i]
        a, tok = self.args, self.tok
        with common.seeded(seed):
            # synthetic items are re-rendered (new size, position, lighting and noise) instead of cropped
            image = render(*image, a.image_size) if isinstance(image, tuple) else self.transform(pil_loader(image))
            t = tok(title, padding="max_length", truncation=True, max_length=a.max_words, return_tensors="pt")
            ids, att = t["input_ids"][0], t["attention_mask"][0]
            mlm_ids, labels = mask_tokens(ids, len(tok), tok.mask_token_id, (tok.pad_token_id, tok.cls_token_id),
                                          a.mlm_prob)
        return image, ids, att, mlm_ids, labels


# --- Model ---
def build_model(args, vocab_size):
    """ViT + BERT with cross-attention in layers >= fusion_layer: tiny, from scratch, or pretrained."""
    if args.tiny:  # [inferred] ViT 32 px, patch 8, width 64, depth 2; 2 text + 2 fusion layers; no dropout; init
        # std 0.15: with BERT's 0.02-style init the [CLS] features start almost equal and ITA at the fixed tau 0.07
        # sits on a collapsed plateau for most of the short schedule
        small = dict(hidden_size=64, num_attention_heads=2, intermediate_size=256, initializer_range=0.15)
        vit_cfg = ViTConfig(image_size=args.image_size, patch_size=8, num_hidden_layers=2, qkv_bias=True,
                            layer_norm_eps=1e-6, **small)
        bert_cfg = BertConfig(vocab_size=vocab_size, num_hidden_layers=4, max_position_embeddings=64,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
    else:  # the paper's shapes: ViT-B/16 (DeiT-B) and BERT-base
        vit_cfg = ViTConfig(image_size=args.image_size, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)
        bert_cfg = BertConfig(vocab_size=vocab_size)
    bert_cfg.is_decoder = bert_cfg.add_cross_attention = True  # creates the cross-attention blocks; our own
    transformers.logging.set_verbosity_error()  # forward keeps self-attention bidirectional (ALBEF's xbert)
    if args.tiny or args.no_pretrained:
        common.print0("building the encoders from scratch (random init, no download)")
        vit, bert = ViTModel(vit_cfg, add_pooling_layer=False), BertForMaskedLM(bert_cfg)
    else:
        try:
            vit = ViTModel.from_pretrained(args.vit, add_pooling_layer=False)
            bert = BertForMaskedLM.from_pretrained(args.text_encoder, is_decoder=True, add_cross_attention=True)
        except OSError as e:
            raise SystemExit(f"error: cannot load pretrained weights ({str(e).splitlines()[0]}); pass local "
                             "directories with --vit/--text-encoder, or --no-pretrained to build ViT-B/16 + "
                             "BERT-base from scratch") from None
    for layer in bert.bert.encoder.layer[:args.fusion_layer]:
        del layer.crossattention  # the text encoder has self-attention only
    return CTPModel(vit, bert, args.embed_dim, args.fusion_layer, args.image_size)


def attend(att, x, ctx, mask):
    """One BERT attention block (transformers' parameters) with SDPA, bidirectional; mask (B, 1, 1, Lk) bool."""
    s = att.self
    split = lambda t: t.view(t.shape[0], t.shape[1], s.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(s.query(x)), split(s.key(ctx)), split(s.value(ctx)), attn_mask=mask,
                                         dropout_p=s.dropout.p if att.training else 0.0)
    return att.output(out.transpose(1, 2).flatten(2), x)  # dense, dropout, LayerNorm(residual)


def bert_layer(layer, x, mask, image=None):
    x = attend(layer.attention, x, x, mask)
    if image is not None:  # fusion layers: cross-attention to all image tokens
        x = attend(layer.crossattention, x, image, None)
    return layer.output(layer.intermediate(x), x)


class CTPModel(nn.Module):
    """Student, momentum and reference models alike: ViT, BERT (text + fusion) with its MLM head, projections."""

    def __init__(self, vit, bert, embed_dim, fusion_layer, image_size):
        super().__init__()
        self.visual_encoder, self.text_encoder, self.fusion_layer = vit, bert, fusion_layer
        self.vision_proj = nn.Linear(vit.config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(bert.config.hidden_size, embed_dim)
        self.interpolate = image_size != vit.config.image_size  # e.g. DeiT's 224 positions at another size
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def image(self, x):
        """uint8 (B, 3, H, W), normalised here on the device -> tokens (B, 1+P, D), normalised [CLS] proj (B, E)."""
        x = (x.float() / 255 - self.mean) / self.std
        tokens = self.visual_encoder(pixel_values=x, interpolate_pos_encoding=self.interpolate).last_hidden_state
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)

    def text(self, ids, att):
        """Text encoder (layers < fusion_layer) -> tokens (B, L, D), normalised [CLS] proj (B, E)."""
        x, mask = self.text_encoder.bert.embeddings(input_ids=ids), att[:, None, None, :].bool()
        for layer in self.text_encoder.bert.encoder.layer[:self.fusion_layer]:
            x = bert_layer(layer, x, mask)
        return x, F.normalize(self.text_proj(x[:, 0]).float(), dim=-1)

    def mlm_logits(self, ids, att, img_tokens):
        """The full multimodal pass (text layers, then fusion layers attending to the image), then the MLM head."""
        x, mask = self.text(ids, att)[0], att[:, None, None, :].bool()
        for layer in self.text_encoder.bert.encoder.layer[self.fusion_layer:]:
            x = bert_layer(layer, x, mask, img_tokens)
        return self.text_encoder.cls(x)  # (B, L, V)

    def forward(self, *batch, **kw):
        return ctp_losses(self, *batch, **kw)


class Queue(nn.Module):
    """Momentum features of past batches, one row per feature (K, E), random start normalised, and the pointer."""

    def __init__(self, dim, size, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("text", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, image_feat, text_feat):
        """Enqueue the all-gathered momentum features after the loss (the batch is never its own negative)."""
        for q, keys in ((self.image, image_feat), (self.text, text_feat)):
            ptr = dequeue_and_enqueue(q, self.ptr, common.concat_all_gather(keys))
        self.ptr.copy_(ptr)


# --- Method ---
@torch.no_grad()
def ctp_momentum_update(momentum_model, model, ref_model=None, m=0.995):
    """Task 0: theta_m <- m theta_m + (1-m) theta. Later tasks (compatible momentum update):
    theta_m <- m theta_m + (1-m)/2 theta + (1-m)/2 theta_{t-1}. Every parameter, no buffers (official)."""
    pm, p = list(momentum_model.parameters()), [x.detach() for x in model.parameters()]
    if ref_model is None:
        torch._foreach_lerp_(pm, p, 1.0 - m)
        return
    torch._foreach_mul_(pm, m)
    torch._foreach_add_(pm, p, alpha=(1.0 - m) / 2)
    torch._foreach_add_(pm, list(ref_model.parameters()), alpha=(1.0 - m) / 2)


def dequeue_and_enqueue(queue, ptr, feats):
    """queue (K, E), feats (n, E): rows [ptr, ptr+n) mod K <- feats; returns the new pointer. Requires K % n == 0."""
    n, size = feats.shape[0], queue.shape[0]
    if size % n:
        raise ValueError(f"queue size {size} is not a multiple of the gathered batch {n}")
    rows = (ptr + torch.arange(n, device=queue.device)) % size  # tensor indexing: no host sync
    queue.index_copy_(0, rows, feats.to(queue.dtype))
    return (ptr + n) % size


def ita_loss(img, txt, tau, rank=None):
    """In-batch ITA against the all-gathered batch (gradient through the gather): CE(v W^T / tau, i + B rank),
    both ways, halved. img, txt (B, E) normalised."""
    rank = common.get_rank() if rank is None else rank
    all_img, all_txt = common.all_gather_with_grad(img), common.all_gather_with_grad(txt)  # (N, E)
    y = torch.arange(img.shape[0], device=img.device) + img.shape[0] * rank
    return (F.cross_entropy(img @ all_txt.T / tau, y) + F.cross_entropy(txt @ all_img.T / tau, y)) / 2


def momentum_contrast_loss(img, txt, img_m, txt_m, img_queue, txt_queue, tau):
    """L_cmc: S_i2t = v [w'_1..B; Q_w]^T / tau, S_t2i = w [v'_1..B; Q_v]^T / tau, each (B, B+K), one-hot targets at
    column i (the momentum feature of the same pair, local batch), both CEs halved. Queues (K, E) of rows."""
    y = torch.arange(img.shape[0], device=img.device)
    s_i2t = img @ torch.cat([txt_m, txt_queue]).T / tau
    s_t2i = txt @ torch.cat([img_m, img_queue]).T / tau
    return (F.cross_entropy(s_i2t, y) + F.cross_entropy(s_t2i, y)) / 2


def topology_kl(sim_ref, sim, tau):
    """KL(P_ref || P_cur), batchmean, P = row-softmax(sim / tau). log-softmax + kl_div: entries masked to -1000
    (probability 0) contribute exactly 0, where log(softmax) would give 0 * -inf = NaN."""
    return F.kl_div(F.log_softmax(sim / tau, dim=1), F.softmax(sim_ref / tau, dim=1), reduction="batchmean")


def topology_loss(img, txt, img_ref, txt_ref, tau=0.07, rank=None):
    """L_tp's two halves: l_cross = (KL_i2t + KL_t2i) / 2 and l_intra = (KL_i2i + KL_t2t) / 2 on the all-gathered
    batch (student with gradient, frozen reference without); in the intra-modal sims the self entry (column
    B rank + i) is -1000 in student and reference before dividing by tau. (B, E) normalised inputs."""
    rank = common.get_rank() if rank is None else rank
    all_img, all_txt = common.all_gather_with_grad(img), common.all_gather_with_grad(txt)
    all_img_ref, all_txt_ref = common.concat_all_gather(img_ref), common.concat_all_gather(txt_ref)
    b, n = img.shape[0], all_img.shape[0]
    own = F.one_hot(torch.arange(b, device=img.device) + b * rank, n).bool()  # (B, N)
    l_cross = (topology_kl(img_ref @ all_txt_ref.T, img @ all_txt.T, tau) +
               topology_kl(txt_ref @ all_img_ref.T, txt @ all_img.T, tau)) / 2
    mask = lambda s: s.masked_fill(own, -1000.0)  # noqa: E731
    l_intra = (topology_kl(mask(img_ref @ all_img_ref.T), mask(img @ all_img.T), tau) +
               topology_kl(mask(txt_ref @ all_txt_ref.T), mask(txt @ all_txt.T), tau)) / 2
    return l_cross, l_intra


def mask_tokens(ids, vocab_size, mask_id, special_ids, p=0.15, generator=None):
    """Official MLM masking: Bernoulli(p) per token, never [PAD]/[CLS] ([SEP] may be masked); 80% -> [MASK], half
    of the rest a random id of the whole vocabulary, the rest unchanged. -> (masked ids, labels, -100 elsewhere)."""
    ids, labels = ids.clone(), ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, p), generator=generator).bool()
    for s in special_ids:
        masked &= ids != s
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & masked
    ids[replaced] = mask_id
    rand = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & masked & ~replaced
    ids[rand] = torch.randint(vocab_size, ids.shape, generator=generator)[rand]
    return ids, labels


def mlm_distill_loss(logits, logits_teacher, labels, T=1.0):
    """L_md: mean over masked positions (labels != -100) of -sum_v softmax(z'/T) log_softmax(z/T). Fixed shapes, no
    data-dependent branch: a batch without a masked token gives 0."""
    keep = (labels != -100).float()
    ce = -(F.softmax(logits_teacher.float() / T, -1) * F.log_softmax(logits.float() / T, -1)).sum(-1)
    return (ce * keep).sum() / keep.sum().clamp(min=1)


def ctp_losses(model, image, ids, att, mlm_ids, labels, model_m=None, ref=None, queue=None, tau=0.07, distill_t=1.0):
    """One step (official order) -> ({loss terms}, momentum features to enqueue or None). model_m None: SeqF."""
    img_tok, v = model.image(image)
    w = model.text(ids, att)[1]
    logits = model.mlm_logits(mlm_ids, att, img_tok)  # (B, L, V)
    out, keys = {}, None
    with torch.autocast(v.device.type, enabled=False):  # logits at 1 / tau, log-softmax over queues, KL: fp32
        out["ita"] = ita_loss(v, w, tau)
        out["mlm"] = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    if model_m is not None:
        with torch.no_grad():  # the caller has done the (compatible) momentum update
            img_tok_m, v_m = model_m.image(image)
            w_m = model_m.text(ids, att)[1]
            logits_m = model_m.mlm_logits(mlm_ids, att, img_tok_m)  # the same masked ids, its own image tokens
        with torch.autocast(v.device.type, enabled=False):
            out["cmc"] = momentum_contrast_loss(v, w, v_m, w_m, queue.image, queue.text, tau)
            out["md"] = mlm_distill_loss(logits, logits_m, labels, distill_t)
        keys = (v_m, w_m)
    if ref is not None:
        with torch.no_grad():  # the frozen previous-task model, not the momentum model, is the teacher
            v_r, w_r = ref.image(image)[1], ref.text(ids, att)[1]
        with torch.autocast(v.device.type, enabled=False):
            out["tp"] = sum(topology_loss(v, w, v_r, w_r, tau))
    return out, keys


# --- Evaluation ---
def shard(n):
    """Rows [rank * ceil(n / world), ...) of n, the last repeated to equal sizes, and how many are this process's."""
    per = math.ceil(n / common.get_world_size())
    start = common.get_rank() * per
    return [min(i, n - 1) for i in range(start, start + per)], max(0, min(per, n - start))


@torch.no_grad()
def itm_recall(img, txt, k_test=10, chunk=256):
    """Official itm_eval with one text per image (pair i = image i, text i): TR@1/5/10, IR@1/5/10 (x100) and their
    mean over all images and texts (N, E). Each process ranks its shard of the queries against the whole other side,
    chunk rows at a time (memory chunk x N), each direction in its own top-k score rows (score_matrix_i2t, _t2i)."""
    idx, own = shard(len(img))
    rows, col = torch.tensor(idx[:own], dtype=torch.long, device=img.device), torch.arange(len(img), device=img.device)
    def hits(query, gallery):  # hits at K = 1, 5, 10, summed over processes
        out = torch.zeros(3, dtype=torch.long, device=query.device)
        for q, i in zip(query[rows].split(chunk), rows[:, None].split(chunk)):
            s = keep_topk(q @ gallery.T, k_test)
            p = s.gather(1, i)  # the positive's score; its rank in argsort(descending, stable): ties go first
            rank = (s > p).sum(1) + ((s == p) & (col < i)).sum(1)  # to the lower index
            out += torch.stack([(rank < k).sum() for k in (1, 5, 10)])
        return common.all_reduce_sum(out)
    out = {f"tr{k}": 100.0 * h.item() / len(img) for k, h in zip((1, 5, 10), hits(img, txt))}
    out.update({f"ir{k}": 100.0 * h.item() / len(txt) for k, h in zip((1, 5, 10), hits(txt, img))})
    return {"r_mean": sum(out.values()) / 6, **out}


def keep_topk(sims, k):
    """Official score matrix: the top-k similarities of each row, every other entry -100."""
    top = sims.topk(min(k, sims.shape[1]), dim=1)
    return torch.full_like(sims, -100.0).scatter_(1, top.indices, top.values)


def bwt(so_far, final):
    """eval.py: sum_i (A_i - F_i) / (n - 1), values rounded to 2 decimals first; positive = forgetting."""
    return sum(round(a, 2) - round(f, 2) for a, f in zip(so_far, final)) / max(1, len(final) - 1)


@torch.no_grad()
def evaluate(model, tests, tok, args, device, amp):
    """Cross-modal retrieval (unimodal features, no re-ranking) on each test split and on each union of splits
    0..i (the official cumulative test set). Each process embeds its shard of each split; the (N, E) embeddings are
    gathered. -> (per task, per prefix) metrics (each test image has one title), alike on every process."""
    model = common.unwrap(model)
    training = model.training
    model.eval()
    feats = []
    for items in tests:
        ds = torch.utils.data.Subset(PairSet(items, tok, args, train=False), shard(len(items))[0])
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=args.workers, generator=torch.Generator())
        with common.autocast(device, amp):
            vw = [(model.image(x.to(device))[1].float(), model.text(ids.to(device), att.to(device))[1].float())
                  for x, ids, att, _, _ in loader]
        feats.append([common.concat_all_gather(torch.cat(x))[:len(items)] for x in zip(*vw)])  # the repeats dropped
    model.train(training)
    union = [[torch.cat([f[m] for f in feats[:i + 1]]) for m in (0, 1)] for i in range(len(feats))]
    return [itm_recall(*f, args.k_test) for f in feats], [itm_recall(*f, args.k_test) for f in union]


def heat_map(matrix, path, cell=24):
    """The task-by-task matrix (rows: after task i; columns: test split j; None = not seen, grey) as a PNG, dark blue
    (0) to yellow (100), no plotting library; report() prints the values."""
    img = torch.full((3, len(matrix) * cell, len(matrix) * cell), 0.5)
    for i, row in enumerate(matrix):
        for j, a in enumerate(row):
            if a is not None:
                img[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = (torch.tensor([.2, .2, .6]) + torch.tensor(
                    [.8, .6, -.4]) * a / 100)[:, None, None]
    torchvision.io.write_png((img.clamp(0, 1) * 255).to(torch.uint8), path)


# --- Train ---
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: OpenMP threads only add overhead
    check_args(args, world)
    os.makedirs(args.output_dir, exist_ok=True)
    global_batch, tasks, ctp = args.batch_size * world, task_list(args), args.method == "ctp"
    train, test = synthetic_data(args, tasks) if args.data == "synthetic" else load_p9d(args, tasks)
    tok = make_tokenizer(args, [t for d in tasks for _, t in train[d] + test[d]])
    common.seed_everything(args.seed)  # identical initialisation on every rank
    model = build_model(args, len(tok)).to(device)
    queue = Queue(args.embed_dim, args.queue_size, args.seed).to(device)
    model_m = common.momentum_copy(model) if ctp else None  # task 0: a copy of the initial model
    ref = None
    spe = [len(train[d]) // global_batch for d in tasks]  # steps per epoch of each task
    if min(spe) == 0:
        raise SystemExit(f"error: a task has fewer than {global_batch} training pairs; lower --batch-size")
    ends = [sum(spe[:t + 1]) * args.epochs for t in range(len(tasks))]  # global step at which task t ends
    total = ends[-1] if args.max_steps is None else min(args.max_steps, ends[-1])
    path, step, rows, metrics_init = os.path.join(args.output_dir, "checkpoint.pt"), 0, [], None
    common.seed_everything(args.seed + rank)  # official: seed 42 + rank
    state = common.load_checkpoint(path, "ctp", resume=not args.eval_only)  # after the models: restores the RNG
    if state is not None:
        if state.get("tasks") != tasks or state.get("cl_method") != args.method:
            raise SystemExit(f"error: {path} was trained on the tasks {state.get('tasks')} ({state.get('cl_method')})"
                             f", this run has {tasks} ({args.method}); pass the same --tasks/--task-order/--method "
                             "or another --output-dir")
        if state["ref_model"] is not None:
            ref = common.momentum_copy(model).eval()
        common.restore(state, path, model=model, queue=queue, **({"momentum_model": model_m} if ctp else {}),
                       **({"ref_model": ref} if ref is not None else {}))
        step, rows, metrics_init = state["step"], state["rows"], state["metrics_init"]
        common.print0(f"resumed from {path} at step {step}")
    total = step if args.eval_only else total
    common.print0(f"{args.method} on {len(tasks)} tasks ({', '.join(tasks)}); {sum(map(len, train.values()))} pairs; "
                  f"global batch {global_batch} ({args.batch_size} x {world}); {total} steps, amp {amp}")
    tests = [test[d] for d in tasks]
    if args.tiny and step == 0 and metrics_init is None:
        metrics_init = evaluate(model, tests, tok, args, device, amp)[1][-1]  # the random-init baseline, all tasks
    net = common.distribute(model, device, args.compile)  # DDP, then compile
    optimizer = scaler = None

    def save(t):  # a collective: every rank calls it
        common.save_checkpoint(path, "ctp", step, {
            "args": vars(args), "tasks": tasks, "cl_method": args.method, "task": t, "model": model.state_dict(),
            "momentum_model": model_m.state_dict() if ctp else None, "ref_model": ref and ref.state_dict(),
            "queue": queue.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rows": rows, "metrics_init": metrics_init}, finite=[model])

    t0, seen = time.time(), 0
    for t, name in enumerate(tasks):
        start = ends[t] - spe[t] * args.epochs
        if step >= ends[t] or step >= total:
            continue
        if step == start and t > 0 and ctp:  # task start: freeze the previous-task model, re-copy the momentum
            ref, model_m = common.momentum_copy(model).eval(), common.momentum_copy(model)  # model from it
            if args.reset_queue:
                queue = Queue(args.embed_dim, args.queue_size, args.seed + t).to(device)
        # official: a new AdamW (one lr and weight decay for every tensor) and a restarted cosine for every task
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                      fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        if step > start:  # resumed in the middle of this task
            common.restore(state, path, optimizer=optimizer, scaler=scaler)
        lrs = common.cosine_schedule(args.lr, args.min_lr, ends[t] - start)
        ds = PairSet(train[name], tok, args)
        sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed + 1000 * t)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator())  # own generator: global RNG untouched
        # official mode quirk: the task-0 momentum copy is made before any evaluation and trains in train mode;
        # the later copies (and the reference) are made right after evaluation() and run in eval mode
        model.train()
        if ctp:
            model_m.train(t == 0)
        m = args.momentum0 if t == 0 else args.momentum
        while step < min(ends[t], total):
            epoch, i0 = divmod(step - start, spe[t])
            sampler.set_epoch(epoch, i0)
            bar = tqdm(loader, total=min(spe[t] - i0, total - step), disable=not common.is_main(),
                       desc=f"task {t} {name} epoch {epoch}")
            for batch in bar:
                lr = float(lrs[step - start])
                for g in optimizer.param_groups:
                    g["lr"] = lr
                batch = [x.to(device, non_blocking=True) for x in batch]
                if ctp:
                    ctp_momentum_update(model_m, model, ref, m)  # before the momentum forward (official)
                with common.autocast(device, amp):
                    out, keys = net(*batch, model_m=model_m, ref=ref, queue=queue, tau=args.tau,
                                    distill_t=args.distill_t)
                loss = sum(getattr(args, f"w_{k}") * v for k, v in out.items())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ctp:
                    queue.push(*keys)  # after the loss
                step, seen = step + 1, seen + global_batch
                if step % args.log_every == 0 or step in (total, ends[t]):
                    v = (common.all_reduce_sum(torch.stack([loss, *out.values()]).detach().float()) / world).tolist()
                    if not math.isfinite(v[0]):
                        raise SystemExit(f"error: loss is {v[0]} at step {step}; the last good checkpoint in "
                                         f"{args.output_dir} is untouched; lower --lr or use --amp none")
                    log = {"step": step, "task": t, "epoch": epoch, "loss": v[0], **dict(zip(out, v[1:])), "lr": lr,
                           "samples_per_s": seen / (time.time() - t0)}
                    common.log_jsonl(args.output_dir, log)
                    bar.set_postfix({k: f"{x:.3f}" for k, x in zip(["loss", *out], v)})
                if step == total or step == ends[t]:
                    break
            if step == ends[t]:  # end of the task: evaluate every task seen so far
                per_task, prefix = evaluate(model, tests[:t + 1], tok, args, device, amp)
                rows.append({"step": step, "per_task": per_task, "prefix": prefix})
                common.log_jsonl(args.output_dir, {"step": step, "task": t, "eval": [r["r_mean"] for r in per_task]})
            save(t)  # at every epoch end and when --max-steps stops the run
    begun = len(tasks) if step == 0 else sum(step > e - s * args.epochs for e, s in zip(ends, spe))
    report(args, model, rows, metrics_init, tests[:begun], tasks, tok, step, device, amp)
    common.cleanup_distributed()


def report(args, model, rows, metrics_init, tests, tasks, tok, step, device, amp):
    """Final metrics (headline first), the task-by-task matrix printed and saved as a PNG heat map."""
    if rows and rows[-1]["step"] == step:
        final, done = rows[-1], len(rows) - 1  # tasks learnt before the last one
    else:  # stopped inside a task, --max-steps 0 or --eval-only: the current model on every task begun
        per_task, prefix = evaluate(model, tests, tok, args, device, amp)
        final, done = {"step": step, "per_task": per_task, "prefix": prefix}, len(rows)
    acc = [r["per_task"][k]["r_mean"] for k, r in enumerate(rows)]  # each task right after it was learnt
    fin = [m["r_mean"] for m in final["per_task"]]
    metrics = {"r_mean": final["prefix"][-1]["r_mean"]}  # the final model on the union of all test splits
    if metrics_init is not None:
        metrics["r_mean_init"] = metrics_init["r_mean"]
    metrics["avg_r_mean"] = sum(fin) / len(fin)
    metrics["forgetting"] = sum(acc[k] - fin[k] for k in range(done)) / max(1, done)
    metrics["bwt"] = bwt([r["prefix"][-1]["r_mean"] for r in rows], [p["r_mean"] for p in final["prefix"]])
    metrics.update({k: v for k, v in final["prefix"][-1].items() if k != "r_mean"})
    metrics.update({f"r_mean_{d}": v for d, v in zip(tasks, fin)})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    matrix = [[r["per_task"][j]["r_mean"] if j <= k else None for j in range(len(tasks))] for k, r in enumerate(rows)]
    if common.is_main():
        heat_map(matrix or [[None]], os.path.join(args.output_dir, "matrix.png"))
        w = max(8, *map(len, tasks))
        print(f"{args.method}: r_mean after task (rows) on test split (columns)")
        print(" " * w + "".join(f"{d[:w]:>{w + 1}}" for d in tasks))
        for k, row in enumerate(matrix):
            print(f"{tasks[k]:<{w}}" + "".join(f"{'' if v is None else f'{v:.1f}':>{w + 1}}" for v in row))
        print(" ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        print(f"{args.method}: final r_mean {metrics['r_mean']:.2f}, average over tasks {metrics['avg_r_mean']:.2f}, "
              f"forgetting {metrics['forgetting']:.2f}, BWT {metrics['bwt']:.2f}"
              + (f" (random init {metrics['r_mean_init']:.2f})" if metrics_init is not None else ""))


if __name__ == "__main__":
    main()
