"""MMC: masked image modelling + momentum self-distillation + global contrast; zero-shot prompt segmentation.

Paper: "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding", Jiantao Wu, Shentong Mo, Muhammad
Awais, Sara Atito, Zhenhua Feng, Josef Kittler. arXiv:2308.11448 (2023). No official code is public: only the three
parts named in the abstract are sourced; every detail below is [inferred] and a flag.

Method. A ViT student sees a block-masked view and three losses train it against an EMA teacher that sees the clean
views: (1) masked image modelling, a linear pixel decoder reconstructs the masked patches (L1 on per-patch normalised
pixels, GMML/MAE style: local features stay specific); (2) global-to-local momentum self-distillation, the teacher's
centred, sharpened CLS distribution of the other view is the target of EVERY student patch token (a shared DINO head
h: tokens of an object gather around its global concept); (3) global contrast, MoCo-v3 InfoNCE between the student's
predicted CLS projection and the teacher's keys of the other view. L = l_mim L_mim + l_g2l L_g2l + l_con L_con.
Evaluation without fine-tuning: a prompt point picks one patch, its cosine map to every patch is thresholded; Jaccard
over a threshold sweep; intra- vs inter-object patch similarity and the overlap of their histograms.

Where: masking `block_mask`, `corrupt`; L_mim `patchify`, `mim_loss`; L_g2l `g2l_distill_loss`, `update_center`;
L_con `info_nce`, `dequeue_and_enqueue` (optional queue); EMA `cosine_momentum` + common.ema_update_; one step
`mmc_losses`; evaluation `prompt_segment`, `jaccard`, `interior_point`, `intra_inter_similarity`, `evaluate`.
[inferred] (spec Secs. 3-8): ViT-B/16 at 224 px from scratch (or --vit NAME|DIR), K = 8192, mask ratio 0.5, tau_s
0.1, tau_t 0.04 -> 0.07, centre momentum 0.9, tau_c 0.2, m0 0.996 -> 1, AdamW lr 5e-4 x B/256, weight decay 0.04 ->
0.4, clip 3, h's last layer frozen in epoch 1, teacher in eval mode, evaluation on its last-block tokens.

Launch (--batch-size is per process; the spec's global batch is 256):
  python mmc.py --tiny                                                       # CPU smoke run, synthetic shapes
  python mmc.py --data /data/coco/train2017.json --image-root /data/coco/train2017 --batch-size 64   # one GPU
  torchrun --nproc_per_node=8 mmc.py --data /data/imagenet/train --eval-data /data/coco/val2017.json \\
      --image-root /data/coco/val2017 --batch-size 32                       # 32 x 8 = 256, 100 epochs
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 mmc.py \\
      --data /data/imagenet/train --eval-data /data/davis --batch-size 16   # 16 x 16 = 256
  python mmc.py --vit facebook/dino-vitb16 --eval-only --eval-data /data/davis --output-dir runs/dino_zs
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2
from tqdm import tqdm
import transformers
from transformers import ViTConfig, ViTModel

import common

# --- Arguments ---
TINY = dict(epochs=8, batch_size=16, lr=0.032, workers=1, log_every=32, img_size=32, patch=4, dim=64, depth=2, heads=2,
            K=64, head_hidden=64, proj_dim=32, norm_pix=False, warmup_epochs=1, freeze_last_layer=0, m0=0.99,
            eval_size=128, tau_t=0.02, tau_t_final=0.03)  # [inferred] train + evaluation in about a minute on a CPU;
# tau_t: in 512 steps at 0.04 -> 0.07 the teacher's CLS target (h is trained on patches only) decays to uniform


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="MMC (arXiv 2308.11448): MIM + global-to-local distillation + contrast")
    p.add_argument("--data", default="synthetic", help="'synthetic', a folder with images/ (and masks/), or a COCO "
                   "instances JSON (with --image-root)")
    p.add_argument("--output-dir", default="runs/mmc")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="per process (spec: global batch 256)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak lr for a global batch of 256, scaled linearly "
                   "(lr x B/256) [inferred]")
    p.add_argument("--weight-decay", type=float, default=0.04, help="start of the cosine weight-decay schedule")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the student (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --output-dir (or --vit)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps; 0 = evaluate the "
                   "untrained model")
    p.add_argument("--tiny", action="store_true", help="small ViT, short schedule, small synthetic data")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--eval-data", default=None, help="images with masks for the zero-shot evaluation (same formats "
                   "as --data); default: --data (synthetic: a held-out set)")
    m.add_argument("--image-root", default="", help="folder of the file_name entries of a COCO JSON")
    m.add_argument("--gt", choices=["instance", "semantic"], default="instance", help="ground truth of a prompt: "
                   "its instance (DAVIS) or its class (VOC/ADE/COCO semantic; synthetic and COCO only)")
    m.add_argument("--eval-size", type=int, default=1000, help="images evaluated (spec: 1k held-out images)")
    m.add_argument("--vit", default=None, help="initialise the backbone from a pretrained ViT (HF name or local "
                   "folder); default: build it from scratch with --dim/--depth/--heads/--patch")
    m.add_argument("--img-size", type=int, default=224, help="crop size [inferred: ViT-B/16 at 224]")
    m.add_argument("--patch", type=int, default=16, help="patch size P")
    m.add_argument("--dim", type=int, default=768, help="ViT width (768 = ViT-B)")
    m.add_argument("--depth", type=int, default=12)
    m.add_argument("--heads", type=int, default=12)
    m.add_argument("--K", type=int, default=8192, help="prototypes K of the head h [inferred]")
    m.add_argument("--head-hidden", type=int, default=2048, help="hidden width of h and of g (DINO) [inferred]")
    m.add_argument("--head-bottleneck", type=int, default=256, help="bottleneck of h (DINO) [inferred]")
    m.add_argument("--proj-dim", type=int, default=256, help="output of the contrast projector g [inferred]")
    m.add_argument("--mask-ratio", type=float, default=0.5, help="block-masking ratio r [inferred]")
    m.add_argument("--corrupt", choices=["mask_token", "noise", "swap"], default="mask_token", help="masked patches: "
                   "a learnt [MASK] token (SimMIM), noise, or patches of another image (GMML) [inferred]")
    m.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=True,
                   help="MIM target: per-patch normalised pixels (MAE) [inferred]")
    m.add_argument("--mim-loss", choices=["l1", "l2"], default="l1", help="L_mim norm (GMML: L1) [inferred]")
    m.add_argument("--g2l-target", choices=["cls", "patch"], default="cls", help="target of student patch i: the "
                   "teacher's global CLS (MMC) or teacher patch i of the same view (iBOT-like ablation) [inferred]")
    m.add_argument("--g2l-tokens", choices=["all", "masked"], default="all", help="student tokens distilled [inferred]")
    m.add_argument("--tau-s", type=float, default=0.1, help="student temperature tau_s [inferred]")
    m.add_argument("--tau-t", type=float, default=0.04, help="teacher temperature tau_t at the start [inferred]")
    m.add_argument("--tau-t-final", type=float, default=0.07, help="tau_t after the warm-up [inferred]")
    m.add_argument("--tau-t-warmup", type=float, default=0.3, help="fraction of training for tau_t's warm-up")
    m.add_argument("--center-m", type=float, default=0.9, help="centre momentum: C <- m C + (1-m) mean h(c^t)")
    m.add_argument("--tau-c", type=float, default=0.2, help="InfoNCE temperature tau_c (MoCo v3) [inferred]")
    m.add_argument("--queue", type=int, default=0, help="MoCo-v2 queue of teacher keys; 0 = in-batch negatives")
    m.add_argument("--m0", type=float, default=0.996, help="teacher EMA momentum, cosine from m0 to 1 [inferred]")
    for name in ("mim", "g2l", "con"):
        m.add_argument(f"--lambda-{name}", type=float, default=1.0, help=f"weight of L_{name} [inferred]")
        m.add_argument(f"--no-{name}", action="store_true", help=f"drop L_{name} (ablation)")
    m.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warm-up [inferred]")
    m.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine lr (DINO) [inferred]")
    m.add_argument("--weight-decay-end", type=float, default=0.4, help="end of the weight-decay cosine (DINO)")
    m.add_argument("--clip-grad", type=float, default=3.0, help="gradient-norm clip; 0 = off")
    m.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with h's last layer frozen (DINO)")
    args = p.parse_args(argv)
    if args.tiny:  # the preset fills only what was not given on the command line
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for act in p._actions:
            if act.dest in TINY and not given & set(act.option_strings):
                setattr(args, act.dest, TINY[act.dest])
    return args


def check_args(args, world):
    """Every check that depends on the flags and the number of processes alone (no files): one-line errors."""
    if args.no_mim and args.no_g2l and args.no_con:
        raise SystemExit("error: --no-mim, --no-g2l and --no-con leave no loss; keep at least one")
    if args.img_size % args.patch:
        raise SystemExit(f"error: --img-size {args.img_size} is not a multiple of --patch {args.patch}")
    if not 0 <= args.mask_ratio < 1:
        raise SystemExit("error: --mask-ratio must be in [0, 1)")
    if not args.no_mim and args.mask_ratio == 0:
        raise SystemExit("error: L_mim needs masked patches: --mask-ratio > 0 or --no-mim")
    if min(args.tau_s, args.tau_t, args.tau_t_final, args.tau_c) <= 0:
        raise SystemExit("error: temperatures must be positive")
    if args.batch_size < 1 or (not args.no_con and args.batch_size * world < 2):
        raise SystemExit("error: L_con needs at least 2 images in the global batch; raise --batch-size")
    if args.queue % (2 * args.batch_size * world):  # both views' keys of the global batch enter at once
        raise SystemExit(f"error: --queue {args.queue} is not a multiple of 2 x the global batch "
                         f"({args.batch_size} x {world}); change --queue or --batch-size")
    if args.max_steps is not None and args.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    return args


# --- Data ---
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES = ("disc", "square", "triangle", "ring", "ellipse", "cross")


def textured_shapes(n, size, seed, max_objects=4):
    """TexturedShapes [inferred, spec Sec. 7]: 1..max_objects objects of 6 classes, class = shape + texture, a random
    colour per object (two tones of one hue), random scale, rotation and texture phase, drawn in order (later ones
    occlude), on a low-frequency colour field with a fine distractor texture and pixel noise; vectorised over images.
    -> uint8 images (n, 3, S, S), instance maps (n, S, S) (0 = background), semantic maps (class + 1)."""
    rng = np.random.default_rng(seed)
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    low = torch.from_numpy(rng.uniform(0.35, 0.65, (n, 3, 3, 3)).astype(np.float32))  # 3x3 colour grid per image
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).numpy()
    img = img * (0.85 + 0.15 * (np.sin(2 * np.pi * (xx - yy) / 3.0) > 0))  # fine diagonal distractor texture
    inst, sem = np.zeros((n, size, size), np.int64), np.zeros((n, size, size), np.int64)
    count = rng.integers(1, max_objects + 1, n)
    col = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]  # noqa: E731, (n, 1, 1)
    for k in range(max_objects):
        cls = rng.integers(len(SHAPES), size=n)
        cy, cx, r, a = col(0.2, 0.8) * size, col(0.2, 0.8) * size, col(0.25, 0.4) * size, col(0, 2 * np.pi)
        y, x = yy - cy, xx - cx
        u, v = x * np.cos(a) + y * np.sin(a), y * np.cos(a) - x * np.sin(a)  # the object's rotated frame
        d = np.hypot(u, v)
        inside = np.stack([d <= r, np.maximum(abs(u), abs(v)) <= 0.8 * r, (v <= 0.5 * r) & (v >= 1.7 * abs(u) - r),
                           (d <= r) & (d >= 0.5 * r), np.hypot(u, 1.8 * v) <= 1.1 * r,
                           (np.minimum(abs(u), abs(v)) <= 0.3 * r) & (np.maximum(abs(u), abs(v)) <= r)], 1)
        pu, pv, f = u + col(0, 10), v + col(0, 10), col(0.16, 0.22)  # random phase, frequency ~5 px periods
        s = lambda t: np.sin(2 * np.pi * f * t) > 0  # noqa: E731
        tex = np.stack([s(pu), s(pv), s(pu) ^ s(pv), np.cos(2 * np.pi * f * pu) + np.cos(2 * np.pi * f * pv) > 1,
                        s(pu + pv), s(np.hypot(pu, pv))], 1)  # one texture per class
        pick = lambda m: np.take_along_axis(m, cls[:, None, None, None], 1)[:, 0]  # noqa: E731
        inside, tex = pick(inside) & (k < count)[:, None, None], pick(tex)
        colour = rng.uniform(0.15, 1.0, (n, 3, 1, 1)).astype(np.float32)
        img = np.where(inside[:, None], colour * np.where(tex, 1.0, 0.45)[:, None], img)
        inst, sem = np.where(inside, k + 1, inst), np.where(inside, cls[:, None, None] + 1, sem)
    img = img + rng.normal(0, 0.15, img.shape).astype(np.float32)
    images = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(inst), torch.from_numpy(sem)


IMAGE_EXT = (".jpg", ".jpeg", ".png")


def read_image(path):
    """uint8 (3, H, W) RGB, with a one-line error for a file that is not an image."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: cannot read image {path} ({str(e).splitlines()[0]})") from None


