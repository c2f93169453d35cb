"""Boosting Medical Vision-Language Pretraining via Momentum Self-Distillation under Limited Computing Resources.
Phuc Pham, Nhu Pham, Ngoc Quoc Ly. WACV 2026. arXiv 2512.02438. Official code: github.com/phphuc612/MSD (a README).

A medical image-report dual encoder (image encoder, BERT report encoder, 256-d projections, learnable temperature)
trained contrastively with targets softened by its own momentum (EMA) teacher -- contribution (1), momentum
self-distillation -- where the teacher is joined to gradient accumulation so that the contrastive batch truly grows to
A*b pairs at the memory of b -- contribution (2): the teacher encodes every micro-batch of the window first (no grad),
each micro-batch is contrasted against all window keys plus a queue, then one optimizer step, one EMA update and one
enqueue per window. `--accum-mode naive` is the ablation (plain ALBEF: EMA, keys and enqueue per micro-batch).

Only the abstract is public: the loss (ALBEF's momentum-distilled ITC, the EMA as teacher), the window mechanics, the
hyperparameters, the data format and the evaluation are our reconstruction; their flags say [inferred]. Where:
y = alpha softmax(s_m / tau) + (1 - alpha) onehot and L = (H(y_i2t, p_i2t) + H(y_t2i, p_t2i)) / 2 in `soft_targets`,
`itc_loss`, `msd_loss`; the window in `msd_accum_step`; EMA `momentum_update`; queue `dequeue_and_enqueue`; zero-shot
prompt AUC, few-shot linear probe and image-report R@K under Evaluation.

Real data, --data DIR: DIR/train.jsonl|csv and DIR/test.jsonl|csv, rows {"image": path relative to DIR or absolute,
"caption": report, "labels": [0/1 per class]} (CSV: columns image, caption[, labels as "0 1 0"]). An optional
DIR/prompts.json {"class": ["prompt", ...], ...} (label order) adds zero-shot and probe AUC; rows then need labels.

  python msd.py --tiny                                   # CPU smoke run, built-in synthetic x-rays, < 1 min
  python msd.py --data /data/cxr                         # one GPU: ResNet-50 + Bio_ClinicalBERT, b=32 x A=4
  torchrun --nproc_per_node=8 msd.py --data /data/cxr
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 msd.py --data /data/cxr
"""
import argparse
import collections
import contextlib
import csv
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import transformers
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from tqdm import tqdm

import common

