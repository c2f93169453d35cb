"""GrowCLIP: a CLIP dual encoder that grows with its data, new parameters inherited with momentum (PIM).

Paper: "GrowCLIP: Data-aware Automatic Model Growing for Large-scale Contrastive Language-Image Pre-training",
Xinchi Deng, Han Shi, Runhui Huang, Changlin Li, Hang Xu, Jianhua Han, James Kwok, Shen Zhao, Wei Zhang, Xiaodan Liang.
ICCV 2023, arXiv:2308.11331. No public code: every detail beyond the abstract is a reconstruction, a flag whose help
says "inferred".

Method. Image-text pairs arrive in stages, D_1 < D_2 < ... < D_T. A ViT image encoder and a BERT-style text encoder
feed a modality-shared encoder (the same layers run on each modality's tokens), then projections to a joint space
trained by the symmetric CLIP InfoNCE. At every stage the architecture a = (L_v, L_t, L_s, d, h = d / 64) may grow
in a space re-centred on the current model whose budget grows with the data (data-aware), chosen by a proxy search or
as the largest candidate within the budget; every parameter of the grown model is inherited with momentum, W_new[S] =
lam W_old[S] + (1 - lam) R[S] on the overlapping slice S, R a fresh init (PIM): old knowledge, no old minimum.

Where: growth `grow_config`, `growth_space`, `arch_cost`; search `select_architecture`, `proxy_score`; PIM
`pim_blend`, `pim_inherit`; `SharedBlock`, `GrowCLIP`; `clip_loss`; evaluation `zero_shot_accuracy`, `recall_at_k`.
Inferred (flags): the PIM formula and lam (--pim-momentum 0.9), new depth layers (--depth-init), the operators
(--max-depth-step, --width-steps), the data-aware budget cost * (|D_t| / |D_t-1|) ** gamma (--growth-exponent), the
search (--search, --proxy-*), the start model (--vision-layers ...), the stages (--stages) and per-stage schedule.

Launch:
  python growclip.py --tiny                                          # CPU smoke run: 3 synthetic stages, ~45 s
  python growclip.py --tiny --no-grow                                # the fixed-architecture baseline, same steps
  python growclip.py --data cc3m_1.json,cc3m_2.json,cc3m_3.json --eval-data flickr30k_test.json \\
      --zeroshot-data cifar10_test_dir --image-root IMAGES                                         # one GPU
  torchrun --nproc_per_node=8 growclip.py --data d1.json,d2.json,d3.json --eval-data flickr30k_test.json \\
      --zeroshot-data DIR1,DIR2 --image-root IMAGES                  # 8 x 256 = a global batch of 2048
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 growclip.py ...
"""
import argparse
import collections
import copy
import functools
import itertools
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
from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

import common

# --- Arguments ---
TINY = dict(epochs=2, batch_size=64, lr=2e-3, workers=0, log_every=10, image_res=32, patch_size=8, embed_dim=32,
            vision_layers=1, text_layers=1, shared_layers=1, width=32, head_dim=16, width_steps="0,16,32",
            max_depth_step=1, growth_exponent=2.0, warmup=10, max_len=16, proxy_iters=20, proxy_val=128, init_std=0.06)


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(description="GrowCLIP (arXiv 2308.11331), PIM", allow_abbrev=False)
    p.add_argument("--data", default="synthetic", help="'synthetic', or ALBEF-format JSON files [{image, caption}], "
                   "comma-separated: one chunk per stage, D_t = chunks 1..t (one file: split by --stages)")
    p.add_argument("--output-dir", default="runs/growclip")
    p.add_argument("--epochs", type=int, default=10, help="[inferred] epochs over D_t at every stage t")
    p.add_argument("--batch-size", type=int, default=256, help="per process [inferred]")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW lr, restarted at every stage")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps over all stages")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--eval-data", default=None, help="retrieval test JSON [{image, caption: [...]}] (Flickr30K)")
    m.add_argument("--zeroshot-data", default=None, help="ImageFolder dirs, comma-separated: zero-shot top-1 (Sec. 4)")
    m.add_argument("--image-root", default="", help="prefix of relative image paths in the JSON files")
    m.add_argument("--stages", type=int, default=3, help="T growth steps [inferred] (chunks of a single --data file)")
    m.add_argument("--vit", default=None, help="a ViT/DeiT for a_1's image encoder (HF name or dir); default: scratch")
    m.add_argument("--text-encoder", default=None, help="BERT (weights, tokenizer): HF name or dir; default: scratch")
    m.add_argument("--vision-layers", type=int, default=6, help="L_v of a_1 [inferred]")
    m.add_argument("--text-layers", type=int, default=6, help="L_t of a_1 [inferred]")
    m.add_argument("--shared-layers", type=int, default=2, help="L_s of a_1, modality-shared layers [inferred]")
    m.add_argument("--width", type=int, default=512, help="d of a_1 [inferred]")
    m.add_argument("--head-dim", type=int, default=64, help="fixed head dim: h = d / head_dim [inferred]")
    m.add_argument("--mlp-ratio", type=int, default=4, help="r, MLP width = r * d")
    m.add_argument("--image-res", type=int, default=224)
    m.add_argument("--patch-size", type=int, default=16)
    m.add_argument("--max-len", type=int, default=32, help="text tokens")
    m.add_argument("--embed-dim", type=int, default=256, help="E, joint embedding dim")
    m.add_argument("--init-std", type=float, default=0.02, help="std of the fresh init R (BERT's 0.02) [inferred]")
    m.add_argument("--logit-scale-init", type=float, default=1 / 0.07, help="initial s = 1 / tau")
    m.add_argument("--logit-scale-max", type=float, default=100.0, help="s is clamped at this value")
    m.add_argument("--warmup", type=int, default=500, help="linear warm-up steps of every stage's cosine")
    m.add_argument("--no-grow", action="store_true", help="baseline: a_1 on every stage (same steps)")
    m.add_argument("--pim-momentum", type=float, default=0.9, help="lam of PIM [inferred]: 1 inherit, 0 scratch")
    m.add_argument("--no-pim", action="store_true", help="ablation: plain parameter inheriting (lam = 1)")
    m.add_argument("--depth-init", choices=["random", "copy_last"], default="random",
                   help="[inferred] layers new in depth: fresh, or PIM from the last old layer of the same encoder")
    m.add_argument("--max-depth-step", type=int, default=2, help="[inferred] depth +0..k for each of L_v, L_t, L_s")
    m.add_argument("--width-steps", default="0,64,128", help="[inferred] width increments (multiples of head dim)")
    m.add_argument("--growth-exponent", type=float, default=1.0, help="[inferred] gamma of the data-aware budget")
    m.add_argument("--search", choices=["none", "proxy"], default="none", help="[inferred] none: the largest "
                   "candidate within the budget; proxy: short PIM-initialised training, lowest held-out loss")
    m.add_argument("--proxy-candidates", type=int, default=4, help="[inferred] largest candidates the proxy tries")
    m.add_argument("--proxy-iters", type=int, default=300, help="[inferred] proxy training steps per candidate")
    m.add_argument("--proxy-val", type=int, default=2048, help="[inferred] pairs of D_t held out to score them")
    args = p.parse_args(argv)
    if args.tiny:  # tiny values only where the flag was not given on the command line
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for k, v in TINY.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.pim_momentum = 1.0 if args.no_pim else args.pim_momentum
    return args


