"""Astrea: a mixture of heterogeneous vision experts, progressively pre-aligned to text by momentum contrast.

Paper: "Astrea: A MOE-based Visual Understanding Model with Progressive Alignment", Xiaoda Yang, JunYu Lu, Hongshun
Qiu, Sijing Li, Hao Li, Shengpeng Ji, Xudong Tang, Jiayang Xu, Jiaqi Duan, Ziyue Jiang, Cong Lin, Sihang Cai, Zejian
Xie, Zhuoyang Song, Songxin Zhang. arXiv:2503.09445 (2025). No public code: only the abstract's design is sourced;
every other detail below is inferred and is a flag whose help says "[inferred]".

Method. Four heterogeneous vision experts (detection: MobileNetV3 + FPN as Faster R-CNN's backbone; segmentation:
dilated MobileNetV3 + ASPP as DeepLabV3's; classification: ResNet; captioning: a ViT) give features of different
widths; one adapter per expert maps them into the text space, a router (adaptive weight allocator) mixes them and a
fusion stack with probabilistically activated stochastic residuals refines the mix. Progressive pre-alignment adds
the experts one stage at a time (contrastive alignment to the text: in-batch InfoNCE, or momentum contrast with
--align-loss moco); a joint stage then trains everything by momentum contrast (momentum encoders and queues), with
load balancing and a caption decoder. Before the stages each expert is specialised on its own task of the data
(classes, boxes, masks, caption words) [inferred: their own pretraining; --expert-steps 0 for pretrained experts].

Where (sourced: the parts; their forms are [inferred]): g = softmax(W_r mean_k z_k / T_r), z = sum_k g_k z_k: `route`;
L_bal = n sum_k gbar_k^2: `load_balance_loss`; h <- F(h) + b h, b ~ Bernoulli(p): `stochastic_residual`, `Fusion`;
L_moco, L_align: `moco_loss`, `info_nce`; one step: `astrea_losses`; stages: `schedule`, `set_stage`; evaluation:
R@1/5/10 (`recall_at_k`), caption BLEU-4 (`bleu`), nearest-class-mean accuracy, router weights per stage.

Launch:
  python astrea.py --tiny                                                  # CPU smoke run, built-in scenes
  python astrea.py --tiny --experts classification                         # the single-expert ablation
  python astrea.py --data train.json --eval-data test.json --image-root IMAGES                  # one GPU
  torchrun --nproc_per_node=8 astrea.py --data train.json --eval-data test.json --image-root IMAGES \\
      --batch-size 8                                                       # 8 x 8 = the spec's batch 64
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 astrea.py \\
      --data train.json --eval-data test.json --image-root IMAGES --batch-size 4 --queue-size 4096
Data: an ALBEF-style JSON list of {"image": path, "caption": str or [str]}, optional "labels": [class ids] and
"boxes": [[x0, y0, x1, y1] in 0..1, one per label] for the experts' tasks (masks: the boxes filled with label + 1);
--eval-data: [{"image", "caption": [str], optional "labels"}].
"""
import argparse
import collections
import functools
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
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP
from tqdm import tqdm
import transformers
from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

import common

# --- Arguments ---
EXPERTS = ("classification", "captioning", "detection", "segmentation")
ALIAS = {"cls": "classification", "cap": "captioning", "det": "detection", "seg": "segmentation"}
TINY = dict(batch_size=32, lr=2e-3, tau=0.2, workers=0, log_every=20, image_res=32, embed_dim=32, queue_size=64,
            max_len=20, expert_steps=60, stage_iters=30, joint_iters=150)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Astrea (arXiv 2503.09445): mixture of vision experts, progressive "
                                "contrastive pre-alignment")
    p.add_argument("--data", default="synthetic", help="'synthetic', or JSON files [{image, caption[, labels, boxes]}]")
    p.add_argument("--output-dir", default="runs/astrea")
    p.add_argument("--epochs", type=int, default=None, help="if given: the joint stage's epochs (not --joint-iters)")
    p.add_argument("--batch-size", type=int, default=64, help="per process (spec: 64 in all)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr, a cosine to 0 within each stage [inferred]")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--eval-data", default=None, help="test JSON [{image, caption: [...][, labels]}]")
    m.add_argument("--image-root", default="", help="prefix of relative image paths")
    m.add_argument("--experts", default="cls,cap,det,seg", help="E_k, in stage order [inferred]")
    m.add_argument("--expert-steps", type=int, default=1000, help="[inferred] each expert's own task steps first")
    m.add_argument("--stage-iters", type=int, default=1000, help="iterations of each alignment stage s [inferred]")
    m.add_argument("--joint-iters", type=int, default=5000, help="iterations of the joint stage [inferred]")
    m.add_argument("--align-loss", choices=["infonce", "moco"], default="infonce", help="[inferred] L_align^s")
    m.add_argument("--moco-layout", choices=["queue_only", "inbatch_queue"], default="queue_only",
                   help="[inferred] L_moco logits [positive, queue] (MoCo v2) or [in-batch keys, queue] (CTP)")
    m.add_argument("--reset-queue", action=argparse.BooleanOptionalAction, default=True, help="[inferred] at the start "
                   "of each momentum stage: random queues, momentum model = online (keys of fewer experts are stale)")
    m.add_argument("--tau", type=float, default=0.07, help="temperature tau [inferred]")
    m.add_argument("--momentum", type=float, default=0.995, help="EMA m of adapters, router, fusion, text [inferred]")
    m.add_argument("--queue-size", type=int, default=4096, help="queue size K [inferred]")
    m.add_argument("--residual-p", type=float, default=0.5, help="stochastic residual probability p [inferred]")
    m.add_argument("--residual-eval", choices=["expect", "one"], default="expect", help="[inferred] b at eval: p or 1")
    m.add_argument("--fusion-layers", type=int, default=2, help="[inferred] blocks F_l of the fusion stack")
    m.add_argument("--router-temp", type=float, default=1.0, help="router temperature T_r [inferred]")
    m.add_argument("--router-topk", type=int, default=0, help="[inferred] keep the top-k experts (0: dense)")
    m.add_argument("--lambda-bal", type=float, default=0.01, help="weight lambda_bal of L_bal [inferred]")
    m.add_argument("--lambda-cap", type=float, default=1.0, help="[inferred] weight of the joint caption loss")
    m.add_argument("--embed-dim", type=int, default=256, help="shared width D [inferred]")
    m.add_argument("--image-res", type=int, default=224, help="[inferred]")
    m.add_argument("--max-len", type=int, default=30, help="text tokens")
    m.add_argument("--text-encoder", default="bert-base-uncased", help="BERT: HF name or local dir")
    m.add_argument("--text-pool", choices=["mean", "cls"], default="mean", help="[inferred] text feature")
    m.add_argument("--caption-vit", default="google/vit-base-patch16-224-in21k", help="captioning expert's ViT")
    m.add_argument("--expert-weights", default="default", help="torchvision experts: 'default' (torchvision's), "
                   "'none', or a dir of {detection,segmentation,classification}.pth")
    m.add_argument("--no-pretrained", action="store_true", help="BERT, ViT and experts from scratch (no download)")
    args = p.parse_args(argv)
    if args.tiny:  # the preset only for flags not given on the command line
        flags = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
        given = {p._option_string_actions[f].dest for f in flags if f in p._option_string_actions}
        for k, v in TINY.items():
            if k not in given:
                setattr(args, k, v)
    names = [ALIAS.get(e.strip(), e.strip()) for e in args.experts.split(",") if e.strip()]
    bad = [e for e in names if e not in EXPERTS]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--experts {args.experts!r}: give distinct names from {', '.join(EXPERTS)} (or cls, cap, det, seg)")
    args.experts = names
    return args


