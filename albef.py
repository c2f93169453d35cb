"""ALBEF: vision-language pretraining that aligns image and text features before fusing them, + momentum distillation.

Paper: "Align before Fuse: Vision and Language Representation Learning with Momentum Distillation",
Junnan Li, Ramprasaath R. Selvaraju, Akhilesh D. Gotmare, Shafiq Joty, Caiming Xiong, Steven C. H. Hoi.
NeurIPS 2021, arXiv:2107.07651. Official code: github.com/salesforce/ALBEF (its losses are reproduced exactly).

Method. A ViT-B/16 image encoder and the first 6 layers of BERT (text encoder) are aligned by an image-text
contrastive loss (ITC) on 256-d [CLS] projections *before* the last 6 BERT layers fuse text and image tokens by
cross-attention; the fusion encoder learns image-text matching (ITM) on hard negatives sampled from the ITC
similarities, and masked language modelling (MLM). A momentum (EMA) copy of the encoders fills queues of 65,536
features (extra ITC negatives) and gives soft pseudo-targets mixed into the ITC and MLM targets (momentum
distillation, MoD). L = L_itc + L_itm + L_mlm.

Where: L_itc (Sec. 3.2) and its MoD form L_itc^mod (Sec. 3.3): `soft_targets`, `itc_loss`; L_itm on hard negatives
(Sec. 3.2): `sample_hard_negatives`; L_mlm and L_mlm^mod: `mask_tokens`, `mlm_distill_loss`; momentum model and
queues (Sec. 3.3): `Queue`, `dequeue_and_enqueue`; alpha warm-up: `alpha_at`; the official lr curve: `albef_lr`;
one step: `albef_losses`; retrieval with top-k ITM re-ranking (Sec. 5): `rerank_topk`, `recall_at_k`.

Launch:
  python albef.py --tiny                                             # CPU smoke run, synthetic shapes
  python albef.py --data pretrain.json --eval-data coco_test.json --image-root IMAGES          # one GPU
  torchrun --nproc_per_node=8 albef.py --data coco.json,vg.json,cc3m_train.json,cc3m_val.json,sbu.json \\
      --eval-data coco_test.json --image-root IMAGES                # paper: 4M pairs, 8 x 64, 30 epochs
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 albef.py \\
      --lr 2e-4 ...                                                  # 16 GPUs: official advice, lr x 2
  Retrieval fine-tuning (COCO; Flickr: --epochs 10 --k-test 128) takes the official Retrieval_coco.yaml (384 px,
  8 x 32, lr 1e-5 -> 1e-6, 5 epochs) and starts from a checkpoint of this file or a released one (ALBEF.pth,
  ALBEF_4M.pth; mscoco.pth, flickr30k.pth to evaluate with --eval-only): `convert_official`, `load_init`.
  torchrun --nproc_per_node=8 albef.py --mode retrieval --init ALBEF.pth --data coco_train.json \\
      --val-data coco_val.json --eval-data coco_test.json --image-root IMAGES --output-dir runs/albef_coco
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
import torchvision.transforms as T
from torchvision.datasets.folder import pil_loader
from tqdm import tqdm
import transformers
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, ViTConfig, ViTModel

import common

# --- Arguments ---
RETRIEVAL = dict(image_res=384, batch_size=32, lr=1e-5, min_lr=1e-6, warmup_lr=1e-5, warmup_steps=1, epochs=5,
                 max_len=30)  # official configs/Retrieval_coco.yaml (Flickr: --epochs 10 --k-test 128)
TINY = dict(epochs=5, batch_size=16, lr=1e-3, workers=0, log_every=10, image_res=32, embed_dim=32, queue_size=64,
            fusion_layer=2, max_len=16, k_test=10, min_lr=1e-4, warmup_lr=1e-4, warmup_steps=2, warmup_iters=10)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ALBEF (arXiv 2107.07651): ITC + ITM + MLM with momentum distillation",
                                allow_abbrev=False)
    p.add_argument("--data", default="synthetic", help="'synthetic', or official JSON file(s), comma-separated: "
                   "pretraining [{image, caption}]; --mode retrieval [{image, caption, image_id}]")
    p.add_argument("--output-dir", default="runs/albef")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="per process (paper: 64 x 8 GPUs = 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW lr for a global batch of 512 (official advice "
                   "for more GPUs: scale linearly, 16 GPUs 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--mode", choices=["pretrain", "retrieval"], default="pretrain", help="pretrain: L_itc + L_itm + "
                   "L_mlm (Sec. 3.2); retrieval fine-tuning: L_itc + L_itm, positives by image id (Sec. 5)")
    m.add_argument("--eval-data", default=None, help="retrieval test JSON [{image, caption: [...]}]")
    m.add_argument("--val-data", default=None, help="--mode retrieval: val JSON, evaluated with the test set after "
                   "every epoch; the epoch best on val is kept (official Retrieval.py)")
    m.add_argument("--image-root", default="", help="prefix of relative image paths in the JSON files")
    m.add_argument("--vit", default="facebook/deit-base-patch16-224", help="ViT-B/16 initialised from DeiT "
                   "(Sec. 3.1): HF name or local dir")
    m.add_argument("--text-encoder", default="bert-base-uncased", help="BERT-base (Sec. 3.1): HF name or local "
                   "dir, weights and tokenizer")
    m.add_argument("--no-pretrained", action="store_true", help="[inferred] from scratch: no download")
    m.add_argument("--init", default=None, help="[inferred] start from an albef checkpoint (pretrain -> retrieval)")
    m.add_argument("--fusion-layer", type=int, default=6, help="first of the BERT layers that form the fusion "
                   "encoder, with cross-attention (Sec. 3.1: 6 text + 6 fusion)")
    m.add_argument("--image-res", type=int, default=256, help="256 pretraining, 384 fine-tuning (Sec. 3.5)")
    m.add_argument("--embed-dim", type=int, default=256, help="dim of g_v(v_cls), g_w(w_cls) (Sec. 3.2)")
    m.add_argument("--temp", type=float, default=0.07, help="initial learnable temperature tau of L_itc (Sec. 3.2)")
    m.add_argument("--queue-size", type=int, default=65536, help="queue size M (Sec. 3.2)")
    m.add_argument("--momentum", type=float, default=0.995, help="momentum model EMA m (Sec. 3.5)")
    m.add_argument("--alpha", type=float, default=0.4, help="MoD weight alpha (Sec. 3.3), ramped up from 0 during "
                   "the 1st epoch (Sec. 3.5)")
    m.add_argument("--mlm-prob", type=float, default=0.15, help="MLM masking probability (Sec. 3.2)")
    m.add_argument("--max-len", type=int, default=25, help="text tokens in training (official: 25 pretraining, "
                   "30 retrieval)")
    m.add_argument("--k-test", type=int, default=256, help="k of the ITM re-ranking of the ITC top-k (Sec. 5; "
                   "official: 256 COCO, 128 Flickr)")
    m.add_argument("--min-lr", type=float, default=1e-5, help="end of the per-epoch cosine (official config)")
    m.add_argument("--warmup-lr", type=float, default=1e-5, help="first warm-up lr (official config)")
    m.add_argument("--warmup-steps", type=int, default=20, help="warm-up stairs of --warmup-iters iterations "
                   "(official code: 20 x 100 = 2000; the paper says 1000 iterations)")
    m.add_argument("--warmup-iters", type=int, default=100, help="iterations per warm-up stair (official code)")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}
    for preset, on in ((RETRIEVAL, args.mode == "retrieval"), (TINY, args.tiny)):  # flags given on the command
        for k, v in preset.items() if on else ():  # line win over both presets
            if k not in given:
                setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check that depends on the flags and the number of processes alone (no files)."""
    global_batch = args.batch_size * world
    if args.batch_size < 2:  # ITM samples its negatives inside the batch
        raise SystemExit("error: --batch-size must be at least 2 (ITM needs in-batch negatives)")
    if args.queue_size % global_batch:  # official: the queue takes whole global batches (an assert, no trim)
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a multiple of the global batch {global_batch} "
                         f"({args.batch_size} x {world} processes); change --batch-size or --queue-size")
    return args