def check_args(args, world):
    """Every check that depends on the flags and the number of processes alone (no files)."""
    if args.batch_size < 2:
        raise SystemExit("error: --batch-size must be at least 2 (in-batch negatives)")
    for name, v in (("--width", args.width), *(("--width-steps", int(s)) for s in args.width_steps.split(","))):
        if v % args.head_dim:
            raise SystemExit(f"error: {name} {v} is not a multiple of --head-dim {args.head_dim}")
    if not 0.0 <= args.pim_momentum <= 1.0:
        raise SystemExit(f"error: --pim-momentum {args.pim_momentum} must lie in [0, 1]")
    if args.stages < 1 or min(args.vision_layers, args.text_layers) < 1 or args.shared_layers < 0:
        raise SystemExit("error: --stages, --vision-layers and --text-layers must be at least 1, --shared-layers 0")
    if args.image_res % args.patch_size:
        raise SystemExit(f"error: --image-res {args.image_res} is not a multiple of --patch-size {args.patch_size}")
    return args


# --- Data ---
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
COLORS = {"red": (.85, .15, .15), "green": (.15, .7, .25), "blue": (.2, .3, .95), "yellow": (.95, .85, .15),
          "purple": (.6, .2, .75), "white": (.95, .95, .95), "orange": (1., .55, .1), "cyan": (.2, .85, .9)}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
TEXTURES = ("plain", "striped", "checkered")
TEMPLATES = ("a photo of a {t} {c} {s}", "a {t} {c} {s}", "a {c} {s} that is {t}", "a {s} in {c} with a {t} look")
PROMPT = "a photo of a {}."