def check_args(args, world):
    """Every check that depends on the flags and the number of processes alone (no files)."""
    global_batch = args.batch_size * world
    if args.batch_size < 2:
        raise SystemExit("error: --batch-size must be at least 2 (BatchNorm and in-batch negatives)")
    if args.queue_size % global_batch:  # the queues take whole gathered batches
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a multiple of the global batch {global_batch} "
                         f"({args.batch_size} x {world} processes); change --batch-size or --queue-size")
    if not 0.0 <= args.residual_p <= 1.0:
        raise SystemExit("error: --residual-p must lie in [0, 1]")
    if min(args.expert_steps, args.stage_iters, args.joint_iters) < 0:
        raise SystemExit("error: stage lengths must be >= 0")
    return args


# --- Data ---
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as the torchvision experts expect
COLORS = {"red": (.85, .15, .15), "green": (.15, .7, .25), "blue": (.2, .3, .95), "yellow": (.95, .85, .15),
          "purple": (.6, .2, .75), "white": (.95, .95, .95)}
SHAPES = ("circle", "square", "triangle", "cross")
RGB = torch.tensor(list(COLORS.values()))
SPOTS = ("top left", "top right", "bottom left", "bottom right")
DET_GRID = 4  # detection target: objectness + box size on a 4 x 4 grid (YOLO-style) [inferred]


def pre_caption(caption):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", caption.lower()).split())


def random_scene(rng):
    """1-2 objects (colour, shape, size, spot) in distinct quadrants: what (cls), where (det), extent (seg)."""
    spots = sorted(rng.sample(range(4), rng.choice((1, 2))))
    return tuple((rng.randrange(len(COLORS)), rng.randrange(len(SHAPES)), rng.randrange(2), q) for q in spots)


def scene_captions(scene):
    names = list(COLORS)
    ph = [(f"a {('small', 'big')[z]} {names[c]} {SHAPES[s]}", SPOTS[q]) for c, s, z, q in scene]
    caps = [" and ".join(f"{o} at the {q}" for o, q in ph), " and ".join(f"{o} at the {q}" for o, q in ph[::-1]),
            " ".join(f"{q} {o}" for o, q in ph), "there is " + " and ".join(f"{o} in the {q}" for o, q in ph)]
    return list(dict.fromkeys(caps))


@functools.lru_cache
def grid(res):
    return torch.meshgrid(torch.arange(res) + .5, torch.arange(res) + .5, indexing="ij")