# --- Data ---
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's, as official
COLORS = {"red": (.85, .15, .15), "green": (.15, .7, .25), "blue": (.2, .3, .95), "yellow": (.95, .85, .15),
          "purple": (.6, .2, .75), "white": (.95, .95, .95)}
SHAPES = ("circle", "square", "triangle", "cross")


def pre_caption(caption, max_words=30):
    """Official caption cleaning: lowercase, drop ,.'!?"()*#:;~, '-' and '/' to spaces, '<person>' to 'person',
    collapse whitespace, keep the first max_words words."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(re.sub(r"\s{2,}", " ", caption).strip(" \n").split(" ")[:max_words])


def scene_captions(scene):
    """Five captions of a two-shape scene: colour, shape and layout all matter for retrieval."""
    a, b = f"{scene[0]} {scene[1]}", f"{scene[2]} {scene[3]}"
    if scene[4]:  # vertical layout
        return [f"a {a} above a {b}", f"a {b} below a {a}", f"a {a} on top of a {b}", f"a {b} under a {a}",
                f"a {b} with a {a} over it"]
    return [f"a {a} left of a {b}", f"a {b} right of a {a}", f"a {a} to the left of a {b}",
            f"a {b} to the right of a {a}", f"a {a} with a {b} on its right"]


def render(scene, res):
    """Draw the scene with random size, position and noise from the python/torch RNGs (seeded by the caller)."""
    yy, xx = torch.meshgrid(torch.arange(res) + .5, torch.arange(res) + .5, indexing="ij")
    img = 0.3 + 0.05 * torch.randn(3, res, res)
    for k, (c, s) in enumerate((scene[:2], scene[2:4])):
        r = res * random.uniform(.12, .17)
        along, across = res * (.27 + .46 * k + random.uniform(-.05, .05)), res * random.uniform(.3, .7)
        dy, dx = (yy - along, xx - across) if scene[4] else (yy - across, xx - along)
        mask = {"circle": dy ** 2 + dx ** 2 <= r * r, "square": (dy.abs() <= .8 * r) & (dx.abs() <= .8 * r),
                "triangle": (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),
                "cross": ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r))}[s]
        img[:, mask] = torch.tensor(COLORS[c])[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_data(args):
    """Shape scenes in the shapes of the official files: train [(scene, captions, idx)], test one per scene."""
    scenes = [(c1, s1, c2, s2, v) for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES
              for v in (True, False) if (c1, s1) != (c2, s2)]
    rng = random.Random(args.seed)
    n_train, n_test = (1024, 100) if args.tiny else (20000, 1000)
    train = [(s, scene_captions(s), i) for i, s in enumerate(rng.choices(scenes, k=n_train))]
    test = [{"image": s, "caption": scene_captions(s)} for s in rng.sample(scenes, n_test)]  # distinct scenes
    if args.mode == "pretrain":
        return train, test, None
    unseen = sorted(set(scenes) - {it["image"] for it in test})
    val = [{"image": s, "caption": scene_captions(s)} for s in rng.sample(unseen, n_test)]
    return [(s, [c], i) for s, caps, i in train for c in caps], test, val  # retrieval: one entry per caption


def read_json(path, keys):
    """An official ALBEF JSON list, with one-line errors for a missing file, bad JSON or a missing key."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass an official ALBEF JSON file or --data synthetic")
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
    """-> train [(image, [captions], idx)], test and val (retrieval only) [{image, caption: [...]}]; idx =
    contiguous image id."""
    if args.data == "synthetic":
        return synthetic_data(args)
    captions = lambda c: [pre_caption(x) for x in (c if isinstance(c, list) else [c])]  # noqa: E731
    retrieval = args.mode == "retrieval"
    if not args.eval_data or (retrieval and not args.val_data):
        raise SystemExit(f"error: a real --data needs --eval-data <test JSON>{' and --val-data <val JSON>' * retrieval}"
                         " for the evaluation")
    train, ids = [], {}
    for path in args.data.split(","):
        for it in read_json(path, ("image", "caption") + (("image_id",) if retrieval else ())):
            idx = ids.setdefault(it["image_id"], len(ids)) if retrieval else len(train)
            train.append((os.path.join(args.image_root, it["image"]), captions(it["caption"]), idx))
    test, val = ([{"image": os.path.join(args.image_root, it["image"]), "caption": captions(it["caption"])}
                  for it in read_json(path, ("image", "caption"))] if path else None
                 for path in (args.eval_data, args.val_data if retrieval else None))
    missing = [p for p in [train[0][0]] + [it["image"] for it in test + (val or [])] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: image {missing[0]} not found; check --image-root")
    return train, test, val


def make_tokenizer(args, captions):
    """BERT's WordPiece tokenizer; from scratch, a word vocabulary of the captions written to the output dir."""
    if not (args.tiny or args.no_pretrained):
        try:
            tok = BertTokenizer.from_pretrained(args.text_encoder)
            error = "" if len(tok) > len(tok.all_special_tokens) else "no vocabulary found"  # transformers 5 offline
        except OSError as e:
            error = str(e).splitlines()[0]
        if error:
            raise SystemExit(f"error: cannot load the tokenizer of {args.text_encoder!r} ({error}); pass a local "
                             "BERT directory with --text-encoder, or --no-pretrained")
        return tok
    init_vocab = os.path.join(os.path.dirname(args.init), "vocab.txt") if args.init else ""
    if os.path.exists(init_vocab):  # fine-tuning keeps the vocabulary of the checkpoint it starts from
        return BertTokenizer(init_vocab)
    counts = collections.Counter(w for c in captions for w in c.split())
    words = sorted(counts, key=lambda w: (-counts[w], w))[:30522 - 5]  # BERT-base vocabulary size at most
    path = os.path.join(args.output_dir, "vocab.txt")
    tmp = f"{path}.tmp{os.getpid()}"  # every rank writes the same file atomically
    with open(tmp, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    os.replace(tmp, path)
    return BertTokenizer(path)


class PairSet(torch.utils.data.Dataset):
    """(image, ids, mlm ids, mlm labels, idx); a random caption, the augmentation and the MLM mask depend only on
    the sampler's per-sample seed, so resumed and multi-process runs see exactly the same batches."""

    def __init__(self, entries, tok, args):
        self.entries, self.tok, self.args = entries, tok, args
        scale = (0.2, 1.0) if args.mode == "pretrain" else (0.5, 1.0)  # official pretrain / fine-tune crops
        self.transform = T.Compose([  # official: crop, flip, RandomAugment(2, 7); CLIP normalisation in .image
            T.RandomResizedCrop(args.image_res, scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), RandomAugment(2, 7), T.PILToTensor()])  # uint8: normalised on the device

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        i, seed = key
        image, captions, idx = self.entries[i]
        tok, a = self.tok, self.args
        with common.seeded(seed):
            # synthetic scenes are re-rendered (new jitter) instead of cropped/flipped: flips would swap left/right
            image = render(image, a.image_res) if isinstance(image, tuple) else self.transform(pil_loader(image))
            ids = torch.tensor(tok(random.choice(captions), truncation=True, max_length=a.max_len)["input_ids"])
            if a.mode == "pretrain":
                mlm_ids, labels = mask_tokens(ids, len(tok), tok.mask_token_id, tok.pad_token_id, tok.cls_token_id,
                                              a.mlm_prob)
            else:
                mlm_ids, labels = ids, torch.full_like(ids, -100)
        return image, ids, mlm_ids, labels, idx


class RandomAugment:
    """The official RandomAugment(2, 7) (dataset/randaugment.py): N ops drawn with replacement from its list (no
    colour ops: captions name colours), each applied with probability 0.5, at level M of 10: enhance factor
    0.1 + 1.8 M/10 (1.36), shear 0.3 M/10 (0.21, about the top-left corner), translate M px (10 M/10, whatever
    the image size), rotate 3 M degrees (21); shear, translate and rotate take a random sign; grey fill."""
    OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
           "TranslateY", "Rotate")

    def __init__(self, n=2, m=7):
        self.n, self.m = n, m

    def level(self, op):
        """The op's argument at level m, with its random sign."""
        v = {"Brightness": 0.1 + 1.8 * self.m / 10, "Sharpness": 0.1 + 1.8 * self.m / 10, "ShearX": 0.3 * self.m / 10,
             "ShearY": 0.3 * self.m / 10, "TranslateX": 10 * self.m / 10, "TranslateY": 10 * self.m / 10,
             "Rotate": 30 * self.m / 10}.get(op)
        return v if op in ("Brightness", "Sharpness") or v is None or random.random() < 0.5 else -v

    @staticmethod
    def apply(img, op, v):  # PIL ops (uint8 in, uint8 out), the official cv2 maps
        TF, fill, bilinear = T.functional, [128, 128, 128], T.InterpolationMode.BILINEAR
        if op == "Identity":
            return img
        if op in ("AutoContrast", "Equalize"):
            return TF.autocontrast(img) if op == "AutoContrast" else TF.equalize(img)
        if op in ("Brightness", "Sharpness"):
            return (TF.adjust_brightness if op == "Brightness" else TF.adjust_sharpness)(img, v)
        if op == "Rotate":  # about the centre, as cv2.getRotationMatrix2D((W/2, H/2))
            return TF.rotate(img, v, bilinear, fill=fill)
        # official cv2 maps (x, y) -> (x + v y, y) (ShearX) and (x - v, y) (TranslateX); torchvision's signs are
        # the opposite, and it takes the shear as an angle with tan(angle) = factor
        shear = -math.degrees(math.atan(v))
        return TF.affine(img, 0.0, [-v * (op == "TranslateX"), -v * (op == "TranslateY")], 1.0,
                         [shear * (op == "ShearX"), shear * (op == "ShearY")], bilinear, fill, center=[0, 0])

    def __call__(self, img):
        for op in random.choices(self.OPS, k=self.n):
            if random.random() < 0.5:
                img = self.apply(img, op, self.level(op))
        return img


def collate(batch, pad_id=0):
    """Pad to the longest text of the batch (official padding='longest')."""
    images, ids, mlm_ids, labels, idx = zip(*batch)
    pad = lambda seqs, v: nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=v)  # noqa: E731
    att = pad([torch.ones_like(t) for t in ids], 0)
    return torch.stack(images), pad(ids, pad_id), att, pad(mlm_ids, pad_id), pad(labels, -100), torch.tensor(idx)