# --- Arguments ---
TINY = dict(epochs=12, batch_size=16, lr=2e-3, workers=0, log_every=10, accum_steps=2, queue_size=64, embed_dim=32,
            image_encoder="cnn_tiny", image_size=32, no_pretrained=True, text_width=64, text_layers=2, dropout=0.0,
            max_len=32, text_pool="mean", probe_fractions=[0.1, 1.0])


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="MSD: momentum self-distillation with window-consistent accumulation")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder with train/test .jsonl|.csv")
    p.add_argument("--output-dir", default="runs/msd")
    p.add_argument("--epochs", type=int, default=30, help="[inferred, ALBEF]")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch b per process [inferred]")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak lr, no scaling rule [inferred, ALBEF]")
    p.add_argument("--weight-decay", type=float, default=0.02, help="none on biases and norms [inferred, ALBEF]")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --output-dir (or init)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps; 0 = init")
    p.add_argument("--tiny", action="store_true", help="small model+data, short run; 1 thread unless OMP_NUM_THREADS; "
                   "a scratch BERT unless --text-model is given")
    p.add_argument("--log-every", type=int, default=50)
    g = p.add_argument_group("method")
    g.add_argument("--accum-mode", choices=["window", "naive"], default="window", help="window: one teacher key set, "
                   "EMA and enqueue per optimizer step (contribution 2, our reading [inferred]); naive: ablation")
    g.add_argument("--accum-steps", type=int, default=4, help="A, micro-batches per optimizer step [inferred]")
    g.add_argument("--queue-size", type=int, default=4096, help="Q, a multiple of A*b*world; 0: none [inferred]")
    g.add_argument("--momentum", type=float, default=0.995, help="m of the EMA teacher [inferred, ALBEF]")
    g.add_argument("--alpha", type=float, default=0.4, help="alpha, weight of the teacher targets [inferred, ALBEF]")
    g.add_argument("--alpha-warmup-epochs", type=float, default=1.0, help="linear alpha ramp [inferred, ALBEF]")
    g.add_argument("--temp", type=float, default=0.07, help="initial learnable temperature tau [inferred, ALBEF]")
    g.add_argument("--temp-range", type=float, nargs=2, default=[0.001, 0.5], metavar=("MIN", "MAX"),
                   help="tau clamp [inferred, ALBEF]")
    g.add_argument("--embed-dim", type=int, default=256, help="projection size [inferred]")
    g.add_argument("--intra-modal-distill", action="store_true", help="add i2i and t2t distilled terms [inferred]")
    g.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine lr schedule [inferred]")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up from --min-lr [inferred]")
    g.add_argument("--image-encoder", choices=["resnet50", "vit_b16", "cnn_tiny"], default="resnet50",
                   help="torchvision backbone with ImageNet weights unless --no-pretrained [inferred]")
    g.add_argument("--image-size", type=int, default=224, help="[inferred]")
    g.add_argument("--text-model", default="emilyalsentzer/Bio_ClinicalBERT", help="BERT name or local path [inferred]")
    g.add_argument("--no-pretrained", action="store_true", help="scratch encoders, word tokenizer from the reports")
    g.add_argument("--text-width", type=int, default=768, help="BERT width with --no-pretrained (base: 768)")
    g.add_argument("--text-layers", type=int, default=12, help="BERT depth with --no-pretrained (base: 12)")
    g.add_argument("--text-pool", choices=["cls", "mean"], default="cls", help="report embedding: [CLS] (ALBEF) or "
                   "token mean (--tiny: a scratch BERT's [CLS] barely depends on the text at init) [inferred]")
    g.add_argument("--dropout", type=float, default=None,
                   help="BERT hidden/attention dropout; default: the pretrained config's, 0.1 from scratch")
    g.add_argument("--max-len", type=int, default=128, help="report tokens [inferred]")
    g.add_argument("--zero-shot-score", choices=["centered", "cosine"], default="centered",
                   help="cosine to the class prompts minus its mean over classes, or raw [inferred]")
    g.add_argument("--probe-fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="fractions of the labelled training rows given to the linear probe [inferred]")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}  # flags given on the command line win over the preset
    if "text_model" in given:  # a --text-model given with --tiny (a local folder) is loaded, with its own dropout
        given |= {"no_pretrained", "dropout"}
    for k, v in TINY.items() if args.tiny else ():
        if k not in given:
            setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check that depends on the flags and the world size alone; touches no file."""
    if args.accum_steps < 1 or args.batch_size < 1:
        raise SystemExit("error: --accum-steps and --batch-size must be at least 1")
    window = args.accum_steps * args.batch_size * world  # pairs per optimizer step, enqueued at once
    if args.queue_size % window:
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a multiple of the window of {window} pairs "
                         f"(--accum-steps {args.accum_steps} x --batch-size {args.batch_size} x {world} processes); "
                         "change one")
    lo, hi = args.temp_range
    if not 0 < lo <= args.temp <= hi:
        raise SystemExit(f"error: --temp {args.temp} must lie in --temp-range {lo} {hi} (0 < MIN <= MAX)")
    if not all(0 < f <= 1 for f in args.probe_fractions):
        raise SystemExit("error: --probe-fractions must lie in (0, 1]")
    return args


# --- Data ---
CLASSES = ("opacity", "nodule", "effusion", "cardiomegaly", "pneumothorax")
REPORT = {"opacity": "{size} opacity in the {side} {zone} zone.", "nodule": "nodule in the {side} {zone} zone.",
          "effusion": "{size} {side} pleural effusion.", "cardiomegaly": "the heart is enlarged.",
          "pneumothorax": "{side} apical pneumothorax."}
NEGATION = {"effusion": "no pleural effusion.", "cardiomegaly": "heart size is normal.",
            "pneumothorax": "no pneumothorax."}
LUNG_X = {"right": 0.3, "left": 0.7}  # radiological convention: the patient's left is on the image's right
ZONE_Y = {"upper": 0.34, "lower": 0.6}


def synthetic_case(i):
    """Findings and report of synthetic case i, a deterministic function of i: each class present w.p. 0.3."""
    rng = random.Random(i)
    findings, sentences = [], []
    for c in CLASSES:
        if rng.random() < 0.3:
            f = dict(cls=c, side=rng.choice(["left", "right"]), size=rng.choice(["small", "large"]),
                     zone={"effusion": "lower", "pneumothorax": "upper"}.get(c, rng.choice(["upper", "lower"])),
                     dx=rng.uniform(-0.04, 0.04), dy=rng.uniform(-0.04, 0.04))
            findings.append(f)
            sentences.append(REPORT[c].format(**f))
        elif c in NEGATION and rng.random() < 0.5:
            sentences.append(NEGATION[c])
    if not findings:
        sentences.insert(0, "no acute cardiopulmonary abnormality.")
    return findings, " ".join(sentences)


def synthetic_prompts():
    """Zero-shot prompts per class: the report phrase over every size/side/zone (a GLoRIA/MedCLIP-style ensemble)."""
    combos = list(itertools.product(["small", "large"], ["left", "right"], ["upper", "lower"]))
    return {c: sorted({REPORT[c].rstrip(".").format(size=s, side=d, zone=z) for s, d, z in combos}) for c in CLASSES}


def draw_case(findings, i, size):
    """A grey 'chest x-ray', a PIL image S x S: body, dark lungs, heart, then the findings at their places.
    Findings are small local patterns, while exposure, patient position, heart size and background texture vary
    from image to image, so that a random network's features separate them poorly (the probe measures what
    pre-training learnt: probe AUC 0.70 at init, 0.91 after --tiny)."""
    g = torch.Generator().manual_seed(i)
    r = torch.rand(5, generator=g).tolist()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    xx, yy = xx - 0.08 * (r[0] - 0.5), yy - 0.08 * (r[1] - 0.5)  # patient position
    smooth = F.interpolate(torch.rand(2, 1, 5, 5, generator=g), size=(size, size), mode="bilinear")[:, 0]
    ellipse = lambda cx, cy, rx, ry: ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1  # noqa: E731
    blob = lambda cx, cy, s: torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))  # noqa: E731
    lungs = {side: ellipse(x, 0.48, 0.16, 0.3) for side, x in LUNG_X.items()}
    img = torch.where(lungs["left"] | lungs["right"], 0.2 + 0.15 * smooth[1], 0.5 + 0.15 * smooth[0])
    big = any(f["cls"] == "cardiomegaly" for f in findings)
    heart = (0.15 if big else 0.11) + 0.03 * r[2]  # normal hearts vary; enlarged ones are larger than all of them
    img = torch.where(ellipse(0.56, 0.68, heart, 0.7 * heart), 0.6 + 0.2 * smooth[0], img)
    for f in findings:
        x, y, lung = LUNG_X[f["side"]] + f["dx"], ZONE_Y[f["zone"]] + f["dy"], lungs[f["side"]]
        if f["cls"] == "opacity":
            img = img + 0.4 * blob(x, y, 0.07 if f["size"] == "large" else 0.045)
        elif f["cls"] == "nodule":
            img = img + 0.6 * blob(x, y, 0.03)
        elif f["cls"] == "effusion":
            img = torch.where(lung & (yy > (0.62 if f["size"] == "large" else 0.7)), img + 0.4, img)
        elif f["cls"] == "pneumothorax":
            img = torch.where(lung & (yy < 0.36), 0.6 * img, img)
    img = (0.9 + 0.2 * r[3]) * img + 0.08 * (r[4] - 0.5)  # exposure: gain and offset
    img = (img + 0.04 * torch.randn(size, size, generator=g)).clamp(0, 1)
    return v2.functional.to_pil_image((img * 255).round().to(torch.uint8))  # mode L, as a real grey image


def augment(img, seed):
    """Mild geometry and exposure jitter [inferred]; never a flip, since reports name the side. PIL ops on the grey
    image (cheaper than on float tensors), from a private generator seeded by the sampler's (seed, epoch, index)
    seed: exact resume and the same global batch on any number of processes; the global RNG is left untouched."""
    rng, size = random.Random(seed), img.width
    img = v2.functional.affine(img, angle=rng.uniform(-5, 5), scale=rng.uniform(0.95, 1.05), shear=[0.0, 0.0],
                               translate=[round(rng.uniform(-0.04, 0.04) * size) for _ in range(2)])
    img = v2.functional.adjust_brightness(img, rng.uniform(0.8, 1.2))
    return v2.functional.adjust_contrast(img, rng.uniform(0.8, 1.2))


def load_grey(path, size):
    """An image file -> grey S x S PIL image, decoded once and straight to grey (libjpeg's own conversion), then an
    antialiased bilinear resize of the uint8 tensor."""
    img = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.GRAY)
    return v2.functional.to_pil_image(v2.functional.resize(img, [size, size], antialias=True))


class Pairs(Dataset):
    """(grey image (1, S, S) uint8, normalised on the device, report, multi-hot labels); `texts`: the reports."""

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, key):  # the sampler's (index, sample seed), or a plain index in evaluation
        index, seed = key if isinstance(key, tuple) else (key, 0)
        img, report, labels = self.load(index)  # a grey PIL image S x S
        return v2.functional.pil_to_tensor(augment(img, seed) if self.augment else img), report, labels


class SyntheticXray(Pairs):
    """Built-in data: image, report and labels are deterministic functions of the case index."""

    def __init__(self, n, offset, size, augment):
        self.offset, self.size, self.augment = offset, size, augment
        self.cases = [synthetic_case(offset + i) for i in range(n)]
        self.texts = [report for _, report in self.cases]

    def load(self, index):
        findings, report = self.cases[index]
        labels = torch.tensor([float(any(f["cls"] == c for f in findings)) for c in CLASSES])
        return draw_case(findings, self.offset + index, self.size), report, labels


class ReportDataset(Pairs):
    """Real data: rows (image path, report, labels or None), images read as grey S x S."""

    def __init__(self, rows, size, augment):
        self.rows, self.size, self.augment = rows, size, augment
        self.texts = [caption for _, caption, _ in rows]

    def load(self, index):
        path, caption, labels = self.rows[index]
        return load_grey(path, self.size), caption, torch.tensor(labels or [], dtype=torch.float)


def read_rows(path, n_classes):
    """Rows of a .jsonl or .csv split; one-line errors name the file and line."""
    root, records = os.path.dirname(path), []
    with open(path, newline="") as f:
        if path.endswith(".jsonl"):
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((ln, json.loads(line)))
                    except json.JSONDecodeError:
                        raise SystemExit(f"error: {path}:{ln}: not valid JSON; write one object per line") from None
        else:
            records = list(enumerate(csv.DictReader(f), 2))
    rows = []
    for ln, r in records:
        if not isinstance(r, dict) or not r.get("image") or r.get("caption") is None:
            raise SystemExit(f"error: {path}:{ln}: needs the keys/columns 'image' and 'caption'")
        labels = r["labels"].split() if isinstance(r.get("labels"), str) else r.get("labels")  # CSV: "0 1 0"
        if n_classes and (not isinstance(labels, list) or len(labels) != n_classes):
            raise SystemExit(f"error: {path}:{ln}: 'labels' needs {n_classes} 0/1 values, one per prompts.json class")
        image = os.path.join(root, r["image"])
        if not os.path.isfile(image):
            raise SystemExit(f"error: {path}:{ln}: image {image} not found")
        rows.append((image, str(r["caption"]), [float(v) for v in labels] if n_classes else None))
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    return rows


def build_data(args):
    """(train, train without augmentation, test, {class: prompts}) for 'synthetic' or a data folder."""
    if args.data == "synthetic":
        (n, n_test), s = (512, 256) if args.tiny else (20000, 2000), args.image_size
        return (SyntheticXray(n, 0, s, True), SyntheticXray(n, 0, s, False), SyntheticXray(n_test, 10 ** 6, s, False),
                synthetic_prompts())
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: --data {args.data} is not a folder; pass 'synthetic' or a folder with "
                         "train.jsonl|csv and test.jsonl|csv")
    prompts, path = {}, os.path.join(args.data, "prompts.json")
    if os.path.exists(path):
        with open(path) as f:
            try:
                prompts = json.load(f)
            except json.JSONDecodeError:
                prompts = None
        if not isinstance(prompts, dict) or not all(isinstance(v, list) and v for v in prompts.values()):
            raise SystemExit(f"error: {path} must be a JSON object mapping each class to a non-empty list of prompts")

    def split(name):
        for ext in ("jsonl", "csv"):
            if os.path.exists(os.path.join(args.data, f"{name}.{ext}")):
                return read_rows(os.path.join(args.data, f"{name}.{ext}"), len(prompts))
        raise SystemExit(f"error: {args.data} has no {name}.jsonl or {name}.csv; see the docstring of msd.py")

    train, test = split("train"), split("test")
    return (ReportDataset(train, args.image_size, True), ReportDataset(train, args.image_size, False),
            ReportDataset(test, args.image_size, False), prompts)


class WordTokenizer:
    """Word-level tokenizer over a vocabulary built from the training reports, called like a transformers tokenizer:
    needs no download (--no-pretrained, --tiny, tests). Ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3."""

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def words(text):
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def build(cls, texts):
        counts = collections.Counter(w for t in texts for w in cls.words(t))
        return cls(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(counts, key=lambda w: (-counts[w], w)))

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, max_length, **_):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            tokens = [2] + [self.index.get(w, 1) for w in self.words(t)][:max_length - 2] + [3]
            ids[i, :len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def from_hub(cls, args, **kw):
    """A transformers tokenizer or model by name or local path, with a one-line error when it is not reachable."""
    try:
        return cls.from_pretrained(args.text_model, **kw)
    except OSError as e:
        raise SystemExit(f"error: cannot load --text-model {args.text_model} ({type(e).__name__}); pass a local "
                         "path, or --no-pretrained to build the same architecture from scratch") from None


class Collate:
    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, batch):
        images, texts, labels = zip(*batch)
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return torch.stack(images), tok["input_ids"], tok["attention_mask"], torch.stack(labels)


# --- Model ---
class MSDModel(nn.Module):
    """Dual encoder: image backbone -> vision_proj, BERT [CLS] (or token mean) -> text_proj, L2-normalised; tau."""

    def __init__(self, visual, visual_dim, text, embed_dim, temp, temp_range, text_pool="cls"):
        super().__init__()
        self.visual, self.text, self.temp_range, self.text_pool = visual, text, temp_range, text_pool
        self.vision_proj = nn.Linear(visual_dim, embed_dim)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def image_features(self, x):
        """(B, 1, S, S) uint8 grey, normalised here on the device -> backbone features (B, F), embeddings (B, D)."""
        x = (x.float().div(255).expand(-1, 3, -1, -1) - self.mean) / self.std  # grey into an ImageNet backbone
        h = self.visual(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x)
        return h, F.normalize(self.vision_proj(h), dim=-1)

    def encode_text(self, ids, mask):
        h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, W)
        # [CLS], or the mean over real tokens: informative even in a BERT trained from scratch
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) if self.text_pool == "mean" else h[:, 0]
        return F.normalize(self.text_proj(h), dim=-1)

    def forward(self, images, ids, mask):
        return self.image_features(images)[1], self.encode_text(ids, mask), self.temp


def cnn_tiny(size, width=64):
    """--tiny image encoder: three stride-2 convolutions with GroupNorm (no BatchNorm, so a window equals one big
    batch exactly and every process computes the same), flattened so that the finding's location survives."""
    layers, c = [], 3
    for out in (32, width, width):
        layers += [nn.Conv2d(c, out, 3, 2, 1), nn.GroupNorm(8, out), nn.ReLU()]
        c, size = out, (size + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, width))