def pre_caption(caption, max_words=30):
    """ALBEF's caption cleaning: lowercase, no punctuation, '-' and '/' to spaces, the first max_words words."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower()).replace("-", " ").replace("/", " ")
    return " ".join(re.sub(r"\s{2,}", " ", caption).strip(" \n").split(" ")[:max_words])


def stage_concepts(t, stages):
    """Colours, shapes and textures of synthetic stage t: each axis opens up as the stages go on."""
    k = lambda n: max(1, round(n * (t + 1) / stages))  # noqa: E731
    return list(COLORS)[:k(len(COLORS))], SHAPES[:k(len(SHAPES))], TEXTURES[:k(len(TEXTURES))]


@functools.lru_cache(maxsize=4)
def _grid(res):
    return torch.meshgrid(torch.arange(res) + .5, torch.arange(res) + .5, indexing="ij")


def render(c, res):
    """A (colour, shape, texture) object of random size and place on a noisy background, uint8 (3, res, res);
    random numbers from the python/torch RNGs, seeded by the caller."""
    yy, xx = _grid(res)
    img = 0.3 + 0.05 * torch.randn(3, res, res)
    r = res * random.uniform(.22, .32)
    dy, dx = yy - res * random.uniform(.35, .65), xx - res * random.uniform(.35, .65)
    mask = {"circle": lambda: dy ** 2 + dx ** 2 <= r * r, "square": lambda: (dy.abs() <= .8 * r) & (dx.abs() <= .8 * r),
            "triangle": lambda: (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),
            "cross": lambda: ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r)),
            "ring": lambda: (dy ** 2 + dx ** 2 <= r * r) & (dy ** 2 + dx ** 2 >= (.55 * r) ** 2)}[c[1]]()
    img[:, mask] = torch.tensor(COLORS[c[0]])[:, None]
    if c[2] != "plain":  # darker stripes or checks inside the object
        p = max(2, res // 8)
        img[:, mask & (((yy // p) % 2 == 0) if c[2] == "striped" else (((yy // p) + (xx // p)) % 2 == 0))] *= 0.35
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_data(args):
    """Stage chunks of (concept, captions) pairs, |D_t| doubling, later chunks drawing from more concepts; test sets
    over every concept: 4 images per class (zero-shot) and one image with 2 captions per class (retrieval)."""
    rng, base = random.Random(args.seed), 1024 if args.tiny else 20000
    train, sizes = [], []
    for t in range(args.stages):
        cols, shapes, texs = stage_concepts(t, args.stages)
        for _ in range(base * 2 ** max(0, t - 1) if t else base):
            c = (rng.choice(cols), rng.choice(shapes), rng.choice(texs))
            train.append((c, [tpl.format(c=c[0], s=c[1], t=c[2]) for tpl in TEMPLATES]))
        sizes.append(len(train))
    classes = [(c, s, t) for t in TEXTURES for c in COLORS for s in SHAPES]
    names = [f"{t} {c} {s}" for c, s, t in classes]  # 'striped red circle'
    zeroshot = [("synthetic", names, [(c, y) for y, c in enumerate(classes) for _ in range(4)])]
    test = [{"image": c, "caption": [TEMPLATES[1].format(c=c[0], s=c[1], t=c[2]),
                                     TEMPLATES[3].format(c=c[0], s=c[1], t=c[2])]} for c in classes]
    with common.seeded(args.seed):  # the test images are rendered once, the same in every run
        test = [dict(it, image=render(it["image"], args.image_res)) for it in test]
        zeroshot = [(n, cl, [(render(c, args.image_res), y) for c, y in samples]) for n, cl, samples in zeroshot]
    return train, sizes, test, zeroshot


def read_json(path, keys):
    """An ALBEF JSON list, with one-line errors for a missing file, bad JSON (file:line) or a missing key."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass ALBEF-format JSON files or --data synthetic")
    try:
        with open(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(items, list) or not items:
        raise SystemExit(f"error: {path} must hold a non-empty JSON list of entries")
    for n, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise SystemExit(f"error: {path}: entry {n} has no {missing[0]!r}; each entry needs {list(keys)}")
    return items


def load_data(args):
    """-> train [(image, [captions])] in arrival order, cumulative stage sizes |D_t|, retrieval test, zero-shot sets
    [(name, class names, [(image, label)])]."""
    if args.data == "synthetic":
        return synthetic_data(args)
    if not (args.eval_data or args.zeroshot_data):
        raise SystemExit("error: a real --data needs --eval-data (retrieval JSON) and/or --zeroshot-data (folders)")
    captions = lambda c: [pre_caption(x) for x in (c if isinstance(c, list) else [c])]  # noqa: E731
    train, sizes, files = [], [], args.data.split(",")
    for path in files:
        train += [(os.path.join(args.image_root, it["image"]), captions(it["caption"]))
                  for it in read_json(path, ("image", "caption"))]
        sizes.append(len(train))
    if len(files) == 1:  # one file: --stages equal cumulative chunks in file order
        sizes = [len(train) * (t + 1) // args.stages for t in range(args.stages)]
    test = [{"image": os.path.join(args.image_root, it["image"]), "caption": captions(it["caption"])}
            for it in read_json(args.eval_data, ("image", "caption"))] if args.eval_data else []
    zeroshot = []
    for root in (args.zeroshot_data.split(",") if args.zeroshot_data else []):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --zeroshot-data {root} is not a directory of class folders")
        folder = torchvision.datasets.ImageFolder(root)
        zeroshot.append((os.path.basename(root.rstrip("/")), [c.replace("_", " ") for c in folder.classes],
                         folder.samples))
    missing = [p for p in [train[0][0]] + [it["image"] for it in test[:1]] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: image {missing[0]} not found; check --image-root")
    return train, sizes, test, zeroshot


def make_tokenizer(args, texts):
    """BERT's WordPiece tokenizer of --text-encoder, else a word vocabulary of the captions and the prompts."""
    if args.text_encoder:
        try:
            tok = BertTokenizer.from_pretrained(args.text_encoder)
            error = "" if len(tok) > len(tok.all_special_tokens) else "no vocabulary found"  # transformers 5 offline
        except OSError as e:
            error = str(e).splitlines()[0]
        if error:
            raise SystemExit(f"error: cannot load the tokenizer of {args.text_encoder!r} ({error}); pass a local "
                             "BERT directory with --text-encoder, or leave it out to build the encoder from scratch")
        return tok
    counts = collections.Counter(w for c in texts for w in pre_caption(c).split())
    words = sorted(counts, key=lambda w: (-counts[w], w))[:30522 - 5]
    path = os.path.join(args.output_dir, "vocab.txt")
    tmp = f"{path}.tmp{os.getpid()}"  # every rank writes the same file atomically
    with open(tmp, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    os.replace(tmp, path)
    return BertTokenizer(path)


class PairSet(torch.utils.data.Dataset):
    """(uint8 image, token ids); caption choice and augmentation depend only on the sampler's per-sample seed."""

    def __init__(self, entries, tok, args):
        self.entries, self.tok, self.args = entries, tok, args
        self.transform = T.Compose([T.RandomResizedCrop(args.image_res, (0.9, 1.0),  # [inferred] open_clip's crop
                                                        interpolation=T.InterpolationMode.BICUBIC), T.PILToTensor()])

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        i, seed = key
        image, captions = self.entries[i]
        with common.seeded(seed):
            image = render(image, self.args.image_res) if isinstance(image, tuple) else \
                self.transform(pil_loader(image))
            ids = self.tok(random.choice(captions), truncation=True, max_length=self.args.max_len)["input_ids"]
        return image, torch.tensor(ids)


def collate(batch, pad_id=0):
    images, ids = zip(*batch)
    att = nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in ids], batch_first=True)
    return torch.stack(images), nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id), att


def eval_batch(items, res):
    """A collate_fn (in the workers): uint8 test images (B, 3, res, res), files resized and centre-cropped."""
    tf = T.Compose([T.Resize(res, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(res), T.PILToTensor()])
    return torch.stack([x if isinstance(x, torch.Tensor) else tf(pil_loader(x)) for x in items])


# --- Model ---
def arch_of(args):
    return grow_config(dict(vision_layers=args.vision_layers, text_layers=args.text_layers,
                            shared_layers=args.shared_layers, width=args.width, head_dim=args.head_dim,
                            mlp_ratio=args.mlp_ratio))


def arch_str(a):
    return f"L_v {a['vision_layers']} L_t {a['text_layers']} L_s {a['shared_layers']} d {a['width']} h {a['heads']}"


def encoder_configs(arch, vit_cfg, bert_cfg):
    """The HF configs of `arch`: a copy of the base (pretrained or scratch) configs with its depth, width, heads."""
    out = [copy.deepcopy(vit_cfg), copy.deepcopy(bert_cfg)]
    for cfg, layers in zip(out, (arch["vision_layers"], arch["text_layers"])):
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads = layers, arch["width"], arch["heads"]
        cfg.intermediate_size = arch["mlp_ratio"] * arch["width"]
    return out


class SharedBlock(nn.Module):
    """A modality-shared pre-norm Transformer layer (Sec. 3). q, k, v are separate Linears so that PIM's leading
    slice of a wider layer keeps heads aligned (a fused qkv would mix q rows into k)."""

    def __init__(self, d, heads, mlp_ratio, std=0.02):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)
        for lin in (self.q, self.k, self.v, self.o, self.fc1, self.fc2):  # the HF encoders' init
            nn.init.normal_(lin.weight, std=std), nn.init.zeros_(lin.bias)

    def forward(self, x, mask=None):  # x (B, L, d), mask (B, 1, 1, L) bool: True = attend
        h = self.ln1(x)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GrowCLIP(nn.Module):
    """ViT (L_v) and BERT (L_t) encoders, L_s shared layers on either token sequence, projections to E, logit scale."""

    def __init__(self, arch, vit_cfg, bert_cfg, embed_dim, logit_scale_init, logit_scale_max):
        super().__init__()
        self.arch, self.log_scale_max = dict(arch), math.log(logit_scale_max)
        vit_cfg, bert_cfg = encoder_configs(arch, vit_cfg, bert_cfg)
        self.vision = ViTModel(vit_cfg, add_pooling_layer=False)
        self.text = BertModel(bert_cfg, add_pooling_layer=False)
        d = arch["width"]
        self.shared = nn.ModuleList(SharedBlock(d, arch["heads"], arch["mlp_ratio"], bert_cfg.initializer_range)
                                    for _ in range(arch["shared_layers"]))
        self.ln_final = nn.LayerNorm(d, eps=1e-6)
        self.vision_proj, self.text_proj = nn.Linear(d, embed_dim, bias=False), nn.Linear(d, embed_dim, bias=False)
        for proj in (self.vision_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=d ** -0.5)  # CLIP's projection init
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.interpolate = vit_cfg.image_size  # checked against the input resolution in encode_image

    def head(self, tokens, mask, proj):
        for block in self.shared:
            tokens = block(tokens, mask)
        return F.normalize(proj(self.ln_final(tokens[:, 0])).float(), dim=-1)  # [CLS] -> (B, E), fp32

    def encode_image(self, image):  # uint8 (B, 3, H, W), normalised here, on the device
        x = (image.float() - self.mean) / self.std
        tokens = self.vision(pixel_values=x, interpolate_pos_encoding=x.shape[-1] != self.interpolate).last_hidden_state
        return self.head(tokens, None, self.vision_proj)

    def encode_text(self, ids, att):
        tokens = self.text(input_ids=ids, attention_mask=att).last_hidden_state
        return self.head(tokens, att[:, None, None, :].bool(), self.text_proj)

    def scale(self):
        return self.logit_scale.clamp(max=self.log_scale_max).exp()  # s = exp(log s) <= 100

    def forward(self, image, ids, att):
        return clip_loss(self.encode_image(image), self.encode_text(ids, att), self.scale())


def load_encoders(args):
    """Base configs of the two encoders and their pretrained state dicts (or None); a_1 follows pretrained shapes."""
    transformers.logging.set_verbosity_error()
    scratch = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # [inferred] CLIP: no dropout
    vit_cfg = ViTConfig(image_size=args.image_res, patch_size=args.patch_size, qkv_bias=True, layer_norm_eps=1e-6,
                        initializer_range=args.init_std, **scratch)
    bert_cfg = BertConfig(max_position_embeddings=max(64, args.max_len), initializer_range=args.init_std, **scratch)
    states = {}
    for key, name, cls in (("vision", args.vit, ViTModel), ("text", args.text_encoder, BertModel)):
        if name:
            try:
                src = cls.from_pretrained(name, add_pooling_layer=False)
            except OSError as e:
                flag = "--vit" if key == "vision" else "--text-encoder"
                raise SystemExit(f"error: cannot load {name!r} ({str(e).splitlines()[0]}); pass a local directory "
                                 f"with {flag}, or leave {flag} out to build that encoder from scratch") from None
            c = src.config
            if c.hidden_size != c.num_attention_heads * args.head_dim:
                hd = c.hidden_size // c.num_attention_heads
                raise SystemExit(f"error: {name} has {c.num_attention_heads} heads of {hd}; pass --head-dim {hd}")
            if key == "vision":
                vit_cfg, args.vision_layers = c, c.num_hidden_layers
            else:
                bert_cfg, args.text_layers = c, c.num_hidden_layers
            args.width, args.mlp_ratio = c.hidden_size, c.intermediate_size // c.hidden_size
            states[key] = src.state_dict()
    if args.vit and args.text_encoder and vit_cfg.hidden_size != bert_cfg.hidden_size:
        raise SystemExit(f"error: --vit has width {vit_cfg.hidden_size}, --text-encoder {bert_cfg.hidden_size}; "
                         "the shared encoder needs one width")
    return vit_cfg, bert_cfg, states


# --- Method ---
def grow_config(cfg, dv=0, dt=0, ds=0, dwidth=0):
    """A growth operator on a = (L_v, L_t, L_s, d): depths and width up, heads h = d / head_dim (fixed head dim)."""
    new = dict(cfg, vision_layers=cfg["vision_layers"] + dv, text_layers=cfg["text_layers"] + dt,
               shared_layers=cfg["shared_layers"] + ds, width=cfg["width"] + dwidth)
    if new["width"] % new["head_dim"]:
        raise ValueError(f"width {new['width']} is not a multiple of the head dim {new['head_dim']}")
    new["heads"] = new["width"] // new["head_dim"]
    return new


def arch_cost(cfg):
    """Parameters of the Transformer layers, (L_v + L_t + L_s) (4 + 2r) d^2: the compute per token, up to a factor."""
    layers = cfg["vision_layers"] + cfg["text_layers"] + cfg["shared_layers"]
    return layers * (4 + 2 * cfg["mlp_ratio"]) * cfg["width"] ** 2


def growth_space(cfg, data_ratio, max_depth_step=2, width_steps=(0, 64, 128), exponent=1.0):
    """The dynamic growth space around a_t-1 [inferred]: depth +0..k for each encoder x width + each step, within the
    data-aware budget cost(a_t-1) * data_ratio ** gamma. Always holds a_t-1 itself (no growth)."""
    budget = arch_cost(cfg) * data_ratio ** exponent * (1 + 1e-9)
    space = [grow_config(cfg, *depth, dw) for depth in itertools.product(range(max_depth_step + 1), repeat=3)
             for dw in width_steps]
    return [a for a in space if arch_cost(a) <= budget]


def size_key(a):
    """Larger first; ties: more shared layers (cross-modal fusion), then deeper vision [inferred]."""
    return (-arch_cost(a), -a["shared_layers"], -a["vision_layers"], -a["text_layers"])


def select_architecture(cands, score_fn, budget=None):
    """The candidate with the lowest score_fn among those with arch_cost <= budget."""
    ok = [a for a in cands if budget is None or arch_cost(a) <= budget]
    if not ok:
        raise ValueError("no candidate within the budget")
    return min(ok, key=score_fn)


def pim_blend(new, old, m):
    """PIM on one tensor (in place): on the overlapping leading slice S, new[S] = m old[S] + (1 - m) new[S], where
    `new` holds the fresh initialisation R; the rest keeps R [inferred: the literal reading of the abstract]."""
    s = tuple(slice(0, min(a, b)) for a, b in zip(new.shape, old.shape))
    new[s] = m * old[s].to(new.device, new.dtype) + (1 - m) * new[s]
    return new


def _old_name(name, old_sd, old_depth, depth_init):
    """The old tensor that a new one inherits: the same name; a layer new in depth has none ('random') or the last
    old layer of its stack ('copy_last')."""
    if name in old_sd:
        return name
    hit = re.match(r"(.*?\.(?:layers?|shared))\.(\d+)\.(.*)", "." + name) if depth_init == "copy_last" else None
    if hit and hit.group(1) in old_depth:
        return f"{hit.group(1)[1:]}.{old_depth[hit.group(1)] - 1}.{hit.group(3)}".lstrip(".")
    return None


@torch.no_grad()
def pim_inherit(old_model, new_model, m, depth_init="random"):
    """Parameter inheriting with momentum: every floating tensor of `new_model` (freshly initialised) is blended with
    its counterpart in `old_model` by `pim_blend`. m = 1: exact inheritance; m = 0: the fresh model. In place."""
    old_sd = old_model.state_dict()
    old_depth = collections.Counter()  # '.vision.encoder.layer' -> number of old layers
    for name in old_sd:
        hit = re.match(r"(.*?\.(?:layers?|shared))\.(\d+)\.", "." + name)
        if hit:
            old_depth[hit.group(1)] = max(old_depth[hit.group(1)], int(hit.group(2)) + 1)
    for name, t in new_model.state_dict().items():
        src = _old_name(name, old_sd, old_depth, depth_init)
        if src is not None and t.is_floating_point() and t.ndim == old_sd[src].ndim:
            pim_blend(t, old_sd[src], m)
    return new_model


def clip_loss(img, txt, logit_scale, gather=True):
    """Symmetric InfoNCE (Sec. 3): 1/2 [CE(s u w^T) + CE(s w u^T)] for normalised (B, E) features, in fp32. With
    several processes the local rows meet the gathered global batch (with gradient), so that the mean over the
    processes is the loss of the global batch."""
    with torch.autocast(img.device.type, enabled=False):
        img, txt, s = img.float(), txt.float(), logit_scale.float()
        all_img, all_txt = map(common.all_gather_with_grad, (img, txt)) if gather else (img, txt)
        offset = common.get_rank() * img.shape[0] if gather else 0
        labels = torch.arange(img.shape[0], device=img.device) + offset
        return (F.cross_entropy(s * img @ all_txt.T, labels) + F.cross_entropy(s * txt @ all_img.T, labels)) / 2


def grow_model(old, arch, stage, args, vit_cfg, bert_cfg):
    """The grown model: built with a seed of (seed, stage), the same on every rank, then PIM from `old`."""
    with common.seeded(args.seed * 1000 + stage):
        new = GrowCLIP(arch, vit_cfg, bert_cfg, args.embed_dim, args.logit_scale_init, args.logit_scale_max)
    return pim_inherit(old, new.to(next(old.parameters()).device), args.pim_momentum, args.depth_init)


def make_optimizer(model, args, device):
    """AdamW, a new one per stage (shapes change); no weight decay on gains, biases and the logit scale (CLIP)."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if p.ndim >= 2]},
              {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98), eps=1e-6,
                             fused=device.type == "cuda")


def train_step(net, optimizer, scaler, batch, lr, device, amp):
    for g in optimizer.param_groups:
        g["lr"] = lr
    image, ids, att = [x.to(device, non_blocking=True) for x in batch]
    with common.autocast(device, amp):
        loss = net(image, ids, att)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def batches(ds, sampler, args, pad_id, epoch, start):
    """Batches from (epoch, step) on, epoch after epoch."""
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         collate_fn=functools.partial(collate, pad_id=pad_id), drop_last=True,
                                         pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


@torch.no_grad()
def proxy_score(model, ds, val, args, device, amp, pad_id, stage):
    """Proxy search [inferred]: train a PIM-initialised candidate --proxy-iters steps on D_t minus the held-out
    pairs, score = its mean contrastive loss on the held-out pairs (the same on every rank)."""
    net, opt = common.distribute(model, device), make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    lrs = common.cosine_schedule(args.lr, 0.0, args.proxy_iters, min(args.warmup, args.proxy_iters // 5))
    sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed + 7919 * stage)
    model.train()
    with torch.enable_grad():
        for i, batch in zip(range(args.proxy_iters), batches(ds, sampler, args, pad_id, 0, 0)):
            train_step(net, opt, scaler, batch, lrs[i], device, amp)
    model.eval()
    losses = []
    for s in range(0, len(val), args.batch_size):
        image, ids, att = [x.to(device) for x in collate(val[s:s + args.batch_size], pad_id)]
        with common.autocast(device, amp):
            img, txt = model.encode_image(image), model.encode_text(ids, att)
            losses.append(clip_loss(img, txt, model.scale(), gather=False))
    return torch.stack(losses).mean().item()


def search(model, stage, data, data_ratio, grow, tok, args, device, amp):
    """a_t: the largest candidate of the data-aware growth space (--search none), or among the --proxy-candidates
    largest the one with the lowest held-out loss after proxy training (--search proxy) [inferred]."""
    space = growth_space(model.arch, data_ratio, args.max_depth_step, [int(s) for s in args.width_steps.split(",")],
                         args.growth_exponent)
    if args.search == "none":
        return select_architecture(space, size_key)
    cands = sorted(space, key=size_key)[:args.proxy_candidates]
    with common.seeded(args.seed + stage):  # the same held-out pairs on every rank
        held = set(random.sample(range(len(data)), min(args.proxy_val, len(data) // 2)))
    val_ds = PairSet([data[i] for i in sorted(held)], tok, args)
    val, ds = [val_ds[(i, i)] for i in range(len(val_ds))], PairSet([e for i, e in enumerate(data) if i not in held],
                                                                    tok, args)
    scores = [proxy_score(grow(model, a, stage), ds, val, args, device, amp, tok.pad_token_id, stage) for a in cands]
    common.print0("proxy scores: " + "; ".join(f"{arch_str(a)}: {s:.4f}" for a, s in zip(cands, scores)))
    return select_architecture(cands, lambda a: scores[cands.index(a)])


# --- Evaluation ---
def shard(n):
    """Rows [rank * ceil(n / world), ...) of n, the last repeated to equal sizes, and how many are this process's."""
    start = common.get_rank() * (per := math.ceil(n / common.get_world_size()))
    return [min(i, n - 1) for i in range(start, start + per)], max(0, min(per, n - start))


def zero_shot_accuracy(img_feats, class_text_feats, labels):
    """Top-1 (%) of argmax_c <u_i, w_c> for this process's normalised image features (n, E) and the class prompt
    features (C, E); correct counts and n summed over processes."""
    c = torch.stack([((img_feats @ class_text_feats.T).argmax(1) == labels).sum(), labels.new_tensor(len(labels))])
    c = common.all_reduce_sum(c)
    return 100.0 * c[0].item() / c[1].item()


@torch.no_grad()
def recall_at_k(img, txt, txt2img, chunk=256):
    """R@1/5/10 both ways of images (N_i, E) and captions (N_t, E), txt2img (N_t,): an image counts when its best-ranked
    caption (ties: lower index first, as a stable argsort) is in the top K, a caption needs its image. Each process
    ranks a part of the queries, chunk rows at a time (memory chunk x N); the hits are summed over processes."""
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


@torch.no_grad()
def evaluate(model, test, zeroshot, tok, args, device, amp):
    """Zero-shot top-1 by prompts (averaged over the datasets) and image-text retrieval R@K, the same on every
    process: each embeds its shard of the images and texts; the texts and retrieval images are gathered (N, E)."""
    model = common.unwrap(model).eval()  # the training loop puts it back in train mode
    def images(items, gather=True):  # this process's own rows, or all of them (the repeats dropped)
        idx, own = shard(len(items))
        loader = torch.utils.data.DataLoader([items[i] for i in idx], batch_size=256, num_workers=args.workers,
                                             collate_fn=functools.partial(eval_batch, res=args.image_res),
                                             generator=torch.Generator())  # the global RNG untouched
        x = torch.cat([model.encode_image(x.to(device)) for x in loader])
        return common.concat_all_gather(x)[:len(items)] if gather else x[:own]

    def texts(strings):  # tokenised whole: the padding does not depend on the shard
        t = tok([pre_caption(s) for s in strings], padding="longest", truncation=True, max_length=args.max_len,
                return_tensors="pt")
        idx = shard(len(strings))[0]
        ids, att = t["input_ids"][idx].to(device), t["attention_mask"][idx].to(device)
        x = torch.cat([model.encode_text(ids[s:s + 256], att[s:s + 256]) for s in range(0, len(ids), 256)])
        return common.concat_all_gather(x)[:len(strings)]
    out = {}
    with common.autocast(device, amp):
        for name, classes, samples in zeroshot:
            idx, own = shard(len(samples))
            labels = torch.tensor([samples[i][1] for i in idx[:own]], dtype=torch.long, device=device)
            out[f"zeroshot_{name}"] = zero_shot_accuracy(images([x for x, _ in samples], gather=False),
                                                         texts([PROMPT.format(c) for c in classes]), labels)
        if test:
            img, txt = images([it["image"] for it in test]), texts([c for it in test for c in it["caption"]])
    if test:
        txt2img = [i for i, it in enumerate(test) for _ in it["caption"]]
        out.update(recall_at_k(img, txt, torch.tensor(txt2img, device=device)))
    if zeroshot:
        out = {"zeroshot_top1": sum(out[f"zeroshot_{n}"] for n, _, _ in zeroshot) / len(zeroshot), **out}
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
    gb = args.batch_size * world
    train, sizes, test, zeroshot = load_data(args)
    tok = make_tokenizer(args, [c for _, caps in train for c in caps] + [PROMPT.format(c) for _, cl, _ in zeroshot
                                                                        for c in cl])
    vit_cfg, bert_cfg, pretrained = load_encoders(args)
    bert_cfg.vocab_size = len(tok) if not args.text_encoder else bert_cfg.vocab_size
    check_args(args, world)  # again: a pretrained encoder sets a_1's width and depths
    spe = [n // gb for n in sizes]  # steps per epoch of stage t
    if min(spe) == 0:
        raise SystemExit(f"error: stage sizes {sizes} do not all fill one global batch of {gb}; lower --batch-size")
    ends = list(itertools.accumulate(args.epochs * s for s in spe))  # global step at which stage t ends
    total = ends[-1] if args.max_steps is None else min(args.max_steps, ends[-1])
    path, step, grown, history, metrics_init = os.path.join(args.output_dir, "checkpoint.pt"), 0, 0, [], None
    common.seed_everything(args.seed + rank)
    state = common.load_checkpoint(path, "growclip", resume=not args.eval_only)  # restores this rank's RNG
    if state is not None and state.get("stage_sizes") != sizes:
        raise SystemExit(f"error: {path} was trained on stages of {state.get('stage_sizes')} pairs, this run has "
                         f"{sizes}; pass the same --data / --stages or choose another --output-dir")
    with common.seeded(args.seed):  # the same init on every rank; the training RNG is left as it is
        model = GrowCLIP(state["arch"] if state else arch_of(args), vit_cfg, bert_cfg, args.embed_dim,
                         args.logit_scale_init, args.logit_scale_max).to(device)
    for key, sd in ({} if state else pretrained).items():  # a_1 from --vit / --text-encoder
        getattr(model, key).load_state_dict(sd)
    if state is not None:
        common.restore(state, path, model=model)
        step, grown, history, metrics_init = state["step"], state["stage"], state["history"], state["metrics_init"]
        common.print0(f"resumed from {path} at step {step}, model of stage {grown + 1}: {arch_str(model.arch)}")
    optimizer, scaler = make_optimizer(model, args, device), torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if state is not None and not args.eval_only and state.get("optimizer") is not None:
        common.restore(state, path, optimizer=optimizer, scaler=scaler)
    total = step if args.eval_only else total
    common.print0(f"{len(train)} pairs in {len(sizes)} stages |D_t| = {sizes}; global batch {gb} ({args.batch_size} x "
                  f"{world}); steps per stage {[e - b for b, e in zip([0] + ends, ends)]}, {total} steps; amp {amp}; "
                  f"{'no growth' if args.no_grow else f'growth, PIM lam {args.pim_momentum}'}")
    if args.tiny and step == 0 and metrics_init is None and total > 0:
        metrics_init = evaluate(model, test, zeroshot, tok, args, device, amp)  # the random-init baseline
        common.print0("untrained: " + " ".join(f"{k} {v:.2f}" for k, v in metrics_init.items()))
    net = common.distribute(model, device, args.compile)
    grow = functools.partial(grow_model, args=args, vit_cfg=vit_cfg, bert_cfg=bert_cfg)

    def save():  # a collective: every rank calls it
        common.save_checkpoint(path, "growclip", step, {
            "args": vars(args), "arch": model.arch, "stage": grown, "stage_sizes": sizes, "history": history,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "metrics_init": metrics_init}, finite=[model])

    t0, seen, m = time.time(), 0, None
    while step < total:
        stage = next(t for t, e in enumerate(ends) if step < e)
        begin = ends[stage - 1] if stage else 0
        if stage > grown:  # a new chunk of data has arrived: grow (the model of the last stage stays as it is)
            new_arch = model.arch if args.no_grow else search(
                model, stage, train[:sizes[stage]], sizes[stage] / sizes[stage - 1], grow, tok, args, device, amp)
            model = grow(model, new_arch, stage)
            optimizer = make_optimizer(model, args, device)  # Sec. 10 of the spec: state does not survive a reshape
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
            net = common.distribute(model, device, args.compile)
            grown = stage
            common.print0(f"stage {stage + 1}: |D_t| {sizes[stage]}, grown to {arch_str(model.arch)} "
                          f"({sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters)")
        lrs = common.cosine_schedule(args.lr, 0.0, ends[stage] - begin, min(args.warmup, (ends[stage] - begin) // 5))
        ds = PairSet(train[:sizes[stage]], tok, args)
        sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed + 7919 * stage)
        model.train()  # evaluate() leaves eval mode behind: train with dropout on (pretrained encoders)
        stop = min(total, ends[stage])
        bar = tqdm(total=stop - step, disable=not common.is_main(), desc=f"stage {stage + 1}")
        it = batches(ds, sampler, args, tok.pad_token_id, (step - begin) // spe[stage], (step - begin) % spe[stage])
        for batch in it:
            loss = train_step(net, optimizer, scaler, batch, lrs[step - begin], device, amp)
            step, seen = step + 1, seen + gb
            bar.update()
            if step % args.log_every == 0 or step == stop:
                v = (common.all_reduce_sum(loss.float().reshape(1)) / world).item()
                if not math.isfinite(v):
                    raise SystemExit(f"error: loss is {v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {"step": step, "stage": stage + 1, "loss": v,
                                                   "lr": lrs[step - begin - 1], "logit_scale": model.scale().item(),
                                                   "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{v:.3f}")
            if step == stop:
                break
        bar.close()
        if step == ends[stage]:  # the stage is done: evaluate on the test sets
            m = evaluate(model, test, zeroshot, tok, args, device, amp)
            row = {"stage": stage + 1, "pairs": sizes[stage], **{k: model.arch[k] for k in ("vision_layers",
                   "text_layers", "shared_layers", "width", "heads")},
                   "params": sum(p.numel() for p in model.parameters()), **m}
            history.append(row)
            common.print0(f"stage {stage + 1} done: {arch_str(model.arch)}, "
                          + " ".join(f"{k} {v:.2f}" for k, v in m.items()))
            common.log_jsonl(args.output_dir, {"step": step, "stage_eval": row})
        save()  # at every stage end and when --max-steps stops the run
    metrics = m if m is not None and step == ends[-1] else evaluate(model, test, zeroshot, tok, args, device, amp)
    if metrics_init is not None:
        head = next(iter(metrics))
        metrics = {head: metrics[head], f"{head}_init": metrics_init[head], **metrics}
    for h in history:
        metrics.update({f"stage{h['stage']}_{k}": v for k, v in h.items() if k != "stage"})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    if common.is_main() and history:
        cols = [k for k in history[-1] if k not in ("stage", "pairs")]
        print("stage  pairs  " + "  ".join(cols))
        for h in history:
            print(f"{h['stage']:5d}  {h['pairs']:5d}  " + "  ".join(f"{h[k]:.2f}" if isinstance(h[k], float)
                                                               else str(h[k]) for k in cols))
    common.print0(" ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not k.startswith("stage")))
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