def render(scene, res, seed):
    """-> normalised image (3, res, res), labels [colour * 4 + shape], boxes [[x0, y0, x1, y1]] in 0..1, mask
    (res, res) of label + 1; the jitter depends on `seed` only."""
    yy, xx = grid(res)
    rng = random.Random(seed)
    img = 0.3 + 0.05 * torch.randn(3, res, res, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(res, res, dtype=torch.long)
    labels, boxes = [], []
    for c, s, z, q in scene:
        r = res * (rng.uniform(.17, .21) if z else rng.uniform(.09, .12))
        cy = res * (.25 + .5 * (q // 2) + rng.uniform(-.04, .04))
        cx = res * (.25 + .5 * (q % 2) + rng.uniform(-.04, .04))
        dy, dx = yy - cy, xx - cx
        m = {"circle": lambda: dy ** 2 + dx ** 2 <= r * r,
             "square": lambda: (dy.abs() <= .8 * r) & (dx.abs() <= .8 * r),
             "triangle": lambda: (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),
             "cross": lambda: ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r)),
             }[SHAPES[s]]()
        img = torch.where(m, RGB[c][:, None, None], img)
        labels.append(c * len(SHAPES) + s)
        mask[m] = labels[-1] + 1
        e = (.8 if SHAPES[s] == "square" else 1.0) * r
        boxes.append([max(cx - e, 0) / res, max(cy - e, 0) / res, min(cx + e, res) / res, min(cy + e, res) / res])
    return T.functional.normalize(img.clamp(0, 1), MEAN, STD), labels, boxes, mask


def synthetic_data(args):
    """-> train [(scene, captions, ann)], test [{image: scene, caption: [...], labels}] (distinct scenes)."""
    rng = random.Random(args.seed)
    n_train, n_test = (2048, 100) if args.tiny else (50000, 1000)
    label = lambda s: [s[0][0] * len(SHAPES) + s[0][1]]  # noqa: E731, the first object's class (for the probe)
    train = [(s, scene_captions(s), {"labels": label(s)}) for s in (random_scene(rng) for _ in range(n_train))]
    test, seen = [], set()
    while len(test) < n_test:  # pairs of scenes with the same objects in other quadrants: *where* matters
        s = random_scene(rng)
        moved = tuple(o[:3] + (q,) for o, q in zip(s, sorted(rng.sample(range(4), len(s)))))
        if s != moved and not {s, moved} & seen:
            seen |= {s, moved}
            test += [{"image": x, "caption": scene_captions(x), "labels": label(x)} for x in (s, moved)]
    return train, test[:n_test], len(COLORS) * len(SHAPES)


def read_rows(path, keys):
    """A JSON list with one-line errors: missing file, bad JSON (file:line), missing key, bad labels or boxes."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass a JSON file of [{{image, caption}}] or --data synthetic")
    try:
        with open(path) as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"error: {path} must hold a non-empty list of entries")
    for n, row in enumerate(rows):
        where = f"{path}: entry {n}"
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise SystemExit(f"error: {where} has no {missing[0]!r}; each entry needs {list(keys)}")
        lab, box = row.get("labels", []), row.get("boxes")
        if not (isinstance(lab, list) and all(isinstance(x, int) and x >= 0 for x in lab)) or (box is not None and (
                not isinstance(box, list) or len(box) != len(lab) or
                any(not isinstance(b, list) or len(b) != 4 or not 0 <= b[0] < b[2] <= 1 or not 0 <= b[1] < b[3] <= 1
                    for b in box))):
            raise SystemExit(f"error: {where}: 'labels' must be class ids >= 0 and 'boxes' one [x0, y0, x1, y1] in "
                             "0..1 per label")
    return rows


def load_data(args):
    """-> train [(image, [captions], ann)], test [{image, caption: [...], labels}], number of classes."""
    if args.data == "synthetic":
        return synthetic_data(args)
    if not args.eval_data:
        raise SystemExit("error: a real --data needs --eval-data <retrieval test JSON> for the evaluation")
    caps = lambda c: [pre_caption(x) for x in (c if isinstance(c, list) else [c])]  # noqa: E731
    train = [(os.path.join(args.image_root, r["image"]), caps(r["caption"]), r) for path in args.data.split(",")
             for r in read_rows(path, ("image", "caption"))]
    test = [{"image": os.path.join(args.image_root, r["image"]), "caption": caps(r["caption"]),
             "labels": r.get("labels", [])} for r in read_rows(args.eval_data, ("image", "caption"))]
    missing = [p for p in [train[0][0]] + [it["image"] for it in test] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: image {missing[0]} not found; check --image-root")
    return train, test, 1 + max([x for _, _, a in train for x in a.get("labels", [])], default=0)


def make_tokenizer(args, captions):
    """BERT's WordPiece tokenizer; from scratch, a word vocabulary of the captions written to the output dir."""
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
    counts = collections.Counter(w for c in captions for w in c.split())
    path = os.path.join(args.output_dir, "vocab.txt")
    tmp = f"{path}.tmp{os.getpid()}"  # every rank writes the same file atomically
    with open(tmp, "w") as f:
        words = sorted(counts, key=lambda w: (-counts[w], w))
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    os.replace(tmp, path)
    return BertTokenizer(path)


def task_targets(labels, boxes, n_classes, res):
    """Expert targets: multi-hot classes (C,), detection grid (3, G, G) = objectness, w, h; box masks (res, res)."""
    cls_t, det_t = torch.zeros(n_classes), torch.zeros(3, DET_GRID, DET_GRID)
    mask = torch.zeros(res, res, dtype=torch.long)
    cls_t[list(labels)] = 1.0
    for lab, (x0, y0, x1, y1) in zip(labels, boxes):
        gx, gy = min(int((x0 + x1) / 2 * DET_GRID), DET_GRID - 1), min(int((y0 + y1) / 2 * DET_GRID), DET_GRID - 1)
        det_t[:, gy, gx] = torch.tensor([1.0, x1 - x0, y1 - y0])
        mask[round(y0 * res):round(y1 * res), round(x0 * res):round(x1 * res)] = lab + 1
    return cls_t, det_t, mask


class PairSet(torch.utils.data.Dataset):
    """(image, ids, cls target, det target, seg mask, has annotations), seeded per sample (resumable, per rank)."""

    def __init__(self, entries, tok, args, n_classes):
        self.entries, self.args, self.n_classes = entries, args, n_classes
        caps = [c for _, cs, _ in entries for c in cs]
        ids = tok(caps, padding="max_length", truncation=True, max_length=args.max_len, return_tensors="pt")
        self.ids, self.first = ids["input_ids"], [0]  # pre-tokenised once: (N_captions, L)
        for _, cs, _ in entries:
            self.first.append(self.first[-1] + len(cs))
        self.transform = T.Compose([T.Resize((args.image_res, args.image_res)), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        i, seed = key
        image, _, ann = self.entries[i]
        res = self.args.image_res
        j = random.Random(seed).randrange(self.first[i], self.first[i + 1])
        if isinstance(image, tuple):  # synthetic scenes are re-rendered with new jitter
            image, labels, boxes, mask = render(image, res, seed)
            cls_t, det_t, _ = task_targets(labels, boxes, self.n_classes, res)
            has = 1.0
        else:
            image = self.transform(pil_loader(image))
            cls_t, det_t, mask = task_targets(ann.get("labels", []), ann.get("boxes", []), self.n_classes, res)
            has = float("boxes" in ann)
        return image, self.ids[j], cls_t, det_t, mask, torch.tensor(has)


# --- Model ---
class Trunk(nn.Module):
    """A torchvision backbone and a neck -> (B, C, h, w); FPN levels resized to the finest and concatenated."""

    def __init__(self, body, neck, keys, channels):
        super().__init__()
        self.body, self.neck, self.keys, self.channels = body, neck, keys, channels

    def forward(self, x):
        y = self.body(x)
        if isinstance(y, dict):
            y = [y[k] for k in self.keys]
            y = torch.cat([y[0]] + [F.interpolate(t, size=y[0].shape[-2:], mode="nearest") for t in y[1:]], 1)
        return self.neck(y)


def torchvision_expert(kind, args):
    """Faster R-CNN's MobileNetV3 + FPN, DeepLabV3's dilated MobileNetV3 + ASPP, ResNet-18; --tiny: the same, small."""
    tv = torchvision.models
    if args.tiny:  # [inferred] small widths for 32-px images (heterogeneous: 40, 24, 128 channels)
        if kind == "detection":
            body = BackboneWithFPN(tv.mobilenet_v3_small(width_mult=0.5).features, {"3": "0", "8": "1"}, [16, 24], 20)
            return Trunk(body, nn.Identity(), ("0", "1"), 40)
        if kind == "segmentation":
            body = tv.mobilenet_v3_large(width_mult=0.5, dilated=True).features[:7]  # stride 8
            return Trunk(body, ASPP(24, [1, 2, 3], 24), (), 24)
        resnet = list(ResNet(BasicBlock, [1, 1, 1, 1]).children())[:-4]  # stem + 2 stages: small as the others
        return Trunk(nn.Sequential(*resnet), nn.Identity(), (), 128)
    w = None if args.no_pretrained or args.expert_weights in ("none", "") else args.expert_weights
    local = w is not None and os.path.isdir(w)
    try:
        kw = {} if w is None or local else {"weights": "DEFAULT"}
        net = {"detection": tv.detection.fasterrcnn_mobilenet_v3_large_fpn, "classification": tv.resnet18,
               "segmentation": tv.segmentation.deeplabv3_mobilenet_v3_large}[kind](
            **kw, **({} if kind == "classification" else {"weights_backbone": None}))
        if local:
            net.load_state_dict(torch.load(os.path.join(w, f"{kind}.pth"), map_location="cpu"))
    except Exception as e:  # offline download, a missing or mismatched file
        raise SystemExit(f"error: cannot load the {kind} expert's weights ({str(e).splitlines()[0][:120]}); pass "
                         "--expert-weights DIR with local state dicts, or --expert-weights none") from None
    if kind == "detection":
        return Trunk(net.backbone, nn.Identity(), ("0", "1"), 512)
    if kind == "segmentation":  # the neck: ASPP + 3x3 conv, without the class conv
        return Trunk(net.backbone, nn.Sequential(*list(net.classifier)[:4]), ("out",), 256)
    return Trunk(nn.Sequential(*list(net.children())[:-2]), nn.Identity(), (), 512)


def hf_model(cls, tiny_cfg, scratch_cfg, name, flag, args):
    """A transformers model: tiny or from scratch (a config built here), else from a hub name or local dir."""
    if args.tiny or args.no_pretrained:
        return cls(tiny_cfg if args.tiny else scratch_cfg, add_pooling_layer=False)
    try:
        return cls.from_pretrained(name, add_pooling_layer=False)
    except OSError as e:
        raise SystemExit(f"error: cannot load {name!r} ({str(e).splitlines()[0]}); pass a local directory with {flag}, "
                         "or --no-pretrained") from None


class Expert(nn.Module):
    """E_k: a feature extractor and its task head. features() -> (B, d_k): detection and segmentation pool to 2 x 2
    (keep *where*) [inferred], classification globally, the captioning ViT averages its tokens."""

    def __init__(self, kind, args, n_classes, vocab):
        super().__init__()
        self.kind = kind
        if kind == "captioning":  # --tiny [inferred]: 2 layers, width 48, 8-px patches
            self.net = hf_model(ViTModel, ViTConfig(image_size=args.image_res, patch_size=8, hidden_size=48,
                                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=96),
                                ViTConfig(image_size=args.image_res), args.caption_vit, "--caption-vit", args)
            c = self.dim = self.net.config.hidden_size
        else:
            self.net = torchvision_expert(kind, args)
            c = self.net.channels
            self.dim = c * (4 if kind in ("detection", "segmentation") else 1)
        if args.tiny:  # MobileNetV3's BatchNorm momentum 0.01 would leave the running statistics near their init
            for m in self.modules():  # after a short specialisation
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 0.1
        out = {"classification": n_classes, "captioning": vocab, "detection": 3, "segmentation": n_classes + 1}[kind]
        self.head = nn.Linear(c, out) if kind in ("classification", "captioning") else nn.Conv2d(c, out, 1)

    def trunk(self, x):
        cap = self.kind == "captioning"
        return self.net(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state if cap else self.net(x)

    def features(self, x):
        y, grid = self.trunk(x), 2 if self.kind in ("detection", "segmentation") else 1
        return y.mean(1) if self.kind == "captioning" else F.adaptive_avg_pool2d(y, grid).flatten(1)

    def task_loss(self, x, cls_t, det_t, mask, has, pad_id):
        """The expert's own task [inferred]: class BCE, YOLO-style grid boxes, per-pixel CE, caption bag of words."""
        y = self.trunk(x)
        w = has / has.sum().clamp(min=1)  # rows without annotations count for nothing
        if self.kind == "captioning":  # mask carries the caption ids here: a multi-hot bag of words
            logits = self.head(y.mean(1)).float()
            bow = torch.zeros_like(logits).scatter_(1, mask, 1.0)
            bow[:, pad_id] = 0
            return F.binary_cross_entropy_with_logits(logits, bow)
        if self.kind == "classification":  # rows with class labels
            w = (cls_t.sum(1) > 0).float() / (cls_t.sum(1) > 0).sum().clamp(min=1)
            per = F.binary_cross_entropy_with_logits(self.head(y.mean((2, 3))).float(), cls_t, reduction="none").mean(1)
        elif self.kind == "detection":
            out = self.head(F.adaptive_avg_pool2d(y, DET_GRID)).float()  # (B, 3, G, G)
            obj = det_t[:, 0]
            per = (F.binary_cross_entropy_with_logits(out[:, 0], obj, reduction="none")
                   + obj * (out[:, 1:].sigmoid() - det_t[:, 1:]).abs().sum(1)).mean((1, 2))
        else:
            logits = F.interpolate(self.head(y).float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            per = F.cross_entropy(logits, mask, reduction="none").mean((1, 2))
        return (per * w).sum()


class Fusion(nn.Module):
    """Fusion stack h_{l+1} = F_l(h_l) + b_l h_l with probabilistically activated residuals (Sec. 3 of the spec)."""

    def __init__(self, dim, layers, p, eval_mode):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                  nn.Linear(2 * dim, dim)) for _ in range(layers))
        self.p, self.eval_mode = p, eval_mode

    def forward(self, h):
        for f in self.blocks:
            h = stochastic_residual(h, f(h), self.p, self.training, eval_mode=self.eval_mode)
        return h


class Align(nn.Module):
    """What has a momentum copy: adapters A_k, router, fusion stack, text encoder and its projection."""

    def __init__(self, dims, bert, args):
        super().__init__()
        d = args.embed_dim
        self.names = list(dims)
        self.adapters = nn.ModuleDict({k: nn.Sequential(nn.Linear(dims[k], d), nn.GELU(), nn.Linear(d, d))
                                       for k in dims})  # one adapter per expert width, never a shared linear
        self.router = nn.Linear(d, len(dims))  # W_r of the adaptive weight allocator, on mean_k z_k (no text query)
        self.fusion = Fusion(d, args.fusion_layers, args.residual_p, args.residual_eval)
        self.text_encoder, self.text_proj = bert, nn.Linear(bert.config.hidden_size, d)
        self.temp, self.topk, self.pool = args.router_temp, args.router_topk, args.text_pool

    def image(self, feats, active):
        """feats {name: (B, d_k)} -> (normalised fused (B, D), router weights (B, n_active))."""
        z = torch.stack([self.adapters[k](feats[k]) for k in active], 1)  # (B, n, D): the experts added so far
        logits = self.router(z.mean(1))[:, [self.names.index(k) for k in active]] if len(active) > 1 else z[..., 0] * 0
        weights, fused = route(z, logits, self.temp, self.topk)
        return F.normalize(self.fusion(fused).float(), dim=-1), weights

    def text(self, ids, att):
        h = self.text_encoder(input_ids=ids, attention_mask=att).last_hidden_state  # (B, L, H)
        m = att[..., None].to(h.dtype)  # mean over the tokens: a random [CLS] barely tells captions apart
        h = h[:, 0] if self.pool == "cls" else (h * m).sum(1) / m.sum(1)
        return F.normalize(self.text_proj(h).float(), dim=-1)


class Captioner(nn.Module):
    """A small GRU caption decoder on the fused visual representation [inferred] (a GRUCell loop: compile traces it)."""

    def __init__(self, dim, vocab):
        super().__init__()
        self.embed, self.init = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.cell, self.out = nn.GRUCell(dim, dim), nn.Linear(dim, vocab)

    def forward(self, z, ids, h=None):
        """z (B, D), ids (B, L) -> next-token logits (B, L, V), last state (B, D)."""
        h, ys = torch.tanh(self.init(z)) if h is None else h, []
        for x in self.embed(ids).unbind(1):
            ys.append(h := self.cell(x, h))
        return self.out(torch.stack(ys, 1)), h


class Astrea(nn.Module):
    def __init__(self, args, n_classes, tok):
        super().__init__()
        self.experts = nn.ModuleDict({k: Expert(k, args, n_classes, len(tok)) for k in args.experts})
        bert = hf_model(BertModel, BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,  # [inferred]
                                              num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                        BertConfig(vocab_size=len(tok)), args.text_encoder, "--text-encoder", args)
        self.align = Align({k: e.dim for k, e in self.experts.items()}, bert, args)
        self.captioner = Captioner(args.embed_dim, len(tok))
        self.pad_id, self.cls_id, self.sep_id = tok.pad_token_id, tok.cls_token_id, tok.sep_token_id

    def forward(self, *batch, stage, model_m, queue, cfg):
        return astrea_losses(self, model_m, queue, *batch, stage=stage, cfg=cfg)


class Queue(nn.Module):
    """Momentum keys of past batches: fused images and texts, (K, D) each, ring buffer."""

    def __init__(self, dim, size, seed):
        super().__init__()
        for name, shape in (("image", (size, dim)), ("text", (size, dim)), ("ptr", ())):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long if name == "ptr" else torch.float))
        self.reset(seed)

    @torch.no_grad()
    def reset(self, seed):
        g = torch.Generator().manual_seed(seed)
        for q in (self.image, self.text):
            q.copy_(F.normalize(torch.randn(q.shape, generator=g), dim=1))
        self.ptr.zero_()

    @torch.no_grad()
    def push(self, image, text):
        """Enqueue the all-gathered momentum keys after the step, overwriting the oldest rows."""
        for q, keys in ((self.image, image), (self.text, text)):
            keys = common.concat_all_gather(keys)
            q.index_copy_(0, (self.ptr + torch.arange(len(keys), device=q.device)) % len(q), keys.to(q.dtype))
        self.ptr.copy_((self.ptr + len(keys)) % len(self.image))


# --- Method ---
def route(z, logits, temp=1.0, topk=0):
    """z (B, K, D), logits (B, K) -> (weights g = softmax(logits / T_r) (B, K), fused sum_k g_k z_k (B, D)).
    topk > 0 keeps the k largest logits per row (sparse routing) [inferred]."""
    logits = logits.float() / temp
    if topk:
        logits = logits.masked_fill(logits < logits.topk(min(topk, logits.shape[1]), 1).values[:, -1:], float("-inf"))
    weights = logits.softmax(1)
    return weights, (weights[..., None].to(z.dtype) * z).sum(1)


def load_balance_loss(weights):
    """L_bal = n sum_k gbar_k^2, gbar = batch mean of the (B, n) weights: 1 when balanced, n for one expert."""
    g = weights.float().mean(0)
    return len(g) * (g * g).sum()


def stochastic_residual(h, fh, p, training, generator=None, eval_mode="expect"):
    """F(h) + b h, b ~ Bernoulli(p) per sample in training; at eval b = p (expectation) or 1. p = 1: a plain
    residual block, p = 0: F(h) alone."""
    if training:
        b = (torch.rand(h.shape[0], 1, device=h.device, generator=generator) < p).to(h.dtype)
    else:
        b = p if eval_mode == "expect" else 1.0
    return fh + b * h


def moco_direction(anchor, key_m, queue, tau, layout="queue_only"):
    """One direction of L_moco. queue_only: logits [anchor . key_m, anchor . queue] with target 0 (MoCo v2);
    inbatch_queue: [anchor . all in-batch keys, anchor . queue] with diagonal targets (CTP's form)."""
    anchor, key_m, queue = anchor.float(), key_m.float(), queue.float()
    if layout == "queue_only":
        logits = torch.cat([(anchor * key_m).sum(1, keepdim=True), anchor @ queue.T], 1) / tau  # (B, 1+K)
        target = torch.zeros(len(anchor), dtype=torch.long, device=anchor.device)
    else:
        logits = anchor @ torch.cat([key_m, queue]).T / tau  # (B, B+K)
        target = torch.arange(len(anchor), device=anchor.device)
    return F.cross_entropy(logits, target)


def moco_loss(z, t, z_m, t_m, q_z, q_t, tau, layout="queue_only"):
    """L_moco = 1/2 [image -> momentum texts + text queue, text -> momentum images + image queue]."""
    return (moco_direction(z, t_m, q_t, tau, layout) + moco_direction(t, z_m, q_z, tau, layout)) / 2


def info_nce(z, t, tau):
    """L_align^s = 1/2 [CE(z t^T / tau, y) + CE(t z^T / tau, y)], y = arange(B)."""
    logits = z.float() @ t.float().T / tau
    y = torch.arange(len(z), device=z.device)
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def schedule(args):
    """[(name, kind, expert, active experts, iterations)]: specialise each expert, align them one by one, joint."""
    spe = None if args.epochs is None else args.steps_per_epoch
    out = [(f"expert:{k}", "expert", k, (k,), args.expert_steps) for k in args.experts if args.expert_steps]
    out += [(f"align:{k}", "align", k, tuple(args.experts[:s + 1]), args.stage_iters)
            for s, k in enumerate(args.experts) if args.stage_iters]
    return out + [("joint", "joint", None, tuple(args.experts), args.joint_iters if spe is None else args.epochs * spe)]


def uses_momentum(stage, cfg):
    return stage[1] == "joint" or stage[1] == "align" and cfg.align_loss == "moco"


def astrea_losses(model, model_m, queue, image, ids, cls_t, det_t, mask, has, *, stage, cfg):
    """One step of `stage` -> (loss, router weights (B, n) or None, momentum keys to enqueue or None)."""
    _, kind, expert, active, _ = stage
    if kind == "expert":
        e = model.experts[expert]
        loss = e.task_loss(image, cls_t, det_t, ids if expert == "captioning" else mask, has, model.pad_id)
        return loss, None, None
    feats = {}
    for k in active:  # frozen experts run without a graph
        with torch.set_grad_enabled(torch.is_grad_enabled() and model.experts[k].training):
            feats[k] = model.experts[k].features(image)
    att = (ids != model.pad_id).long()
    z, weights = model.align.image(feats, active)
    t = model.align.text(ids, att)
    keys = None
    if uses_momentum(stage, cfg):
        with torch.no_grad():  # momentum keys (the caller did the EMA update): deterministic residual, no dropout
            keys = model_m.image({k: f.detach() for k, f in feats.items()}, active)[0], model_m.text(ids, att)
    with torch.autocast(image.device.type, enabled=False):  # logits at 1 / tau, log-softmax over the queue: fp32
        if keys is None:
            loss = info_nce(z, t, cfg.tau)
        else:
            loss = moco_loss(z, t, *keys, queue.image, queue.text, cfg.tau, cfg.moco_layout)
        if len(active) > 1:
            loss = loss + cfg.lambda_bal * load_balance_loss(weights)
    if kind == "joint":  # the caption decoder, teacher-forced on the fused representation
        logits, _ = model.captioner(z, ids[:, :-1])
        with torch.autocast(image.device.type, enabled=False):
            loss = loss + cfg.lambda_cap * F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(),
                                                           ignore_index=model.pad_id)
    return loss, weights, keys