def build_model(args, vocab_size):
    pretrained = not args.no_pretrained
    if args.image_encoder == "cnn_tiny":
        visual, dim = cnn_tiny(args.image_size), 64
    else:
        name = {"resnet50": "resnet50", "vit_b16": "vit_b_16"}[args.image_encoder]
        kw = {"image_size": args.image_size} if name == "vit_b_16" and not pretrained else {}
        try:
            visual = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
        except Exception as e:
            raise SystemExit(f"error: cannot load ImageNet weights for {name} ({type(e).__name__}); put them in "
                             "$TORCH_HOME/hub/checkpoints or pass --no-pretrained") from None
        if name == "resnet50":
            dim, visual.fc = visual.fc.in_features, nn.Identity()
        else:  # ViT: the [CLS] token after the final LayerNorm
            dim, visual.heads = visual.hidden_dim, nn.Identity()
    if pretrained:
        kw = {} if args.dropout is None else dict(hidden_dropout_prob=args.dropout,
                                                   attention_probs_dropout_prob=args.dropout)
        text = from_hub(transformers.AutoModel, args, add_pooling_layer=False, **kw)
    else:
        w = args.text_width
        cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=w, num_hidden_layers=args.text_layers,
                                      num_attention_heads=max(2, w // 64), intermediate_size=4 * w,
                                      max_position_embeddings=max(512, args.max_len),
                                      hidden_dropout_prob=0.1 if args.dropout is None else args.dropout,
                                      attention_probs_dropout_prob=0.1 if args.dropout is None else args.dropout)
        text = transformers.BertModel(cfg, add_pooling_layer=False)
    return MSDModel(visual, dim, text, args.embed_dim, args.temp, tuple(args.temp_range), args.text_pool)