def read_mask(path):
    """(H, W) int64 region ids from a .npy or a PNG: grey / palette PNGs give ids directly (255 = ignore, as VOC and
    DAVIS), colour PNGs one id per colour (black = background, VOC's border colour (224, 224, 192) = ignore)."""
    try:
        if path.endswith(".npy"):
            return torch.from_numpy(np.asarray(np.load(path), dtype=np.int64))
        m = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED).long()
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: cannot read mask {path} ({str(e).splitlines()[0]})") from None
    if m.shape[0] == 1:
        return torch.where(m[0] == 255, -1, m[0])
    code = (m[0] << 16) | (m[1] << 8) | m[2]
    colours, ids = torch.unique(code, return_inverse=True)  # black (code 0) sorts first: id 0 when present
    ids = ids + int(colours[0] != 0)
    return torch.where(code == (224 << 16 | 224 << 8 | 192), -1, ids)


def polygon_mask(polygons, h, w):
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> bool (h, w) by the even-odd rule at pixel centres."""
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    out = np.zeros((h, w), bool)
    for poly in polygons:
        px, py = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
        inside = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in zip(px, py, np.roll(px, -1), np.roll(py, -1)):
            cross = (y0 > yy) != (y1 > yy)
            xs = x0 + (yy - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0)
            inside ^= cross & (xx < xs)
        out |= inside
    return torch.from_numpy(out)


def read_coco(path, image_root, gt, limit=None):
    """A COCO instances JSON -> [(image path, mask builder)]; crowd regions are left out (background)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass a COCO instances JSON, a folder with images/, or synthetic")
    try:
        with open(path) as f:
            coco = json.load(f)
        images = {im["id"]: im for im in coco["images"]}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (KeyError, TypeError):
        raise SystemExit(f"error: {path} is not a COCO instances file: it needs 'images' with 'id' entries") from None
    anns = {}
    for n, a in enumerate(coco.get("annotations", [])):
        if a.get("image_id") not in images or "segmentation" not in a:
            raise SystemExit(f"error: {path}: annotation {n} has no 'segmentation' or an unknown 'image_id'")
        if not a.get("iscrowd", 0):
            anns.setdefault(a["image_id"], []).append(a)

    def build(im):
        mask = torch.zeros(im["height"], im["width"], dtype=torch.long)
        for k, a in enumerate(anns.get(im["id"], [])):
            seg = a["segmentation"]
            if isinstance(seg, dict):  # uncompressed RLE, column-major
                flat = torch.repeat_interleave(torch.arange(len(seg["counts"])) % 2, torch.tensor(seg["counts"]))
                region = flat.bool().reshape(seg["size"][1], seg["size"][0]).T
            else:
                region = polygon_mask(seg, im["height"], im["width"])
            mask[region] = a["category_id"] if gt == "semantic" else k + 1
        return mask
    images = list(images.values())[:limit]
    return [(os.path.join(image_root, im["file_name"]), lambda im=im: build(im)) for im in images]