def set_stage(model, stage):
    """Freeze everything, then unfreeze what `stage` trains -> its parameters (a new optimizer per stage)."""
    _, kind, expert, active, _ = stage
    model.requires_grad_(False).eval()  # experts stay frozen after their own stage [inferred: "frozen or tuned"]
    a = model.align
    if kind == "expert":
        parts = [model.experts[expert]]
    else:
        parts = [a.text_encoder, a.text_proj, a.fusion] + ([a.router] if len(active) > 1 else [])
        parts += [a.adapters[expert]] if kind == "align" else [a.adapters, model.captioner]
    for m in parts:  # the modules that train, in train mode (from_pretrained returns eval-mode modules)
        m.requires_grad_(True).train()
    return [p for m in parts for p in m.parameters()]


# --- Evaluation ---
def shard(n):
    """Rows [rank * ceil(n / world), ...) of n, the last repeated to equal sizes, and how many are this process's."""
    start = common.get_rank() * (per := math.ceil(n / common.get_world_size()))
    return [min(i, n - 1) for i in range(start, start + per)], max(0, min(per, n - start))


@torch.no_grad()
def recall_at_k(img, txt, txt2img, chunk=256):
    """R@1/5/10 both ways of images (N_i, E) and captions (N_t, E), txt2img (N_t,), the best positive's rank (ties:
    lower index first): each process ranks a part of the queries, chunk rows at a time; the hits are summed."""
    def hits(query, ids, gallery, gallery_ids):  # R@1, 5, 10 in %
        rows = torch.arange(len(query), device=query.device).tensor_split(common.get_world_size())[common.get_rank()]
        out, col = torch.zeros(3, dtype=torch.long, device=rows.device), torch.arange(len(gallery), device=rows.device)
        for q, i in zip(query[rows].split(chunk), ids[rows, None].split(chunk)):
            s, pos = q @ gallery.T, i == gallery_ids  # (b, N)
            best = s.masked_fill(~pos, -math.inf).amax(1, keepdim=True)
            first = torch.where(pos & (s == best), col, len(col)).amin(1, keepdim=True)  # the first best positive
            rank = (s > best).sum(1) + ((s == best) & (col < first)).sum(1)
            out += torch.stack([(rank < k).sum() for k in (1, 5, 10)])
        return (common.all_reduce_sum(out).double() * 100 / len(query)).tolist()
    ids = torch.arange(len(img), device=img.device)
    out = dict(zip(("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"),
                   hits(img, ids, txt, txt2img) + hits(txt, txt2img, img, ids)))
    return {"r_mean": sum(out.values()) / 6, **out}