# --- Method ---
def momentum_update(teacher, student, m):
    """theta_m <- m theta_m + (1 - m) theta: the self-distillation teacher is the student's EMA."""
    common.ema_update_(teacher, common.unwrap(student), m)


@torch.no_grad()
def dequeue_and_enqueue(queue, ptr, keys):
    """Overwrite the oldest B columns of queue (D, Q) with keys (B, D) from column ptr on; returns (ptr + B) % Q."""
    size = queue.shape[1]
    if size == 0:
        return ptr
    queue[:, (ptr + torch.arange(keys.shape[0], device=queue.device)) % size] = keys.t().to(queue.dtype)
    return (ptr + keys.shape[0]) % size


class FeatureQueue(nn.Module):
    """Ring buffers of past teacher image and text embeddings, (D, Q) each, with a write pointer and a fill count
    kept on the host (no GPU sync; saved in the state dict as extra state)."""

    def __init__(self, dim, size):
        super().__init__()
        self.register_buffer("image", torch.zeros(dim, size))
        self.register_buffer("text", torch.zeros(dim, size))
        self.ptr = self.filled = 0

    def keys(self, image_keys, text_keys):
        """[window keys ; filled queue]: (N + filled, D) per modality. Slots not yet written are left out [inferred;
        ALBEF fills them with random unit vectors, which at tau = 0.07 dominate the softmax and collapse short runs]."""
        return (torch.cat([image_keys, self.image[:, :self.filled].t()]),
                torch.cat([text_keys, self.text[:, :self.filled].t()]))

    @torch.no_grad()
    def enqueue_(self, image_keys, text_keys):
        dequeue_and_enqueue(self.text, self.ptr, text_keys)
        self.ptr = dequeue_and_enqueue(self.image, self.ptr, image_keys)
        self.filled = min(self.image.shape[1], self.filled + image_keys.shape[0])

    def get_extra_state(self):
        return {"ptr": self.ptr, "filled": self.filled}

    def set_extra_state(self, state):
        self.ptr, self.filled = state["ptr"], state["filled"]