def read_folder(root, need_masks, limit=None):
    """root/images/**/* with root/masks/**/<stem>.png|.npy (DAVIS: link JPEGImages/480p and Annotations/480p there), or
    a tree of images alone for training (an ImageFolder root) -> [(image, mask or None)], sorted, recursive."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root} not found; pass a folder with images/ and masks/, a COCO JSON, or synthetic")
    img_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
    files = sorted(os.path.relpath(os.path.join(d, f), img_dir) for d, _, names in os.walk(img_dir, followlinks=True)
                   for f in names if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise SystemExit(f"error: {img_dir} holds no .jpg/.png images")
    out = []
    for f in files[:limit]:
        stem = os.path.join(root, "masks", os.path.splitext(f)[0])
        mask = next((stem + e for e in (".png", ".npy") if os.path.isfile(stem + e)), None)
        if need_masks and mask is None:
            raise SystemExit(f"error: image {os.path.join(img_dir, f)} has no mask {stem}.png or .npy")
        out.append((os.path.join(img_dir, f), mask))
    return out


def list_source(src, args, need_masks, limit=None):
    if src.endswith(".json"):
        return read_coco(src, args.image_root, args.gt, limit)
    return read_folder(src, need_masks, limit)


def load_eval(args):
    """The evaluation set at --img-size: uint8 images (M, 3, S, S) and region maps (M, S, S) (-1 = ignore).
    Read whole before training, so that a bad file stops the run before it touches a checkpoint."""
    s = args.img_size
    if (args.eval_data or args.data) == "synthetic":
        images, inst, sem = textured_shapes(args.eval_size, 32 if args.tiny else 64, seed=args.seed + 1,
                                            max_objects=2 if args.tiny else 4)
        masks = inst if args.gt == "instance" else sem
        if images.shape[-1] != s:
            images = F.interpolate(images.float(), size=(s, s), mode="bilinear", antialias=True).round().byte()
            masks = F.interpolate(masks[:, None].float(), size=(s, s), mode="nearest")[:, 0].long()
        return images, masks
    images, masks = [], []
    for path, mask in list_source(args.eval_data or args.data, args, need_masks=True, limit=args.eval_size):
        img = read_image(path)
        mk = mask() if callable(mask) else read_mask(mask)
        if mk.shape != img.shape[1:]:
            raise SystemExit(f"error: mask {mask if isinstance(mask, str) else path} is {tuple(mk.shape)}, its image "
                             f"{path} is {tuple(img.shape[1:])}; masks must have their image's size")
        images.append(v2.functional.resize(img, [s, s], antialias=True))
        masks.append(F.interpolate(mk[None, None].float(), size=(s, s), mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(masks)


class Images(torch.utils.data.Dataset):
    """uint8 images for pretraining (no labels): the synthetic tensor or files read on demand."""

    def __init__(self, args):
        if args.data == "synthetic":
            self.images = textured_shapes(1024 if args.tiny else 20000, 32 if args.tiny else 64, seed=args.seed,
                                          max_objects=2 if args.tiny else 4)[0]
        else:
            self.images = [p for p, _ in list_source(args.data, args, need_masks=False)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return read_image(self.images[i]) if isinstance(self.images[i], str) else self.images[i]


def train_transform(size):
    """Two global crops (spec Sec. 3): RandomResizedCrop (0.25, 1), flip, colour jitter, grey; blur and hue jitter
    above 64 px only (at 32 px blur erases the textures, and hue is 2/3 of a --tiny run's augmentation time)."""
    big = size > 64
    blur = [v2.RandomApply([v2.GaussianBlur(9, (0.1, 2.0))], p=0.5)] if big else []
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1 if big else 0.0)], p=0.8),
                       v2.RandomGrayscale(0.2), *blur])