class EvalImages(torch.utils.data.Dataset):  # read through a Subset (a shard): no __len__ needed
    def __init__(self, test, res, seed):
        self.images, self.res, self.seed = [it["image"] for it in test], res, seed
        self.transform = T.Compose([T.Resize((res, res), interpolation=T.InterpolationMode.BICUBIC), T.PILToTensor()])

    def __getitem__(self, i):
        if isinstance(self.images[i], tuple):
            with common.seeded(self.seed * 1000003 + i):  # a fixed rendering per test image
                return render(self.images[i], self.res)
        return self.transform(pil_loader(self.images[i]))


# --- Model ---
def resize_pos_embed(pos, n_patches):
    """(1, 1+N, D) -> (1, 1+n, D): bicubic on the patch grid, for a new resolution (official, 224 -> 256 -> 384)."""
    s, t = math.isqrt(pos.shape[1] - 1), math.isqrt(n_patches)  # same size: bicubic is the identity
    grid = pos[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(t, t), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([pos[:, :1], grid.to(pos.dtype)], 1)


def build_encoders(args, vocab_size):
    """ViT-B/16 + BERT-base with cross-attention in layers >= fusion_layer: pretrained, from scratch, or tiny."""
    if args.tiny:  # [inferred] 2-layer ViT (32 px, 8 px patches), 2 text + 2 fusion layers, width 64, 2 heads;
        # init std 0.02 * sqrt(768 / 64) keeps BERT-base's branch-to-residual scale; no dropout
        small = dict(hidden_size=64, num_attention_heads=2, intermediate_size=256, initializer_range=0.06)
        vit_cfg = ViTConfig(image_size=args.image_res, patch_size=8, num_hidden_layers=2, qkv_bias=True,
                            layer_norm_eps=1e-6, **small)
        bert_cfg = BertConfig(vocab_size=vocab_size, num_hidden_layers=4, max_position_embeddings=64,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
    else:  # the paper's shapes: ViT-B/16 (timm LayerNorm eps 1e-6) and BERT-base
        vit_cfg = ViTConfig(image_size=args.image_res, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)
        bert_cfg = BertConfig(vocab_size=vocab_size)
    # is_decoder + add_cross_attention only make transformers create the cross-attention blocks; our own
    # forward (`bert_layer`) keeps self-attention bidirectional, as in ALBEF's fusion encoder
    bert_cfg.is_decoder = bert_cfg.add_cross_attention = True
    transformers.logging.set_verbosity_error()  # silence the resulting 'is_decoder' warning
    if args.tiny or args.no_pretrained:
        common.print0("building the encoders from scratch (random init, no download)")
        vit, bert = ViTModel(vit_cfg, add_pooling_layer=False), BertForMaskedLM(bert_cfg)
    else:
        try:
            src = ViTModel.from_pretrained(args.vit, add_pooling_layer=False)
            bert = BertForMaskedLM.from_pretrained(args.text_encoder, is_decoder=True, add_cross_attention=True)
        except OSError as e:
            raise SystemExit(f"error: cannot load pretrained weights ({str(e).splitlines()[0]}); pass local "
                             "directories with --vit/--text-encoder, or --no-pretrained to build ViT-B/16 + "
                             "BERT-base from scratch") from None
        src.config.image_size, src.config.layer_norm_eps = args.image_res, 1e-6  # timm's eps, as official
        vit, state = ViTModel(src.config, add_pooling_layer=False), src.state_dict()
        key = "embeddings.position_embeddings"
        state[key] = resize_pos_embed(state[key], (args.image_res // src.config.patch_size) ** 2)  # 14x14 -> 16x16
        vit.load_state_dict(state)
    for layer in bert.bert.encoder.layer[:args.fusion_layer]:
        del layer.crossattention  # Sec. 3.1: the text encoder has self-attention only
    return Encoders(vit, bert, args.embed_dim, args.fusion_layer)


def attend(att, x, ctx, mask):
    """One BERT attention block (transformers' parameters) with SDPA: bidirectional, mask (B, 1, 1, Lk) bool."""
    s = att.self
    split = lambda t: t.view(t.shape[0], t.shape[1], s.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(s.query(x)), split(s.key(ctx)), split(s.value(ctx)), attn_mask=mask,
                                         dropout_p=s.dropout.p if att.training else 0.0)
    return att.output(out.transpose(1, 2).flatten(2), x)  # dense, dropout, LayerNorm(residual)


def bert_layer(layer, x, mask, image=None):
    x = attend(layer.attention, x, x, mask)
    if image is not None:  # fusion layers: cross-attention to all image tokens (image mask all ones)
        x = attend(layer.crossattention, x, image, None)
    return layer.output(layer.intermediate(x), x)


class Encoders(nn.Module):
    """What has a momentum copy (Sec. 3.3): image encoder, BERT with its MLM head, both projections."""

    def __init__(self, vit, bert, embed_dim, fusion_layer):
        super().__init__()
        self.visual_encoder, self.text_encoder, self.fusion_layer = vit, bert, fusion_layer
        self.vision_proj = nn.Linear(vit.config.hidden_size, embed_dim)  # g_v
        self.text_proj = nn.Linear(bert.config.hidden_size, embed_dim)  # g_w

    def image(self, x):
        """uint8 images (B, 3, H, W), normalised here on the device (the data workers hand over 4x fewer bytes than
        float images) -> tokens (B, 1+P, D), normalised g_v(v_cls) (B, E) in fp32."""
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
        x = (x.float() / 255 - mean) / std
        tokens = self.visual_encoder(pixel_values=x).last_hidden_state
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)

    def text(self, ids, att):
        """Text encoder (layers < fusion_layer) -> tokens (B, L, D), normalised g_w(w_cls) (B, E)."""
        x, mask = self.text_encoder.bert.embeddings(input_ids=ids), att[:, None, None, :].bool()
        for layer in self.text_encoder.bert.encoder.layer[:self.fusion_layer]:
            x = bert_layer(layer, x, mask)
        return x, F.normalize(self.text_proj(x[:, 0]).float(), dim=-1)

    def fusion(self, x, att, image):
        """Fusion encoder: text tokens (B, L, D) attend to image tokens (B, 1+P, D) -> (B, L, D)."""
        mask = att[:, None, None, :].bool()
        for layer in self.text_encoder.bert.encoder.layer[self.fusion_layer:]:
            x = bert_layer(layer, x, mask, image)
        return x

    def mlm_logits(self, ids, att, image):
        """All 12 layers, then the MLM head at every position, as official (static shapes, no graph break): (B, L, V)"""
        return self.text_encoder.cls(self.fusion(self.text(ids, att)[0], att, image))


class ALBEF(nn.Module):
    """The online model: encoders, ITM head and temperature (the last two have no momentum copy)."""

    def __init__(self, enc, temp):
        super().__init__()
        self.enc = enc
        self.itm_head = nn.Linear(enc.text_encoder.config.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    def forward(self, *batch, alpha, model_m, queue, mode):
        return albef_losses(self, model_m, queue, *batch, alpha=alpha, mode=mode)


class Queue(nn.Module):
    """Momentum features of past batches (Sec. 3.2) and their image ids; a seeded random start, as official."""

    def __init__(self, dim, size, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image", F.normalize(torch.randn(dim, size, generator=g), dim=0))  # (E, M)
        self.register_buffer("text", F.normalize(torch.randn(dim, size, generator=g), dim=0))  # (E, M)
        self.register_buffer("idx", torch.full((1, size), -100))  # (1, M)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, image_feat, text_feat, idx):
        """Enqueue the all-gathered batch (no gradient), overwriting the oldest columns."""
        for q, keys in ((self.image, image_feat), (self.text, text_feat), (self.idx, idx[:, None])):
            ptr = dequeue_and_enqueue(q, self.ptr, common.concat_all_gather(keys))
        self.ptr.copy_(ptr)


# --- Method ---
def dequeue_and_enqueue(queue, ptr, keys):
    """queue (D, M), keys (n, D): columns [ptr, ptr+n) <- keys^T; returns the new pointer (int or 0-d tensor)."""
    n, size = keys.shape[0], queue.shape[1]
    if size % n:
        raise ValueError(f"queue size {size} is not a multiple of the gathered batch {n}")
    cols = (ptr + torch.arange(n, device=queue.device)) % size  # tensor indexing: no host sync on CUDA
    queue.index_copy_(1, cols, keys.T.to(queue.dtype))
    return (ptr + n) % size


def idx_targets(idx, idx_all):
    """Retrieval positives: row-normalised 1[idx_i == idx_all_j] (all captions of an image, batch and queue)."""
    pos = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    return pos / pos.sum(1, keepdim=True)


def soft_targets(sim_m, hard, alpha):
    """MoD pseudo-targets (Sec. 3.3): alpha * softmax(momentum sims) + (1 - alpha) * hard targets; rows sum to 1."""
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i):
    """L_itc (Sec. 3.2) with (soft) targets: (H(y_i2t, p_i2t) + H(y_t2i, p_t2i)) / 2, averaged over the batch. With MoD
    targets this has the gradient of the paper's (1-alpha) CE + alpha KL (the two differ by a constant)."""
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * tgt_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * tgt_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def hard_negative_weights(sim_bb, idx=None):
    """ITM negative sampling distribution: softmax over in-batch sims without the positive (retrieval: any same-image
    entry). Masked *before* the softmax: what the official code samples, but no row underflows to 0 (#18, #93)."""
    b = sim_bb.shape[0]
    same = torch.eye(b, dtype=torch.bool, device=sim_bb.device) if idx is None else idx.view(-1, 1) == idx.view(1, -1)
    return F.softmax(sim_bb.float().masked_fill(same, float("-inf")), dim=1)


def sample_hard_negatives(sim_i2t_bb, sim_t2i_bb, idx=None, generator=None):
    """-> (neg_img (B,) per text from sim_t2i, neg_txt (B,) per image from sim_i2t), Sec. 3.2. Degenerate rows (NaN
    sims, or a batch showing one image only) fall back to uniform over the other items instead of crashing."""
    b = sim_i2t_bb.shape[0]
    if b < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    others = 1 - torch.eye(b, device=sim_i2t_bb.device)

    def draw(sim):
        w = hard_negative_weights(sim, idx)
        ok = torch.isfinite(w).all(1, keepdim=True) & (w.sum(1, keepdim=True) > 0)
        return torch.multinomial(torch.where(ok, w, others), 1, generator=generator).squeeze(1)
    return draw(sim_t2i_bb), draw(sim_i2t_bb)


def itm_labels(b, device=None):
    """B positives, then 2B negatives (text with a negative image, image with a negative text)."""
    return torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(device)


def mask_tokens(ids, vocab_size, mask_id, pad_id, cls_id, p=0.15, generator=None):
    """BERT masking as official: Bernoulli(p) per token except [PAD]/[CLS]; 80% -> [MASK], half of the rest a
    random id, the rest unchanged. -> (masked ids, labels with -100 at unmasked tokens)"""
    ids, labels = ids.clone(), ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, p), generator=generator).bool() & (ids != pad_id) & (ids != cls_id)
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & masked
    ids[replaced] = mask_id
    rand = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & masked & ~replaced
    ids[rand] = torch.randint(vocab_size, ids.shape, generator=generator)[rand]
    return ids, labels


def mlm_distill_loss(logits, labels, soft_labels, alpha):
    """L_mlm^mod (Sec. 3.3) as official: (1-alpha) CE(labels) + alpha * mean_masked -sum_v q_m(v) log p(v).
    logits, soft_labels: (N, V); labels: (N,), -100 where not masked. Means over the masked positions by weights
    (no boolean indexing, so shapes stay static); 0 when nothing is masked (the official code gives NaN)."""
    keep = (labels != -100).float()
    n = keep.sum().clamp_min(1.0)
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(logp, labels, ignore_index=-100, reduction="sum") / n
    return (1 - alpha) * ce + alpha * (-(soft_labels.float() * logp).sum(-1) * keep).sum() / n


def alpha_at(epoch, it, iters_per_epoch, alpha, warm_up=True):
    """Sec. 3.5: alpha ramps up linearly from 0 during the first epoch."""
    return alpha if epoch > 0 or not warm_up else alpha * min(1.0, it / iters_per_epoch)


def albef_lr(epoch, it, base=1e-4, warm=1e-5, min_lr=1e-5, warm_steps=20, step=100, epochs=30):
    """The official (timm) schedule: in epoch 0 a staircase from `warm` to `base` in `warm_steps` stairs of `step`
    iterations; from epoch 1 on, a per-epoch cosine from `base` to `min_lr` over `epochs` epochs."""
    if epoch == 0:
        return warm + min(it // step, warm_steps) * (base - warm) / warm_steps
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def albef_losses(model, model_m, queue, image, ids, att, mlm_ids, mlm_labels, idx, alpha, mode):
    """One ALBEF step (official order) -> (L_itc, L_itm, L_mlm, momentum features to enqueue)."""
    enc, b, pretrain = model.enc, image.shape[0], mode == "pretrain"
    if pretrain:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)  # official pretraining clamps tau in place (fine-tuning does not)
    img_tok, v = enc.image(image)  # (B, 1+P, D), (B, E)
    txt_tok, t = enc.text(ids, att)  # (B, L, D), (B, E)
    with torch.no_grad():  # the caller has already done the EMA update of model_m
        img_tok_m, v_m = model_m.image(image)
        t_m = model_m.text(ids, att)[1]
    with torch.autocast(v.device.type, enabled=False):  # ITC in fp32: logits reach 1 / tau = 1000
        keys_t = torch.cat([t_m, queue.text.T])  # (B+M, E): the batch is never in the queue during its step
        keys_v = torch.cat([v_m, queue.image.T])
        with torch.no_grad():
            hard = (torch.eye(b, keys_t.shape[0], device=v.device) if pretrain
                    else idx_targets(idx, torch.cat([idx, queue.idx[0]])))
            tgt_i2t = soft_targets(v_m @ keys_t.T / model.temp, hard, alpha)  # teacher sims use the same tau
            tgt_t2i = soft_targets(t_m @ keys_v.T / model.temp, hard, alpha)
        sim_i2t, sim_t2i = v @ keys_t.T / model.temp, t @ keys_v.T / model.temp  # s(I, T) / tau, (B, B+M)
        loss_itc = itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i)
    # ITM: B positive pairs, a hard negative image per text and a hard negative text per image, fused at once
    neg_img, neg_txt = sample_hard_negatives(sim_i2t[:, :b].detach(), sim_t2i[:, :b].detach(),
                                             None if pretrain else idx)
    fused = enc.fusion(torch.cat([txt_tok, txt_tok, txt_tok[neg_txt]]), torch.cat([att, att, att[neg_txt]]),
                       torch.cat([img_tok, img_tok[neg_img], img_tok]))
    loss_itm = F.cross_entropy(model.itm_head(fused[:, 0]).float(), itm_labels(b, v.device))
    loss_mlm = torch.zeros((), device=v.device)
    if pretrain:  # MLM conditioned on the image; the momentum model's soft labels use its own image tokens
        with torch.no_grad():
            soft = F.softmax(model_m.mlm_logits(mlm_ids, att, img_tok_m).float(), dim=-1).flatten(0, 1)
        logits = enc.mlm_logits(mlm_ids, att, img_tok).flatten(0, 1)  # (B*L, V)
        with torch.autocast(v.device.type, enabled=False):  # log-softmax over the vocabulary in fp32
            loss_mlm = mlm_distill_loss(logits, mlm_labels.flatten(), soft, alpha)
    return loss_itc, loss_itm, loss_mlm, (v_m, t_m, idx)


# --- Evaluation ---
def recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img):
    """Official R@K: an image counts when its best-ranked caption is in the top K; a caption needs its image. The rank
    of a column is the number of entries above it plus equal ones to its left (a stable sort), one row at a time."""
    def ranks(scores, positives):  # 0-based rank of the best positive per row
        out = []
        for s, p in zip(scores.float(), positives):
            v = s[p][:, None]  # (P, 1): the score of each positive
            above = (s > v) | (s == v) & (torch.arange(len(s)) < p[:, None])  # ranked above it (ties: left first)
            out.append(above.sum(1).min())
        return torch.stack(out)
    tr = ranks(scores_i2t, [torch.as_tensor(p) for p in img2txt])
    ir = ranks(scores_t2i, [torch.as_tensor([p]) for p in txt2img])
    out = {f"{d}_r{k}": 100 * (r < k).float().mean().item() for d, r in (("txt", tr), ("img", ir)) for k in (1, 5, 10)}
    out.update({f"{d}_r_mean": sum(out[f"{d}_r{k}"] for k in (1, 5, 10)) / 3 for d in ("txt", "img")})
    return {"r_mean": (out["txt_r_mean"] + out["img_r_mean"]) / 2, **out}