def bleu(candidates, references, n=4):
    """Corpus BLEU-n (Papineni et al. 2002): clipped n-gram precisions, geometric mean, brevity penalty (closest
    reference). candidates [[tokens]], references [[[tokens], ...]]: this process's part, counts summed over all."""
    match, total, c_len, r_len = [0] * n, [0] * n, 0, 0
    for cand, refs in zip(candidates, references):
        c_len += len(cand)
        r_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            grams = collections.Counter(tuple(cand[i:i + k]) for i in range(len(cand) - k + 1))
            best = collections.Counter()
            for r in refs:
                best |= collections.Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
            match[k - 1] += sum(min(c, best[g]) for g, c in grams.items())
            total[k - 1] += max(len(cand) - k + 1, 0)
    match, total, c_len, r_len = ([sum(x) for x in zip(*parts)] for parts in zip(*common.gather_objects(
        [match, total, [c_len], [r_len]])))
    if min(match) == 0:
        return 0.0
    bp = 1.0 if c_len[0] > r_len[0] else math.exp(1 - r_len[0] / max(c_len[0], 1))
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / n)


@torch.no_grad()
def greedy_captions(model, z, max_len):
    ids = torch.full((len(z), 1), model.cls_id, dtype=torch.long, device=z.device)
    h = None
    for _ in range(max_len):
        logits, h = model.captioner(z, ids[:, -1:], h)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    until_sep = lambda r: r[:r.index(model.sep_id)] if model.sep_id in r else r  # noqa: E731
    return [[w for w in until_sep(r) if w not in (model.pad_id, model.cls_id)] for r in ids[:, 1:].tolist()]