class MaskedViews(torch.utils.data.Dataset):
    """(index, sample_seed) -> two uint8 views and their block masks; seeded by (seed, epoch, index) only, so a
    resumed run and two processes see what one uninterrupted process sees."""

    def __init__(self, base, args):
        self.base, self.transform = base, train_transform(args.img_size)
        self.grid, self.ratio = args.img_size // args.patch, args.mask_ratio

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key
        image = self.base[i]
        with common.seeded(seed):
            v1, v2_ = self.transform(image), self.transform(image)
        g = torch.Generator().manual_seed(seed)
        m1, m2 = (block_mask(self.grid, self.grid, self.ratio, g).flatten() for _ in range(2))
        return v1, v2_, m1, m2


def normalise(x):
    """uint8 (B, 3, H, W) on the device -> float, ImageNet-normalised."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# --- Model ---
def build_backbone(args):
    """The ViT: pretrained from --vit (a name or a folder), else from scratch with the given shape."""
    use_mask = args.corrupt == "mask_token" and args.mask_ratio > 0
    if args.vit:
        try:
            vit = ViTModel.from_pretrained(args.vit, add_pooling_layer=False, use_mask_token=use_mask)
        except OSError as e:
            raise SystemExit(f"error: cannot load --vit {args.vit} ({str(e).splitlines()[0]}); pass a local folder "
                             "written by save_pretrained, or leave --vit out to build the ViT from scratch") from None
        if vit.config.image_size != args.img_size or vit.config.patch_size != args.patch:
            raise SystemExit(f"error: --vit {args.vit} is {vit.config.image_size} px with {vit.config.patch_size} px "
                             f"patches; pass --img-size {vit.config.image_size} --patch {vit.config.patch_size}")
        return vit
    cfg = ViTConfig(hidden_size=args.dim, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                    intermediate_size=4 * args.dim, image_size=args.img_size, patch_size=args.patch, qkv_bias=True,
                    layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(cfg, add_pooling_layer=False, use_mask_token=use_mask)


def mlp(d_in, hidden, d_out, layers):
    mods, d = [], d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, d_out))


class DINOHead(nn.Module):
    """h (spec Sec. 3b): 3-layer MLP -> bottleneck -> L2-norm -> weight-normalised linear to K prototypes (the
    weight-norm gain fixed at 1, DINO's norm_last_layer), shared by CLS and patch tokens. fp32 logits."""

    def __init__(self, dim, hidden, bottleneck, K):
        super().__init__()
        self.mlp = mlp(dim, hidden, bottleneck, 3)
        self.last = nn.Parameter(torch.empty(K, bottleneck).uniform_(-1, 1) / math.sqrt(bottleneck))

    def forward(self, x):
        z = self.mlp(x)
        with torch.autocast(z.device.type, enabled=False):  # cosine logits / tau_s = 0.1: keep them fp32
            return F.linear(F.normalize(z.float(), dim=-1), F.normalize(self.last.float(), dim=-1))


class Encoder(nn.Module):
    """What the teacher copies (spec Sec. 3): backbone, h and g."""

    def __init__(self, args):
        super().__init__()
        self.backbone = build_backbone(args)
        d = self.backbone.config.hidden_size
        self.head = None if args.no_g2l else DINOHead(d, args.head_hidden, args.head_bottleneck, args.K)
        self.proj = None if args.no_con else mlp(d, args.head_hidden, args.proj_dim, 2)

    def tokens(self, x, mask=None):
        return self.backbone(pixel_values=x, bool_masked_pos=mask).last_hidden_state  # (B, 1+N, D)


class MMC(nn.Module):
    """The student: the encoder plus what has no momentum copy, the pixel decoder and the contrast predictor."""

    def __init__(self, args):
        super().__init__()
        self.enc = Encoder(args)
        d, p = self.enc.backbone.config.hidden_size, args.patch
        self.decoder = None if args.no_mim else nn.Linear(d, p * p * 3)
        self.pred = None if args.no_con else mlp(args.proj_dim, args.head_hidden, args.proj_dim, 2)

    def forward(self, x1, x2, m1, m2, teacher, center, queue, tau_t, args):
        return mmc_losses(self, teacher, center, queue, x1, x2, m1, m2, tau_t, args)


class State(nn.Module):
    """Buffers the checkpoint carries beside the models: the distillation centre and the key queue."""

    def __init__(self, K, dim, size, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("center", torch.zeros(K))
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=g), dim=1))  # (Q, E)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