def shard(n):
    """This process's contiguous rows of range(n), the last repeated to ceil(n / world) rows (all_gather), own count."""
    rank, per = common.get_rank(), math.ceil(n / common.get_world_size())
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)], max(0, min(per, n - rank * per))


def rerank_topk(sims, k, itm, images, text_blocks=None, chunk=256):
    """Official protocol: each row of sims (N_img, N_txt) and of sims.T keeps its top-k columns by ITC similarity,
    scored by ITM, the rest -100 -> scores_i2t, scores_t2i. Scores the pairs whose image is in `images`, by blocks:
    text_blocks yields (text ids (b,), block) (default: all texts, None), itm(image ids, text ids, rows in the block,
    block) -> (<= chunk,) scores. A pair in both top-k lists is scored once, each top-k entry on one process."""
    (n_img, n_txt), dev = sims.shape, sims.device
    top_i2t, top_t2i = sims.topk(min(k, n_txt), dim=1).indices, sims.T.topk(min(k, n_img), dim=1).indices
    val_i2t, val_t2i = torch.zeros(top_i2t.shape, device=dev), torch.zeros(top_t2i.shape, device=dev)
    mine = torch.isin(torch.arange(n_img, device=dev), torch.as_tensor(images, dtype=torch.long, device=dev))
    for texts, block in text_blocks or [(torch.arange(n_txt, device=dev), None)]:
        where = torch.full((n_txt,), -1, device=dev).index_copy_(0, texts, torch.arange(len(texts), device=dev))
        ia, ka = (mine[:, None] & (where[top_i2t] >= 0)).nonzero(as_tuple=True)  # i2t entries scored here now
        jb, kb = ((where >= 0)[:, None] & mine[top_t2i]).nonzero(as_tuple=True)  # t2i entries
        key = torch.cat([ia * n_txt + top_i2t[ia, ka], top_t2i[jb, kb] * n_txt + jb])  # image * N_txt + text
        pairs, inv = key.unique(return_inverse=True)
        s = torch.cat([torch.zeros(0, device=dev)] + [itm(p // n_txt, p % n_txt, where[p % n_txt], block).float()
                                                       for p in pairs.split(chunk) if len(p)])
        val_i2t[ia, ka], val_t2i[jb, kb] = s[inv[:len(ia)]], s[inv[len(ia):]]
    common.all_reduce_sum(val_i2t), common.all_reduce_sum(val_t2i)  # exact: one process holds each entry, 0 the rest
    return (torch.full((n_img, n_txt), -100.0, device=dev).scatter_(1, top_i2t, val_i2t),
            torch.full((n_txt, n_img), -100.0, device=dev).scatter_(1, top_t2i, val_t2i))


@torch.no_grad()
def evaluate(model, test, tok, args, device, amp):
    """Image-text retrieval: ITC top-k, ITM re-ranking, R@1/5/10 both ways (official Retrieval.py). Each process
    embeds a shard of the images and of the texts and keeps only those tokens (image tokens in the amp dtype, which
    the fusion casts them to); the E-dim ITC features are gathered: sims and top-k lists are the same everywhere. A
    pair is fused where its image is, the text tokens going round 64 per process at a time (all_gather)."""
    model = common.unwrap(model)
    enc, training = model.enc, model.training
    model.eval()
    texts = [c for it in test for c in it["caption"]]  # positives: img2txt[i] = its captions, txt2img[j] = its image
    img2txt = torch.arange(len(texts)).split([len(it["caption"]) for it in test])
    txt2img = [i for i, caps in enumerate(img2txt) for _ in caps]
    t = tok(texts, padding="longest", truncation=True, max_length=30, return_tensors="pt")  # 30 tokens, as official
    ids, att = t["input_ids"].to(device), t["attention_mask"].to(device)  # all texts on every process: small
    (img_rows, n_img), (txt_rows, _) = shard(len(test)), shard(len(texts))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(EvalImages(test, args.image_res, args.seed), img_rows),
                                         batch_size=64, num_workers=args.workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator())
    rows, low = torch.tensor(txt_rows, device=device), {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with common.autocast(device, amp):
        txt = [enc.text(ids[r], att[r]) for r in rows.split(256)]
        img = [enc.image(x.to(device, non_blocking=True)) for x in loader]
        txt_tok, img_tok = torch.cat([a for a, _ in txt]), torch.cat([a.to(low or a.dtype) for a, _ in img])[:n_img]
        v_feat = common.concat_all_gather(torch.cat([b for _, b in img]))[:len(test)]
        t_feat = common.concat_all_gather(torch.cat([b for _, b in txt]))[:len(texts)]
        with torch.autocast(device.type, enabled=False):
            sims = v_feat @ t_feat.T  # (N_img, N_txt), fp32
        blocks = ((common.concat_all_gather(rows[s:s + 64]), common.concat_all_gather(txt_tok[s:s + 64]))
                  for s in range(0, len(txt_rows), 64))  # 64 texts of every process at a time: ids, (W x 64, L, D)

        def itm(image, text, row, block):  # raw ITM logit of "match", the official re-ranking score
            return model.itm_head(enc.fusion(block[row], att[text], img_tok[image - img_rows[0]])[:, 0]).float()[:, 1]
        s_i2t, s_t2i = rerank_topk(sims, args.k_test, itm, img_rows[:n_img], blocks)
    model.train(training)
    metrics = recall_at_k(s_i2t.cpu(), s_t2i.cpu(), img2txt, txt2img)
    metrics["itc_r_mean"] = recall_at_k(sims.cpu(), sims.T.cpu(), img2txt, txt2img)["r_mean"]  # before re-ranking
    return metrics


# --- Train ---
def convert_official(sd, vit_keys):
    """A released ALBEF state dict (ALBEF.pth, ALBEF_4M.pth; mscoco.pth, flickr30k.pth: BERT without 'bert.' and MLM
    head) -> (model, momentum model, queue) state dicts in this file's names: timm's ViT keys become transformers'
    (v5 names if `vit_keys` has them), fused qkv split into q, k, v; '*_m' keys go to the momentum model."""
    v5 = "layers.0.attention.q_proj.weight" in vit_keys
    block = "layers.{}." if v5 else "encoder.layer.{}."
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after",
             "attn.proj": "attention.o_proj" if v5 else "attention.output.dense",
             "mlp.fc1": "mlp.fc1" if v5 else "intermediate.dense", "mlp.fc2": "mlp.fc2" if v5 else "output.dense",
             "attn.qkv": [f"attention.{x}_proj" for x in "qkv"] if v5 else
             [f"attention.attention.{x}" for x in ("query", "key", "value")]}
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
    queues = {"image_queue": "image", "text_queue": "text", "idx_queue": "idx", "queue_ptr": "ptr"}
    model, model_m, queue = {}, {}, {}
    for key, val in sd.items():
        if key in queues:
            queue[queues[key]] = val.reshape(()) if key == "queue_ptr" else val
            continue
        head, _, rest = key.partition(".")
        out, pre = (model_m, "") if head.endswith("_m") else (model, "enc.")
        head = head.removesuffix("_m")
        if head == "visual_encoder":
            blk = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
            if blk:
                n, name, kind = blk.groups()
                parts = zip(names[name], val.chunk(3)) if name == "attn.qkv" else [(names[name], val)]
                for target, v in parts:
                    out[f"{pre}visual_encoder.{block.format(n)}{target}.{kind}"] = v
            else:
                name = rest if rest in top else rest.rpartition(".")[0]
                out[f"{pre}visual_encoder.{top[name]}{rest[len(name):]}"] = val
        elif head == "text_encoder":
            rest = rest if rest.startswith(("bert.", "cls.")) else "bert." + rest
            out[f"{pre}text_encoder.{rest}"] = val
        else:  # vision_proj, text_proj (both models), itm_head, temp
            out[(pre if head.endswith("proj") else "") + key.replace("_m.", ".")] = val
    return model, model_m, queue