@torch.no_grad()
def embed_images(model, images, active, args, device, amp):
    """This process's shard (image i rendered with a seed of i) -> fused embeddings, router weights, own row count."""
    tf = T.Compose([T.Resize((args.image_res, args.image_res)), T.ToTensor(), T.Normalize(MEAN, STD)])
    (idx, own), zs, ws = shard(len(images)), [], []
    with common.autocast(device, amp):
        for s in range(0, len(idx), 64):
            x = torch.stack([render(images[i], args.image_res, args.seed * 1000003 + i)[0]
                             if isinstance(images[i], tuple) else tf(pil_loader(images[i])) for i in idx[s:s + 64]])
            z, w = model.align.image({k: model.experts[k].features(x.to(device)) for k in active}, active)
            zs.append(z), ws.append(w.float())
    return torch.cat(zs), torch.cat(ws), own


@torch.no_grad()
def evaluate(model, test, train, tok, stage, args, device, amp, captions=False):
    """Retrieval R@K, router weights and L_bal, nearest-class-mean accuracy, caption BLEU-4, alike on every process:
    each embeds its shard (retrieval gathers the (N, D)); weights, class sums, correct and n-gram counts summed."""
    model = common.unwrap(model)
    modes = [m.training for m in model.modules()]
    model.eval()
    active, (idx, own), texts = stage[3], shard(len(test)), [c for it in test for c in it["caption"]]
    z, w, _ = embed_images(model, [it["image"] for it in test], active, args, device, amp)
    t = tok([texts[i] for i in shard(len(texts))[0]], padding="max_length", truncation=True, max_length=args.max_len,
            return_tensors="pt")
    ids, att = t["input_ids"].to(device), t["attention_mask"].to(device)
    with common.autocast(device, amp):
        t = torch.cat([model.align.text(ids[s:s + 256], att[s:s + 256]) for s in range(0, len(ids), 256)])
    txt2img = torch.tensor([i for i, it in enumerate(test) for _ in it["caption"]], device=device)
    out = recall_at_k(common.concat_all_gather(z)[:len(test)], common.concat_all_gather(t)[:len(texts)], txt2img)
    z, g = z[:own], common.all_reduce_sum(w[:own].double().sum(0)) / len(test)  # the mean router weights
    out.update({f"weight_{k}": g[i].item() for i, k in enumerate(active)})
    out["load_balance"] = load_balance_loss(g[None]).item()
    labelled = [(im, a["labels"][0]) for im, _, a in train[:1000] if a.get("labels")]
    n_test = sum(bool(it.get("labels")) for it in test)
    if labelled and n_test:  # classification: nearest class mean of the fused train embeddings
        zt, _, n = embed_images(model, [im for im, _ in labelled], active, args, device, amp)
        y = torch.tensor([v for _, v in labelled], device=device)[shard(len(labelled))[0][:n]]
        sums = torch.zeros(int(max(v for _, v in labelled)) + 1, zt.shape[1], dtype=torch.float64, device=device)
        means = F.normalize(common.all_reduce_sum(sums.index_add_(0, y, zt[:n].double())).float(), dim=1)
        mine = [(k, test[i]["labels"][0]) for k, i in enumerate(idx[:own]) if test[i].get("labels")]
        correct = ((z[[k for k, _ in mine]] @ means.T).argmax(1) == torch.tensor([v for _, v in mine], device=device))
        out["cls_acc"] = 100.0 * common.all_reduce_sum(correct.sum()).item() / n_test
    if captions:
        cands = greedy_captions(model, z, args.max_len)
        words = lambda ids: tok.decode(ids, skip_special_tokens=True).split()  # noqa: E731
        out["bleu4"] = 100.0 * bleu([words(c) for c in cands], [[c.split() for c in test[i]["caption"]]
                                                                  for i in idx[:own]])
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    return out