def diag_targets(b, n_cols, offset=0, device=None):
    """One-hot (b, n_cols) with row r's positive at column offset + r, the teacher key of its own pair. Not
    fill_diagonal_: micro-batch j of a window finds its keys at offset j*b, not at 0."""
    t = torch.zeros(b, n_cols, device=device)
    t[torch.arange(b), offset + torch.arange(b)] = 1.0
    return t


def soft_targets(sim_m, hard, alpha):
    """Momentum self-distillation targets: alpha * softmax(teacher sims) + (1 - alpha) * hard (rows sum to 1)."""
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i):
    """(H(y_i2t, p_i2t) + H(y_t2i, p_t2i)) / 2, soft cross-entropy averaged over rows, in fp32."""
    l_i2t = -(tgt_i2t * F.log_softmax(sim_i2t.float(), dim=1)).sum(1).mean()
    l_t2i = -(tgt_t2i * F.log_softmax(sim_t2i.float(), dim=1)).sum(1).mean()
    return (l_i2t + l_t2i) / 2


def alpha_at(epoch, it, iters_per_epoch, alpha, warmup_epochs=1.0):
    """alpha ramped linearly from 0 over the first warmup_epochs (ALBEF's warm-up) [inferred]."""
    done = (epoch * iters_per_epoch + it) / (warmup_epochs * iters_per_epoch) if warmup_epochs > 0 else 1.0
    return alpha * min(1.0, done)