def load_init(path, model, model_m, queue, n_patches):
    """Start from a checkpoint of this file or a released official one: both models and the feature queues (as
    official Retrieval.py), positions resized to the resolution; the MLM head stays as built where it is absent."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
        official = isinstance(raw, dict) and "visual_encoder.pos_embed" in raw.get("model", {})
    except Exception:
        official = False
    if official:
        sd, sd_m, q = convert_official(raw["model"], model.enc.visual_encoder.state_dict().keys())
    else:
        state = common.read_checkpoint(path, "albef")
        sd, sd_m, q = state["model"], state["momentum_model"], state["queue"]
    for module, state_dict, pre in ((model, sd, "enc."), (model_m, sd_m, "")):
        key = f"{pre}visual_encoder.embeddings.position_embeddings"
        state_dict[key] = resize_pos_embed(state_dict[key], n_patches)
        try:
            bad = module.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:
            raise SystemExit(f"error: {path} does not fit this model ({str(e).splitlines()[1].strip()}); use the "
                             "flags it was trained with") from None
        bad = [k for k in bad.missing_keys if not k.startswith(f"{pre}text_encoder.cls.")] + \
              [k for k in bad.unexpected_keys if not k.endswith("position_ids")]
        if bad:
            raise SystemExit(f"error: {path} does not fit this model ({bad[0]}); use the flags it was trained with")
    if q["image"].shape == queue.image.shape:
        queue.image.copy_(q["image"]), queue.text.copy_(q["text"])
    common.print0(f"initialised from {path}")


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: OpenMP threads only add overhead (and stall on busy machines)
    check_args(args, world)
    os.makedirs(args.output_dir, exist_ok=True)
    global_batch = args.batch_size * world
    train, test, val = load_data(args)
    tok = make_tokenizer(args, [c for _, caps, _ in train for c in caps])
    common.seed_everything(args.seed)  # identical initialisation on every rank
    model = ALBEF(build_encoders(args, len(tok)), args.temp).to(device)
    model_m = common.momentum_copy(model.enc)  # Sec. 3.3: exact copy at init, no gradient
    queue = Queue(args.embed_dim, args.queue_size, args.seed).to(device)
    head = model.enc.text_encoder.cls.predictions  # fine-tuning has no MLM: freeze the head, but not the word
    for p in (*head.transform.parameters(), head.bias):  # embeddings that its decoder shares
        p.requires_grad_(args.mode == "pretrain")
    path, step, metrics_init, best = os.path.join(args.output_dir, "checkpoint.pt"), 0, None, None
    if args.init and not os.path.exists(path):
        load_init(args.init, model, model_m, queue, (args.image_res // model.enc.visual_encoder.config.patch_size) ** 2)
    # official param groups: no weight decay for 1-D tensors and biases (the 0-d temperature *is* decayed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if p.ndim != 1 and not n.endswith(".bias")]},
              {"params": [p for n, p in named if p.ndim == 1 or n.endswith(".bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    common.seed_everything(args.seed + rank)
    state = common.load_checkpoint(path, "albef", resume=not args.eval_only)  # after the models: restores the RNG
    if state is not None:
        common.restore(state, path, model=model, momentum_model=model_m, queue=queue,
                       **({} if args.eval_only else {"optimizer": optimizer, "scaler": scaler}))
        step, metrics_init, best = state["step"], state.get("metrics_init"), state.get("best")
        common.print0(f"resumed from {path} at step {step}")
    ds = PairSet(train, tok, args)
    sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0, generator=torch.Generator(),
        collate_fn=functools.partial(collate, pad_id=tok.pad_token_id))  # own generator: global RNG untouched
    spe = sampler.steps_per_epoch
    total = args.epochs * spe if args.max_steps is None else min(args.max_steps, args.epochs * spe)
    total = step if args.eval_only else total
    common.print0(f"{len(ds)} training pairs, {len(test)} test images; global batch {global_batch} "
                  f"({args.batch_size} x {world}); {spe} steps/epoch, {total} steps; amp {amp}")
    if args.tiny and step == 0 and metrics_init is None and total > 0:
        metrics_init = evaluate(model, test, tok, args, device, amp)  # the random-init baseline
    net = common.distribute(model, device, args.compile)  # DDP, then compile
    # from_pretrained returns eval mode; official trains with dropout on, momentum model too (evaluate() restores it)
    model.train()
    model_m.train()

    def save(name="checkpoint.pt", **extra):  # a collective: every rank calls it
        common.save_checkpoint(os.path.join(args.output_dir, name), "albef", step, {
            "args": vars(args), "model": model.state_dict(), "momentum_model": model_m.state_dict(),
            "queue": queue.state_dict(), **extra}, finite=[model])

    t0, seen = time.time(), 0
    while step < total:
        epoch, start = step // spe, step % spe
        sampler.set_epoch(epoch, start)
        bar = tqdm(loader, total=min(spe - start, total - step), disable=not common.is_main(), desc=f"epoch {epoch}")
        for i, batch in enumerate(bar, start=start):
            lr = albef_lr(epoch, i, args.lr, args.warmup_lr, args.min_lr, args.warmup_steps, args.warmup_iters,
                          args.epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr
            alpha = alpha_at(epoch, i, spe, args.alpha)
            batch = [x.to(device, non_blocking=True) for x in batch]
            common.ema_update_(model_m, model.enc, args.momentum)  # official: before the momentum forward
            with common.autocast(device, amp):
                loss_itc, loss_itm, loss_mlm, keys = net(*batch, alpha=alpha, model_m=model_m, queue=queue,
                                                         mode=args.mode)
            loss = loss_itc + loss_itm + loss_mlm
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            queue.push(*keys)
            step, seen = step + 1, seen + global_batch
            if step % args.log_every == 0 or i == spe - 1 or step == total:
                v = torch.stack([loss, loss_itc, loss_itm, loss_mlm]).detach().float()
                v = (common.all_reduce_sum(v) / world).tolist()  # mean over processes
                if not math.isfinite(v[0]):
                    raise SystemExit(f"error: loss is {v[0]} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": v[0], "loss_itc": v[1],
                                 "loss_itm": v[2], "loss_mlm": v[3], "lr": lr, "alpha": alpha,
                                 "temp": model.temp.item(), "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{v[0]:.3f}", itc=f"{v[1]:.3f}", itm=f"{v[2]:.3f}", mlm=f"{v[3]:.3f}")
            if step == total:
                break
        if args.mode == "retrieval" and step % spe == 0:  # official Retrieval.py: val and test after every epoch
            res = {k: evaluate(model, v, tok, args, device, amp) for k, v in (("val", val), ("test", test))}
            common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, **res})
            if best is None or res["val"]["r_mean"] > best["val"]["r_mean"]:  # keep the epoch best on val
                best = {"epoch": epoch, **res}
                save("best.pt", epoch=epoch, val=res["val"])
        save(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=step // spe, metrics_init=metrics_init,
             best=best)  # at every epoch end and when --max-steps stops the run
    if best is not None and not args.eval_only:  # retrieval: the test scores of the epoch best on val
        metrics = {**best["test"], "best_epoch": best["epoch"], "val_r_mean": best["val"]["r_mean"]}
    else:
        metrics = evaluate(model, test, tok, args, device, amp)
    if metrics_init is not None:
        metrics = {"r_mean": metrics["r_mean"], "r_mean_init": metrics_init["r_mean"], **metrics}
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    common.print0(" ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if metrics_init is not None:  # --tiny: the untrained baseline beside the trained model
        common.print0(f"retrieval r_mean: random init {metrics_init['r_mean']:.2f} -> trained {metrics['r_mean']:.2f}")
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