# --- Train ---
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: OpenMP threads only add overhead
    check_args(args, world)
    os.makedirs(args.output_dir, exist_ok=True)
    train, test, n_classes = load_data(args)
    tok = make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    transformers.logging.set_verbosity_error()
    common.seed_everything(args.seed)  # identical initialisation on every rank
    model = Astrea(args, n_classes, tok).to(device)
    model_m = common.momentum_copy(model.align).eval()  # keys in eval mode: deterministic residual [inferred]
    queue = Queue(args.embed_dim, args.queue_size, args.seed).to(device)
    ds = PairSet(train, tok, args, n_classes)
    sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed)
    args.steps_per_epoch = spe = sampler.steps_per_epoch
    stages = schedule(args)
    ends = [sum(s[4] for s in stages[:i + 1]) for i in range(len(stages))]
    plan = [[s[0], s[4]] for s in stages]
    path, step, metrics_init, results, pending = os.path.join(args.output_dir, "checkpoint.pt"), 0, None, {}, None
    common.seed_everything(args.seed + rank)
    state = common.load_checkpoint(path, "astrea", resume=not args.eval_only)  # after the models: restores the RNG
    if state is not None:
        if state.get("schedule") != plan:
            raise SystemExit(f"error: {path} was trained with the stage schedule {state.get('schedule')}, this run has "
                             f"{plan}; pass the same --experts/--expert-steps/--stage-iters/--joint-iters/--epochs or "
                             "choose another --output-dir")
        common.restore(state, path, model=model, momentum_model=model_m, queue=queue)
        step, metrics_init, results, pending = state["step"], state["metrics_init"], state["results"], state
        common.print0(f"resumed from {path} at step {step}")
    total = step if args.eval_only else ends[-1] if args.max_steps is None else min(args.max_steps, ends[-1])
    common.print0(f"{len(ds)} training pairs, {len(test)} test images; global batch {args.batch_size * world} "
                  f"({args.batch_size} x {world}); stages " + ", ".join(f"{n} {i}" for n, i in plan) + f"; amp {amp}")
    if args.tiny and step == 0 and metrics_init is None and total > 0:  # the random-init baseline, all experts
        metrics_init = evaluate(model, test, train, tok, stages[-1], args, device, amp)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0, generator=torch.Generator())
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    stage_at = lambda s: next((i for i, e in enumerate(ends) if s < e), len(ends) - 1)  # noqa: E731
    cur, optimizer, net, t0, step0 = None, None, None, time.time(), step
    while step < total:
        epoch, start = step // spe, step % spe
        sampler.set_epoch(epoch, start)
        bar = tqdm(loader, total=min(spe - start, total - step), disable=not common.is_main(), desc=f"epoch {epoch}")
        for batch in bar:
            si = stage_at(step)
            stage, begin = stages[si], ends[si] - stages[si][4]
            if si != cur:  # a new (or resumed) stage: what trains, a new optimizer, DDP over its parameters
                cur, optimizer = si, torch.optim.AdamW(set_stage(model, stage), lr=args.lr,
                                                       weight_decay=args.weight_decay, fused=device.type == "cuda")
                if pending is not None and pending["stage"] == si and step > begin:
                    common.restore(pending, path, optimizer=optimizer, scaler=scaler)
                pending = net = None
                if step == begin and uses_momentum(stage, args) and args.reset_queue:
                    queue.reset(args.seed + 1 + si)  # fresh queues, momentum model = the aligned online model
                    model_m.load_state_dict(model.align.state_dict())
                lrs = common.cosine_schedule(args.lr, 0.0, stage[4])
                net = common.distribute(model, device, args.compile)  # DDP, then compile
            optimizer.param_groups[0]["lr"] = lr = lrs[step - begin]
            batch = [x.to(device, non_blocking=True) for x in batch]
            if uses_momentum(stage, args):
                common.ema_update_(model_m, model.align, args.momentum)  # before the momentum forward
            with common.autocast(device, amp):
                loss, weights, keys = net(*batch, stage=stage, model_m=model_m, queue=queue, cfg=args)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if keys is not None:
                queue.push(*keys)  # Sec. 4 of the spec: enqueue after the step
            step += 1
            if step % args.log_every == 0 or step in (ends[si], total):
                v = (common.all_reduce_sum(loss.detach().float().reshape(1)) / world).item()  # mean over processes
                if not math.isfinite(v):
                    raise SystemExit(f"error: loss is {v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                rec = {"step": step, "epoch": epoch, "stage": stage[0], "loss": v, "lr": lr,
                       "samples_per_s": (step - step0) * args.batch_size * world / (time.time() - t0)}
                if weights is not None:
                    rec.update({f"weight_{k}": w for k, w in zip(stage[3], weights.float().mean(0).tolist())})
                common.log_jsonl(args.output_dir, rec)
                bar.set_postfix(stage=stage[0], loss=f"{v:.3f}")
            if step == ends[si]:  # the stage's evaluation: retrieval and expert weights (the task loss for experts)
                results[stage[0]] = m = ({"loss": v} if stage[1] == "expert" else
                                         evaluate(model, test, train, tok, stage, args, device, amp))
                common.log_jsonl(args.output_dir, {"eval": m, "stage": stage[0], "step": step})
                common.print0(f"stage {si + 1}/{len(stages)} {stage[0]}: "
                              + " ".join(f"{k} {x:.3f}" for k, x in m.items()))
            if step in (ends[si], total):
                break
        common.save_checkpoint(path, "astrea", step, {  # a collective, at epoch and stage ends and at the stop
            "args": vars(args), "schedule": plan, "model": model.state_dict(), "momentum_model": model_m.state_dict(),
            "queue": queue.state_dict(), "stage": cur, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "metrics_init": metrics_init, "results": results}, finite=[model])
    final = stages[stage_at(step - 1)] if step else stages[-1]  # --max-steps 0: the untrained model, all experts
    m = evaluate(model, test, train, tok, final, args, device, amp, captions=final[1] == "joint")
    metrics = {"r_mean": m["r_mean"], **({"r_mean_init": metrics_init["r_mean"]} if metrics_init else {}), **m}
    metrics.update({f"{n}_{k}": x for n, r in results.items() for k, x in r.items()
                    if k in ("r_mean", "loss") or k.startswith("weight_")})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    common.print0(f"final ({final[0]}): " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if ":" not in k))
    common.print0("expert weights: " + " ".join(f"{k} {metrics[f'weight_{k}']:.3f}" for k in final[3]))
    if metrics_init is not None:
        common.print0(f"retrieval r_mean: random init {metrics_init['r_mean']:.2f} -> trained {metrics['r_mean']:.2f}")
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