def msd_loss(v, t, keys_img, keys_txt, temp, alpha, offset, intra=False):
    """Student embeddings v, t (b, D) against keys (N, D) = [teacher window ; queue]; the teacher embeddings of the
    same pairs are the keys at rows offset..offset+b. Returns (loss, {term: value})."""
    hard = diag_targets(v.shape[0], keys_img.shape[0], offset, v.device)
    rows = slice(offset, offset + v.shape[0])
    pairs = [(v, keys_txt, keys_img[rows]), (t, keys_img, keys_txt[rows])]  # i2t, t2i
    if intra:
        pairs += [(v, keys_img, keys_img[rows]), (t, keys_txt, keys_txt[rows])]  # i2i, t2t
    sims, targets = [], []
    for q, k, q_m in pairs:
        sims.append(q.float() @ k.t() / temp)  # (b, N)
        with torch.no_grad():
            targets.append(soft_targets(q_m @ k.t() / temp, hard, alpha))
    terms = {"loss_itc": itc_loss(sims[0], sims[1], targets[0], targets[1])}
    if intra:
        terms["loss_intra"] = itc_loss(sims[2], sims[3], targets[2], targets[3])
    return sum(terms.values()), terms


def msd_accum_step(student, teacher, micro_batches, opt, queue, alpha, m, mode="window", intra=False, scaler=None,
                   amp=contextlib.nullcontext):
    """One optimizer step over a window of A micro-batches [(images, ids, mask), ...] of b pairs per process.

    window (contribution 2): the teacher encodes the whole window first, keys are gathered over processes in global
    sample order, micro-batch j of rank k finds its positives at columns k*A*b + j*b + r, and every micro-batch is
    contrasted against all A*b*world window keys + queue; loss / A is back-propagated per micro-batch (memory of b),
    then one optimizer step, one EMA update, one enqueue. The summed gradient equals that of one batch of A*b.
    naive (ablation): per micro-batch EMA update, teacher pass, keys of that micro-batch only, enqueue.
    Returns the window means of the loss terms as detached tensors (no host sync)."""
    model, A, b = common.unwrap(student), len(micro_batches), micro_batches[0][0].shape[0]
    rank, world = common.get_rank(), common.get_world_size()
    with torch.no_grad():
        model.temp.clamp_(*model.temp_range)  # ALBEF clamps tau in place at every step

    def teacher_keys(batches):  # (n*world, D) per modality, fp32, no gradient
        with torch.no_grad(), amp():
            kv = torch.cat([teacher.image_features(x)[1] for x, _, _ in batches]).float()
            kt = torch.cat([teacher.encode_text(i, mk) for _, i, mk in batches]).float()
        return common.concat_all_gather(kv), common.concat_all_gather(kt)

    if mode == "window":
        kv, kt = teacher_keys(micro_batches)
        keys = queue.keys(kv, kt)
    stats = collections.defaultdict(float)
    for j, (x, ids, mask) in enumerate(micro_batches):
        if mode == "naive":
            momentum_update(teacher, model, m)  # ALBEF: EMA before the teacher pass of every forward
            kv, kt = teacher_keys([(x, ids, mask)])
            keys = queue.keys(kv, kt)
        offset = rank * A * b + j * b if mode == "window" else rank * b
        sync = contextlib.nullcontext() if j == A - 1 or not hasattr(student, "no_sync") else student.no_sync()
        with sync:
            with amp():
                v, t, temp = student(x, ids, mask)
            loss, terms = msd_loss(v, t, keys[0], keys[1], temp, alpha, offset, intra)
            (scaler.scale(loss / A) if scaler else loss / A).backward()
        if mode == "naive":
            queue.enqueue_(kv, kt)
        for k, val in {"loss": loss, **terms}.items():
            stats[k] = stats[k] + val.detach() / A
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if mode == "window":
        momentum_update(teacher, model, m)
        queue.enqueue_(kv, kt)
    return dict(stats)