# --- Method ---
def patchify(imgs, p):
    """(B, 3, H, W) -> (B, N, p*p*3), patches in raster order, pixels (row, col, channel) within a patch."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, h, w):
    """(B, N, p*p*3) -> (B, 3, H, W), the inverse of patchify."""
    b = x.shape[0]
    return x.reshape(b, h // p, w // p, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h, w)


def block_mask(gh, gw, ratio, generator=None):
    """BEiT-style block masking: random rectangles (area >= 4 patches, aspect 0.3..3.3) while they fit, then single
    patches to reach exactly round(ratio * gh * gw) masked patches. -> bool (gh, gw)."""
    target, tries = round(ratio * gh * gw), 4 * gh * gw
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    u, left = torch.rand(tries, 4, generator=generator).tolist(), target  # one draw: no per-block RNG calls
    for a, b, c, d in u:
        if left < 4:
            break
        area, aspect = 4 + (left - 4) * a, math.exp(math.log(0.3) * (1 - 2 * b))
        h, w = min(gh, max(1, round(math.sqrt(area * aspect)))), min(gw, max(1, round(math.sqrt(area / aspect))))
        top, lft = int(c * (gh - h + 1)), int(d * (gw - w + 1))
        new = int((~mask[top:top + h, lft:lft + w]).sum())
        if 0 < new <= left:
            mask[top:top + h, lft:lft + w] = True
            left -= new
    free = (~mask).flatten().nonzero()[:, 0]
    mask.view(-1)[free[torch.randperm(len(free), generator=generator)[:left]]] = True
    return mask


def corrupt(x, mask, kind, p):
    """GMML corruptions in pixel space (the mask_token kind is done in the embedding by the ViT itself):
    x (B, 3, H, W) normalised, mask (B, N) -> x with masked patches replaced by noise or another image's."""
    if kind == "mask_token":
        return x
    gh = x.shape[-2] // p
    pix = mask.view(-1, 1, gh, x.shape[-1] // p).repeat_interleave(p, 2).repeat_interleave(p, 3)
    other = torch.randn_like(x) if kind == "noise" else x.roll(1, 0)
    return torch.where(pix, other, x)


def mim_loss(pred, target, mask, kind="l1"):
    """L_mim: mean over the masked patches of the mean |dec(z_i) - target_i| (or squared). pred, target (B, N, D)."""
    err = (pred - target).abs() if kind == "l1" else (pred - target) ** 2
    w = mask.float()
    return (err.mean(-1) * w).sum() / w.sum().clamp(min=1)


def norm_pix(target, eps=1e-6):
    """MAE's per-patch normalisation of the pixel target (B, N, D)."""
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def g2l_distill_loss(s_patch_logits, t_logits, center, tau_s, tau_t, weight=None):
    """L_g2l = -(1/N) sum_i sum_k p_t[k] log p_s^i[k], p_t = softmax((h(c^t) - C) / tau_t), p_s^i = softmax(h(z_i)
    / tau_s): the teacher's global distribution is the target of every student patch. s (B, N, K); t (B, K), or
    (B, N, K) for the patch-target ablation; weight (B, N) selects tokens (e.g. the masked ones). fp32."""
    with torch.autocast(s_patch_logits.device.type, enabled=False):
        p_t = F.softmax((t_logits.float() - center) / tau_t, dim=-1)
        if p_t.dim() == 2:
            p_t = p_t[:, None]
        ce = -(p_t * F.log_softmax(s_patch_logits.float() / tau_s, dim=-1)).sum(-1)  # (B, N)
        w = torch.ones_like(ce) if weight is None else weight.float()
        return ((ce * w).sum(1) / w.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def update_center(center, t_logits, m=0.9):
    """C <- m C + (1 - m) mean of the teacher logits over the GLOBAL batch (one all-reduce), in place."""
    t = t_logits.reshape(-1, t_logits.shape[-1]).float()
    batch = common.all_reduce_sum(t.sum(0)) / (t.shape[0] * common.get_world_size())
    return center.mul_(m).add_(batch, alpha=1 - m)


def info_nce(q, k, tau, queue=None):
    """L_con = 2 tau CE(q k^T / tau, diag) (MoCo v3): local queries against the keys of the global batch (gathered,
    no gradient: they come from the teacher) and the queue. q, k (B, E), any scale; queue (Q, E) normalised."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(q.float(), dim=1), F.normalize(common.concat_all_gather(k.float()), dim=1)
        keys = k if queue is None or len(queue) == 0 else torch.cat([k, queue.float()])
        labels = torch.arange(q.shape[0], device=q.device) + common.get_rank() * q.shape[0]
        return 2 * tau * F.cross_entropy(q @ keys.T / tau, labels)


@torch.no_grad()
def dequeue_and_enqueue(queue, ptr, keys):
    """FIFO ring buffer: keys (n, E) overwrite the oldest rows from ptr; returns the new pointer."""
    if len(queue) % len(keys):
        raise ValueError(f"queue of {len(queue)} is not a multiple of {len(keys)} keys")
    queue[ptr:ptr + len(keys)] = keys
    return (ptr + len(keys)) % len(queue)


def cosine_momentum(step, total, m0):
    """m(t) = 1 - (1 - m0) (cos(pi t / T) + 1) / 2: m0 rising to 1 (DINO/iBOT)."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def mmc_losses(model, teacher, center, queue, x1, x2, m1, m2, tau_t, args):
    """One MMC step on uint8 views x1, x2 (B, 3, H, W) and masks m1, m2 (B, N) -> (L_mim, L_g2l, L_con, teacher
    targets for the centre, teacher keys for the queue). Both views go through student (masked) and teacher
    (clean); every term is averaged over the two directions."""
    b, zero = x1.shape[0], x1.new_zeros((), dtype=torch.float32)
    x, mask = normalise(torch.cat([x1, x2])), torch.cat([m1, m2])  # (2B, 3, H, W), (2B, N)
    use_token = args.corrupt == "mask_token" and args.mask_ratio > 0
    tok = model.enc.tokens(corrupt(x, mask, args.corrupt, args.patch), mask if use_token else None)
    with torch.no_grad():
        t_tok = teacher.tokens(x)
    swap = lambda t: torch.cat([t[b:], t[:b]])  # noqa: E731, view u's target comes from view v
    loss_mim = loss_g2l = loss_con = targets = keys = zero
    if model.decoder is not None:  # Eq. L_mim
        target = norm_pix(patchify(x, args.patch)) if args.norm_pix else patchify(x, args.patch)
        with torch.autocast(x.device.type, enabled=False):
            loss_mim = mim_loss(model.decoder(tok[:, 1:]).float(), target.float(), mask, args.mim_loss)
    if model.enc.head is not None:  # Eq. L_g2l
        with torch.no_grad():
            targets = teacher.head(t_tok[:, 0]) if args.g2l_target == "cls" else teacher.head(t_tok[:, 1:])
        t = swap(targets) if args.g2l_target == "cls" else targets  # patch targets: the same view, position i
        loss_g2l = g2l_distill_loss(model.enc.head(tok[:, 1:]), t, center, args.tau_s, tau_t,
                                    mask if args.g2l_tokens == "masked" else None)
    if model.pred is not None:  # Eq. L_con, q = pred(g(c^s)), k = g_t(c^t) of the other view
        q = model.pred(model.enc.proj(tok[:, 0]))
        with torch.no_grad():
            keys = teacher.proj(t_tok[:, 0])
        k = swap(keys)
        loss_con = (info_nce(q[:b], k[:b], args.tau_c, queue) + info_nce(q[b:], k[b:], args.tau_c, queue)) / 2
    return loss_mim, loss_g2l, loss_con, targets, keys


# --- Evaluation ---
THRESHOLDS = torch.arange(20) * 0.05  # t in {0.00, 0.05, ..., 0.95}


def prompt_segment(patch_feats, point, threshold):
    """The similarity map of the prompt patch to all patches and its thresholded mask. patch_feats (h, w, D),
    point (y, x) in patch coordinates -> sim (h, w) cosine, mask (h, w) bool = sim >= threshold."""
    f = F.normalize(patch_feats.float(), dim=-1)
    sim = f @ f[point[0], point[1]]
    return sim, sim >= threshold


def jaccard(pred, gt, valid=None):
    """|pred & gt| / |pred | gt| over the valid pixels (1 when both are empty). Broadcasts over leading dims."""
    valid = torch.ones_like(gt, dtype=torch.bool) if valid is None else valid
    inter, union = ((pred & gt & valid).flatten(-2).sum(-1).float(), ((pred | gt) & valid).flatten(-2).sum(-1).float())
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def interior_point(mask):
    """The deepest pixel of a bool mask (H, W): argmax of the chessboard distance to the background (the image border
    counts as background), by repeated erosion with max-pool; the first in raster order on ties."""
    cur, depth = mask.float()[None, None], torch.zeros(mask.shape)
    while cur.any():
        depth += cur[0, 0]
        cur = 1 - F.max_pool2d(F.pad(1 - cur, (1, 1, 1, 1), value=1.0), 3, stride=1)
    i = int(depth.flatten().argmax())
    return i // mask.shape[1], i % mask.shape[1]


def patch_labels(regions, p):
    """Pixel region ids (H, W) -> per-patch id (h, w) where one region covers >= 50% of the patch, else -1."""
    ids = regions.clamp(min=-1) + 1  # -1 ignore -> 0
    onehot = F.one_hot(ids, int(ids.max()) + 1).permute(2, 0, 1).float()[None]
    frac = F.avg_pool2d(onehot, p)[0]  # (R+1, h, w)
    best, arg = frac.max(0)
    return torch.where((best >= 0.5) & (arg > 0), arg - 1, -1)


def pair_similarities(feats, regions):
    """Cosine of every unordered pair of labelled patches: (intra values, inter values). feats (h, w, D), regions
    (h, w) ids (-1 = unlabelled; the background counts as a region)."""
    f = F.normalize(feats.reshape(-1, feats.shape[-1]).float(), dim=-1)
    r = regions.reshape(-1)
    keep = r >= 0
    f, r = f[keep], r[keep]
    sim = f @ f.T
    upper = torch.ones_like(sim, dtype=torch.bool).triu(1)
    same = r[:, None] == r[None]
    return sim[upper & same], sim[upper & ~same]


def histogram(v, bins=50):
    """Counts of the values v in `bins` equal bins on [-1, 1]."""
    return torch.histc(v.float().clamp(-1, 1), bins, -1, 1)


def histogram_overlap(ha, hb):
    """sum_b min(h_a(b), h_b(b)) of two histograms, each normalised (0 = separated, 1 = identical)."""
    return torch.minimum(ha / ha.sum().clamp(min=1), hb / hb.sum().clamp(min=1)).sum().item()


def intra_inter_similarity(feats, regions):
    """-> (mean intra-region cosine, mean inter-region cosine, histogram overlap) of one image's patches."""
    intra, inter = pair_similarities(feats, regions)
    return intra.mean().item(), inter.mean().item(), histogram_overlap(histogram(intra), histogram(inter))


@torch.no_grad()
def extract(backbone, images, args, device, amp):
    """Frozen L2-normalised last-block patch tokens (M, h, w, D), in eval mode (spec Sec. 8)."""
    training, g = backbone.training, args.img_size // args.patch
    backbone.eval()
    out = [torch.zeros(0, g, g, backbone.config.hidden_size)]
    for x in images.split(64):
        with common.autocast(device, amp):
            tok = backbone(pixel_values=normalise(x.to(device))).last_hidden_state
        out.append(tok[:, 1:].float().reshape(len(x), g, g, -1).cpu())
    backbone.train(training)
    return F.normalize(torch.cat(out), dim=-1)


def evaluate(backbone, images, masks, args, device, amp, png=None):
    """Zero-shot prompt segmentation (one prompt per region > 0 of at least one patch's area) and intra/inter
    similarity. The threshold is chosen on the even-indexed images and reported on the odd ones (`jaccard`);
    `jaccard_best` is the best threshold on the odd ones. A collective: each process scores its shard of the images,
    the sums of J(t), pair cosines and histograms are summed over processes; rank 0 draws its first prompts (`png`)."""
    per = math.ceil(len(images) / common.get_world_size())
    lo, hi = common.get_rank() * per, (common.get_rank() + 1) * per  # this process's shard (slices clip at M)
    feats, s, p, bins = extract(backbone, images[lo:hi], args, device, amp), args.img_size, args.patch, 50
    curves = torch.zeros(2, len(THRESHOLDS) + 1, dtype=torch.float64)  # even / odd images: sum of J(t), prompts
    pairs = torch.zeros(2, bins + 2, dtype=torch.float64)  # intra / inter: sum of cosines, pairs, histogram
    shown = []
    for n, f, m in zip(range(lo, hi), feats, masks[lo:hi]):
        valid = m >= 0
        for r in m.unique().tolist():
            gt = m == r
            if r <= 0 or gt.sum() < p * p:
                continue
            y, x = interior_point(gt)  # the prompt point: the object's deepest pixel
            sim, _ = prompt_segment(f, (y // p, x // p), 0.0)
            up = F.interpolate(sim[None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
            j = jaccard(up[None] >= THRESHOLDS[:, None, None], gt[None], valid[None])  # (T,)
            curves[n % 2] += torch.cat([j.double(), torch.ones(1, dtype=torch.float64)])
            if n % 2 and len(shown) < 8:
                shown.append((n, y, x, up, gt))
        labels = patch_labels(m, p)
        if len(labels[labels >= 0].unique()) >= 2:
            for row, v in zip(pairs, pair_similarities(f, labels)):
                row += torch.cat([v.double().sum()[None], torch.tensor([len(v)]), histogram(v, bins).double()])
    curves, pairs = (common.all_reduce_sum(t.to(device)).cpu() for t in (curves, pairs))
    if not (curves[0, -1] and curves[1, -1] and pairs[1, 1]):
        raise SystemExit("error: the evaluation set needs objects in at least 2 images; raise --eval-size")
    val, test = curves[0, :-1] / curves[0, -1], curves[1, :-1] / curves[1, -1]
    t = int(val.argmax())
    intra, inter = (pairs[:, 0] / pairs[:, 1]).tolist()
    metrics = {"jaccard": test[t].item(), "jaccard_best": test.max().item(), "threshold": THRESHOLDS[t].item(),
               "intra": intra, "inter": inter, "overlap": histogram_overlap(pairs[0, 2:], pairs[1, 2:]),
               "gap": intra - inter, **{f"jaccard@{th:.2f}": v for th, v in zip(THRESHOLDS.tolist(), test.tolist())}}
    if png and common.get_rank() == 0:
        save_panels(png, images, shown, THRESHOLDS[t].item())
    return metrics


def save_panels(path, images, shown, threshold):
    """One row per prompt: image with the prompt point (red), similarity map (min..max of the map), mask predicted at
    the chosen threshold, ground truth."""
    scale, tiles = max(1, 96 // images.shape[-1]), []
    for n, y, x, sim, gt in shown:
        img = images[n].float() / 255
        img[:, max(0, y - 1):y + 2, max(0, x - 1):x + 2] = torch.tensor([1.0, 0, 0])[:, None, None]
        grey = lambda t: t.float()[None].expand(3, -1, -1)  # noqa: E731
        span = (sim - sim.min()) / (sim.max() - sim.min()).clamp(min=1e-6)  # the map stretched to black..white
        tiles += [img, grey(span), grey(sim >= threshold), grey(gt)]
    up = F.interpolate(torch.stack(tiles), scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(up, path, nrow=4, padding=2, pad_value=0.5)


# --- Train ---
def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: OpenMP threads only add overhead
    transformers.logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    path, global_batch = os.path.join(args.output_dir, "checkpoint.pt"), args.batch_size * world
    eval_images, eval_masks = load_eval(args)  # every bad file stops here, before a checkpoint is touched
    train_set = [] if args.eval_only else Images(args)  # --eval-only needs no training images
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = MMC(args).to(device)
    teacher = common.momentum_copy(model.enc).eval()  # no gradient; eval mode: no dropout in the targets [inferred]
    state = State(args.K, args.proj_dim, args.queue, args.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "token" not in n and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "token" not in n and "position" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    common.seed_everything(args.seed + rank)
    ckpt = common.load_checkpoint(path, "mmc", resume=not args.eval_only)  # after the models: restores the RNG
    step, metrics_init = 0, None
    if ckpt is not None:
        common.restore(ckpt, path, model=model, teacher=teacher, buffers=state,
                       **({} if args.eval_only else {"optimizer": optimizer, "scaler": scaler}))
        step, metrics_init = ckpt["step"], ckpt.get("metrics_init")
        common.print0(f"resumed from {path} at step {step}")
    sampler = common.ResumableSampler(len(train_set), args.batch_size, seed=args.seed) if train_set else None
    loader = train_set and torch.utils.data.DataLoader(
        MaskedViews(train_set, args), batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator())
    spe = sampler.steps_per_epoch if sampler else 1
    n_steps = args.epochs * spe
    total = step if args.eval_only else (n_steps if args.max_steps is None else min(args.max_steps, n_steps))
    lr_sched = common.cosine_schedule(args.lr * global_batch / 256, args.min_lr, n_steps, args.warmup_epochs * spe)
    wd_sched = common.cosine_schedule(args.weight_decay, args.weight_decay_end, n_steps)
    warm = int(args.tau_t_warmup * n_steps)
    tau_sched = np.concatenate([np.linspace(args.tau_t, args.tau_t_final, warm), np.full(n_steps - warm,
                                                                                         args.tau_t_final)])
    common.print0(f"{len(train_set)} training images, {len(eval_images)} evaluation images; global batch "
                  f"{global_batch} ({args.batch_size} x {world}); {spe} steps/epoch, {total} steps; amp {amp}")
    if args.tiny and step == 0 and metrics_init is None and total > 0:  # random-init baseline (a collective)
        metrics_init = evaluate(teacher.backbone, eval_images, eval_masks, args, device, amp,
                                os.path.join(args.output_dir, "segmentation_init.png"))
    net = common.distribute(model, device, args.compile)  # DDP, then compile

    def save():  # a collective: every rank calls it; refuses non-finite parameters
        common.save_checkpoint(path, "mmc", step, {
            "args": vars(args), "model": model.state_dict(), "teacher": teacher.state_dict(),
            "buffers": state.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": step // spe, "metrics_init": metrics_init}, finite=[model])

    model.train()  # the one place: from_pretrained returns eval mode; evaluation restores the mode it found
    t0, seen = time.time(), 0
    while step < total:
        epoch = step // spe
        sampler.set_epoch(epoch, step % spe)
        bar = tqdm(loader, total=min(spe - step % spe, total - step), disable=rank != 0, desc=f"epoch {epoch}")
        for x1, x2, m1, m2 in bar:
            for i, group in enumerate(optimizer.param_groups):
                group["lr"], group["weight_decay"] = lr_sched[step], wd_sched[step] if i == 0 else 0.0
            x1, x2, m1, m2 = (t.to(device, non_blocking=True) for t in (x1, x2, m1, m2))
            with common.autocast(device, amp):
                l_mim, l_g2l, l_con, targets, keys = net(x1, x2, m1, m2, teacher=teacher, center=state.center,
                                                         queue=state.queue, tau_t=float(tau_sched[step]), args=args)
            loss = args.lambda_mim * l_mim + args.lambda_g2l * l_g2l + args.lambda_con * l_con
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if epoch < args.freeze_last_layer and model.enc.head is not None:
                model.enc.head.last.grad = None  # DINO: the prototypes stay fixed in the first epoch
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            common.ema_update_(teacher, model.enc, cosine_momentum(step, n_steps, args.m0))
            if model.enc.head is not None:
                update_center(state.center, targets, args.center_m)
            if args.queue and model.pred is not None:
                state.ptr.fill_(dequeue_and_enqueue(state.queue, int(state.ptr), F.normalize(
                    common.concat_all_gather(keys.float()), dim=1)))
            step, seen = step + 1, seen + global_batch
            if step % args.log_every == 0 or step % spe == 0 or step == total:
                v = torch.stack([loss, l_mim, l_g2l, l_con]).detach().float()
                v = (common.all_reduce_sum(v) / world).tolist()
                if not math.isfinite(v[0]):
                    raise SystemExit(f"error: loss is {v[0]} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                rec = {"step": step, "epoch": epoch, "loss": v[0], "loss_mim": v[1], "loss_g2l": v[2],
                       "loss_con": v[3], "lr": float(lr_sched[step - 1]), "samples_per_s": seen / (time.time() - t0)}
                if model.enc.head is not None:  # collapse monitor: neither 0 nor log K
                    pt = F.softmax((targets.float() - state.center) / float(tau_sched[step - 1]), -1)
                    rec["teacher_entropy"] = -(pt * pt.clamp(min=1e-12).log()).sum(-1).mean().item()
                common.log_jsonl(args.output_dir, rec)
                bar.set_postfix(loss=f"{v[0]:.3f}", mim=f"{v[1]:.3f}", g2l=f"{v[2]:.3f}", con=f"{v[3]:.3f}")
                t0, seen = time.time(), 0
            if step == total:
                break
        save()  # at every epoch end and when --max-steps stops the run
    metrics = evaluate(teacher.backbone, eval_images, eval_masks, args, device, amp,  # every process: its shard
                       os.path.join(args.output_dir, "segmentation.png"))
    if metrics_init is not None:
        metrics = {"jaccard": metrics["jaccard"], "jaccard_init": metrics_init["jaccard"],
                   **{f"{k}_init": metrics_init[k] for k in ("jaccard_best", "intra", "inter", "overlap")}, **metrics}
    if rank == 0:
        common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
        common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
        print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "@" not in k), flush=True)
        if metrics_init is not None:
            print(f"zero-shot Jaccard: random init {metrics_init['jaccard']:.3f} -> trained {metrics['jaccard']:.3f} "
                  f"(overlap {metrics_init['overlap']:.3f} -> {metrics['overlap']:.3f}); PNGs in {args.output_dir}")
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