# --- Evaluation ---
def binary_auc(scores, labels):
    """AUC-ROC by the Mann-Whitney U statistic with average ranks for ties; nan when a class is absent."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first + (counts + 1) / 2)[inv]  # 1-based average rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def zero_shot_logits(img_feats, class_text_feats, center=True):
    """(N, C) cosine similarity of normalised image embeddings to each class's normalised mean prompt embedding,
    by default centred on the image's mean over classes [inferred]: all prompts are report-like, so an image's
    cosines to them share a large image-specific part that ranking one class across images must not see (the
    argmax over classes is unchanged)."""
    sim = img_feats @ class_text_feats.t()
    return sim - sim.mean(1, keepdim=True) if center else sim


def recall_at_k(sim, pos, ks=(1, 5, 10)):
    """Image->report (i2t) and report->image (t2i) R@K in %, from sim (N_img, N_txt) and the ground-truth mask pos.
    A query's rank counts the non-positives scored at least as high as its best positive (ties count against it)."""
    out = {}
    for name, s, p in (("i2t", sim, pos), ("t2i", sim.t(), pos.t())):
        best = s.masked_fill(~p, -math.inf).max(1, keepdim=True).values
        rank = ((s >= best) & ~p).sum(1)
        out.update({f"{name}_r{k}": 100.0 * (rank < k).float().mean().item() for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def linear_probe_auc(x_train, y_train, x_test, y_test, l2=1e-3, iters=100):
    """Few-shot probe: one logistic regression per class on frozen, standardised backbone features (L-BFGS),
    scored by the mean test AUC over classes [inferred protocol]."""
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False) + 1e-6
    x, xt = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x.shape[1], y_train.shape[1], requires_grad=True)
    b = torch.zeros(y_train.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    scores = (xt @ w + b).detach()
    return float(np.nanmean([binary_auc(scores[:, c], y_test[:, c]) for c in range(y_test.shape[1])]))


@torch.no_grad()
def encode(model, ds, collate, device, amp, batch_size=256):
    out = collections.defaultdict(list)
    for images, ids, mask, labels in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        with common.autocast(device, amp):
            h, v = model.image_features(images.to(device))
            t = model.encode_text(ids.to(device), mask.to(device))
        for k, x in (("h", h), ("v", v), ("t", t), ("labels", labels)):
            out[k].append(x.float().cpu())
    return {k: torch.cat(x) for k, x in out.items()}


@torch.no_grad()
def evaluate(model, train_eval, test, prompts, collate, device, amp, fractions, center=True, seed=0):
    """Image-report retrieval R@K on the test split; with class prompts also zero-shot AUC per class and the
    few-shot linear-probe AUC on nested random fractions of the training set."""
    model.eval()
    te, metrics, text_id = encode(model, test, collate, device, amp), {}, {}
    ids = torch.tensor([text_id.setdefault(t, len(text_id)) for t in test.texts])
    ret = recall_at_k(te["v"] @ te["t"].t(), ids[:, None] == ids[None, :])  # identical reports are ground truth
    if prompts:
        tok = collate.tokenizer([p for ps in prompts.values() for p in ps], padding="max_length", truncation=True,
                                max_length=collate.max_len, return_tensors="pt")
        with common.autocast(device, amp):
            pf = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu()
        sizes = [len(ps) for ps in prompts.values()]
        class_feats = F.normalize(torch.stack([c.mean(0) for c in pf.split(sizes)]), dim=-1)  # (C, D)
        logits = zero_shot_logits(te["v"], class_feats, center)
        aucs = {f"zs_auc_{c}": binary_auc(logits[:, i], te["labels"][:, i]) for i, c in enumerate(prompts)}
        metrics = {"zs_auc": float(np.nanmean(list(aucs.values()))), **ret}
        order = torch.randperm(len(train_eval), generator=torch.Generator().manual_seed(seed))
        n = [max(2, round(f * len(train_eval))) for f in fractions]
        tr = encode(model, Subset(train_eval, order[:max(n)].tolist()), collate, device, amp)
        for f, k in zip(fractions, n):  # nested subsets: the 1% rows are among the 10% rows
            metrics[f"probe_auc_{100 * f:g}pct"] = linear_probe_auc(tr["h"][:k], tr["labels"][:k], te["h"],
                                                                    te["labels"])
        metrics.update(aucs)
    return metrics or ret


# --- Train ---
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    if args.tiny and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny tensors: extra intra-op threads mostly spin, badly so on a shared machine
    args.amp = args.amp or common.default_amp(device)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "checkpoint.pt")
    train_ds, train_eval, test_ds, prompts = build_data(args)
    tokenizer = (WordTokenizer.build(train_ds.texts + sum(prompts.values(), [])) if args.no_pretrained  # words of
                 else from_hub(transformers.AutoTokenizer, args))  # the training reports and prompts, or the hub's
    vocab = tokenizer.vocab if isinstance(tokenizer, WordTokenizer) else None
    collate = Collate(tokenizer, args.max_len)

    common.seed_everything(args.seed)  # identical weights and queue on every rank
    model = build_model(args, len(tokenizer)).to(device, memory_format=torch.channels_last)  # conv weights NHWC
    if device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    teacher = common.momentum_copy(model)
    queue = FeatureQueue(args.embed_dim, args.queue_size).to(device)  # the same on every rank: keys are gathered
    common.seed_everything(args.seed + rank)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2]},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    state, step, metrics_init = common.load_checkpoint(path, "msd", resume=not args.eval_only), 0, None
    if state is not None:
        if state.get("vocab") != vocab:
            raise SystemExit(f"error: {path} was trained with another word vocabulary (other reports or "
                             "--text-model); use the same --data and flags or another --output-dir")
        common.restore(state, path, model=model, momentum_model=teacher, queue=queue, optimizer=opt,
                       **({"scaler": scaler} if scaler else {}))
        step, metrics_init = state["step"], state.get("metrics_init")
        common.print0(f"resumed from {path} at step {step}")

    def run_eval():
        return evaluate(model, train_eval, test_ds, prompts, collate, device, args.amp, args.probe_fractions,
                        args.zero_shot_score == "centered", args.seed)

    A, window = args.accum_steps, args.accum_steps * args.batch_size * world
    sampler = common.ResumableSampler(len(train_ds), A * args.batch_size, seed=args.seed)
    spe, total = sampler.steps_per_epoch, args.epochs * sampler.steps_per_epoch
    last = total if args.max_steps is None else min(total, args.max_steps)
    train = not args.eval_only and step < last
    if args.tiny and state is None and train:
        metrics_init = run_eval()
    if train:
        student = common.distribute(model, device, args.compile)
        # The loader yields whole windows (A*b rows per process); msd_accum_step splits them into micro-batches.
        loader = DataLoader(train_ds, batch_size=A * args.batch_size, sampler=sampler,
                            num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                            persistent_workers=args.workers > 0, collate_fn=collate, generator=torch.Generator())
        lrs = common.cosine_schedule(args.lr, args.min_lr, total, int(args.warmup_epochs * spe), args.min_lr)
        amp = functools.partial(common.autocast, device, args.amp)
        common.print0(f"micro-batch {args.batch_size} x {world} processes = global batch {args.batch_size * world}; "
                      f"x {A} accumulated = {window} pairs per step ({args.accum_mode} mode); queue "
                      f"{args.queue_size}; {spe} steps/epoch, {last} steps")
        # from_pretrained returns eval mode: train with dropout on, the teacher too (ALBEF's momentum encoders
        # are submodules of its model and run in train mode) [inferred]
        model.train()
        teacher.train()
        bar = tqdm(total=last, initial=step, disable=rank != 0)
        t0, s0 = time.time(), step
        while step < last:
            epoch = step // spe
            sampler.set_epoch(epoch, step - epoch * spe)
            for images, ids, mask, _ in loader:
                for group in opt.param_groups:
                    group["lr"] = lrs[step]
                alpha = alpha_at(epoch, step - epoch * spe, spe, args.alpha, args.alpha_warmup_epochs)
                micro = list(zip(*(x.to(device, non_blocking=True).chunk(A) for x in (images, ids, mask))))
                stats = msd_accum_step(student, teacher, micro, opt, queue, alpha, args.momentum, args.accum_mode,
                                       args.intra_modal_distill, scaler, amp)
                step += 1
                bar.update()
                epoch_end = step % spe == 0
                if step % args.log_every == 0 or step == last or epoch_end:
                    vals = {k: common.all_reduce_sum(v.detach().clone()).item() / world for k, v in stats.items()}
                    if not math.isfinite(vals["loss"]):
                        raise SystemExit(f"error: loss is {vals['loss']} at step {step}; the last good checkpoint in "
                                         f"{args.output_dir} is untouched; lower --lr or use --amp none")
                    common.log_jsonl(args.output_dir, {
                        "step": step, "epoch": epoch, **vals, "alpha": alpha, "temp": model.temp.item(), "lr":
                        float(lrs[step - 1]), "samples_per_s": (step - s0) * window / max(time.time() - t0, 1e-9)})
                    bar.set_postfix(loss=f"{vals['loss']:.4f}")
                if epoch_end or step == last:
                    common.save_checkpoint(path, "msd", step, {
                        "args": vars(args), "model": model.state_dict(), "momentum_model": teacher.state_dict(),
                        "queue": queue.state_dict(), "optimizer": opt.state_dict(), "epoch": step // spe,
                        "scaler": scaler.state_dict() if scaler else None, "metrics_init": metrics_init,
                        "vocab": vocab}, finite=[model])
                if step == last:
                    break
        bar.close()

    metrics = run_eval()
    if args.tiny and (metrics_init is not None or step == 0):
        metrics.update({f"{k}_init": v for k, v in (metrics_init or dict(metrics)).items()})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    common.print0(f"{'metric':<24}{'init':>10}{'trained':>10}" if args.tiny else f"{'metric':<24}{'value':>10}")
    for k in (k for k in metrics if not k.endswith("_init")):
        common.print0(f"{k:<24}" + "".join(f"{metrics[n]:>10.4f}" for n in (k + "_init", k) if n in metrics))
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
