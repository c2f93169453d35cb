"""Decoupled Contrastive Learning.
Chun-Hsiao Yeh, Cheng-Yao Hong, Yen-Chi Hsu, Tyng-Luh Liu, Yubei Chen, Yann LeCun. ECCV 2022. arXiv 2110.06848.

DCL is SimCLR's NT-Xent with the positive pair removed from the denominator. That removes the
negative-positive-coupling factor from the gradient; the paper reports that learning then needs no large batches,
momentum encoder or long schedules. DCLW also weights the positive term with a negative von Mises-Fisher weight
that emphasises hard positives. Everything else is SimCLR: two augmented views, a ResNet, a 2-layer MLP projector,
LARS, and negatives from the whole (global) batch. `--loss ntxent` trains the SimCLR baseline of the paper's ablation.
There is no official code: the loss is the paper's Eq. 6 with lightly's conventions (DCLLoss / DCLWLoss after its 2025
fix: mean over anchors, one log-sum-exp), except that DCLW weights here use the global batch, lightly's the local one.

Implemented here: Eq. 6 (the DCL loss) in `dcl_loss`; the DCLW weight w_i = 2 - N softmax_j(<z_j1, z_j2>/sigma)_i in
`vmf_weights` and `dclw_loss`; SimCLR's NT-Xent in `nt_xent_loss`. Every loss is the mean over the 2N anchors (both
directions), normalises its inputs, runs in fp32 with autocast off, and takes one log-sum-exp over the negatives of
both views. The projection head is lightly's 2-layer SimCLRProjectionHead (with BatchNorm after both linears).
SimCLR's augmentations: `SimCLRViews` in the worker, `colour_augment` on the device. Training: SimCLR's LARS, lr =
--lr * sqrt(GLOBAL batch), weight decay 1e-6, 10 warmup epochs then cosine. Evaluation: weighted kNN (k=200, t=0.1)
and a linear probe, both on frozen backbone features.

--batch-size is per process. The paper's headline run is ResNet-50, global batch 256, 200 epochs:
  python dcl.py --tiny                                                          # CPU smoke run
  python dcl.py --data /data/imagenet                                           # one GPU: 256 x 1
  python dcl.py --data ~/data/cifar10 --arch resnet18                           # one GPU, CIFAR-10
  torchrun --nproc_per_node=8 dcl.py --data /data/imagenet --batch-size 32      # 32 x 8 = 256
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
      dcl.py --data /data/imagenet --batch-size 16                              # 16 x 16 = 256
"""
import argparse
import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

import common

# --- Arguments ---
PAPER_GLOBAL_BATCH = 256  # the paper's headline ImageNet run (and its NNCLR combination uses 512)
TINY = dict(epochs=5, batch_size=32, lr=0.3, warmup_epochs=1, workers=0, log_every=16, arch="cnn", image_size=32,
            proj_dim=32, probe_epochs=30)


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="DCL / DCLW in SimCLR",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic', an ImageFolder root with train/ and val/, "
                   "or a folder holding cifar-10-batches-py or cifar-100-python (never downloaded)")
    p.add_argument("--output-dir", default="runs/dcl")
    p.add_argument("--epochs", type=int, default=200, help="the paper's headline run: 200")
    p.add_argument("--batch-size", type=int, default=256, help="per process; the global batch is this x the "
                   "number of processes. The paper's global batch is 256: the default on one GPU, 32 on 8 GPUs")
    p.add_argument("--lr", type=float, default=0.075, help="LARS lr = lr * sqrt(global batch), SimCLR App. B.1's "
                   "rule for small batches (1.2 at 256) [inferred: the DCL paper gives no lr]")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="on weights only, as SimCLR's LARS")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true", help="evaluate --output-dir's checkpoint (else: untrained)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps; 0: evaluate the untrained model")
    p.add_argument("--tiny", action="store_true", help="small CNN, short schedule, small synthetic data: CPU smoke run")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--loss", choices=["dcl", "dclw", "ntxent"], default="dcl",
                   help="L_DC (Eq. 6), its vMF-weighted L_DCW, or SimCLR's NT-Xent (the paper's baseline)")
    m.add_argument("--temperature", type=float, default=0.1, help="tau in Eq. 6 [lib: lightly, raminnakhli]")
    m.add_argument("--sigma", type=float, default=0.5, help="sigma of the DCLW vMF weight [lib]")
    m.add_argument("--arch", choices=["resnet50", "resnet18", "cnn"], default="resnet50",
                   help="backbone f: the paper's ResNet-50, ResNet-18 (CIFAR), or a 4-layer CNN (--tiny)")
    m.add_argument("--image-size", type=int, default=None, help="crop size; default 224 for ImageFolder, 32 for "
                   "CIFAR and synthetic; <= 64 uses SimCLR's CIFAR variant (3x3 stem, no max-pool, no blur)")
    m.add_argument("--proj-dim", type=int, default=128, help="output of the 2-layer projection head g (SimCLR: 128)")
    m.add_argument("--momentum", type=float, default=0.9, help="LARS momentum (SimCLR)")
    m.add_argument("--lars-eta", type=float, default=1e-3, help="LARS trust coefficient eta (SimCLR)")
    m.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warmup before the cosine decay (SimCLR)")
    m.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted kNN evaluation [lib: lightly]")
    m.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights [lib]")
    m.add_argument("--probe-epochs", type=int, default=100, help="epochs of the linear probe [lib: raminnakhli]")
    m.add_argument("--probe-lr", type=float, default=0.1, help="linear probe SGD lr (standardised features) [inferred]")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}  # flags given on the command line win over the preset
    vars(args).update({k: v for k, v in TINY.items() if k not in given} if args.tiny else {})
    return args


def check_args(args, world):
    """Every check that depends on the flags and the world size alone (no file system): one-line errors."""
    if args.temperature <= 0 or args.sigma <= 0:
        raise SystemExit("error: --temperature and --sigma must be positive")
    if args.batch_size < 1 or args.batch_size * world < 2:
        raise SystemExit("error: DCL needs at least 2 images in the global batch for negatives; raise --batch-size")
    if args.max_steps is not None and args.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    global_batch = args.batch_size * world
    if global_batch != PAPER_GLOBAL_BATCH and not args.tiny:
        common.print0(f"note: global batch {global_batch} = {args.batch_size} x {world}; the paper's is "
                      f"{PAPER_GLOBAL_BATCH} (--batch-size {max(1, PAPER_GLOBAL_BATCH // world)} with {world} "
                      "processes)")


# --- Data ---
SHAPES = ("disk", "square")
TEXTURES = ("plain", "stripes", "checks", "dots", "rings")


class SyntheticShapes(torch.utils.data.Dataset):
    """10 classes = 5 textures x 2 shapes, 32 px. Tint, brightness, position, size, rotation, texture frequency and
    phase, and pixel noise are random per image, so only texture and shape name the class: they survive SimCLR's
    crops and colour distortion, the nuisances do not. Colours are weakly saturated and the shape is always the
    lighter part: with strong random colours or contrasts a short run learns those (they identify the image under
    the CIFAR-strength jitter) and no texture at all. Returns (uint8 image (3, S, S), label)."""
    classes = [f"{t} {s}" for t in TEXTURES for s in SHAPES]

    def __init__(self, n, seed, size=32):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, len(self.classes), n)
        self.images = torch.cat([self.draw(rng, y, size) for y in np.split(self.labels, range(2048, n, 2048))])

    @staticmethod
    def draw(rng, labels, size):
        n, texture, square = len(labels), labels // len(SHAPES), labels % len(SHAPES) == 1
        c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        yy, xx = np.meshgrid(c, c, indexing="ij")  # pixel centres in [-0.5, 0.5]
        x0, y0, r, a, f = (rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)
                           for lo, hi in ((-0.12, 0.12), (-0.12, 0.12), (0.26, 0.4), (0, 2 * np.pi), (5, 6)))
        x, y = xx - x0, yy - y0  # (n, S, S) centred on the shape
        u, v = x * np.cos(a) + y * np.sin(a), y * np.cos(a) - x * np.sin(a)  # the shape's rotated frame
        inside = np.where(square[:, None, None], 0.8 * r - np.maximum(abs(u), abs(v)), r - np.hypot(u, v))
        w = 2 * np.pi * f  # axis-aligned textures, 5-6 periods per image
        sx, sy = np.sin(w * x) > 0, np.sin(w * y) > 0
        on = np.stack([np.ones_like(sx), sx, sx ^ sy, np.cos(w * x) + np.cos(w * y) < 0.6,
                       np.sin(w * np.hypot(x, y)) > 0], 1)[np.arange(n), texture]
        tint = rng.uniform(-0.15, 0.15, (2, n, 3, 1, 1)).astype(np.float32)
        fg = rng.uniform(0.75, 0.95, (n, 1, 1, 1)).astype(np.float32) + tint[0]  # the shape is the lighter part
        bg = rng.uniform(0.25, 0.45, (n, 1, 1, 1)).astype(np.float32) + tint[1]
        shade = np.where(on & (inside > 0.05), 1.0, 0.25).astype(np.float32)[:, None]  # texture, dark outline
        noise = rng.normal(0, 0.08, (n, 3, size, size)).astype(np.float32)
        img = np.where(inside[:, None] >= 0, fg * shade, bg) + noise
        return torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def load_datasets(args):
    """(train, val, classes, default image size): unaugmented datasets of (image, label)."""
    if args.data == "synthetic":
        n_train, n_val = (2048, 512) if args.tiny else (20000, 4000)
        return SyntheticShapes(n_train, seed=0), SyntheticShapes(n_val, seed=1), len(SyntheticShapes.classes), 32
    root = os.path.expanduser(args.data)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {args.data} is not a folder; pass 'synthetic', an ImageFolder root with "
                         "train/ and val/, or the folder holding cifar-10-batches-py or cifar-100-python")
    for sub, cls in (("cifar-10-batches-py", torchvision.datasets.CIFAR10),
                     ("cifar-100-python", torchvision.datasets.CIFAR100)):
        if os.path.isdir(os.path.join(root, sub)):
            try:
                train, val = (cls(root, train=t, download=False) for t in (True, False))
            except RuntimeError:
                raise SystemExit(f"error: cannot read {os.path.join(root, sub)}: files missing or corrupted; extract "
                                 "the python version of the CIFAR archive there") from None
            return train, val, len(train.classes), 32
    if not all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        raise SystemExit(f"error: {root} holds neither train/ and val/ (ImageFolder) nor cifar-10-batches-py "
                         "or cifar-100-python; point --data at such a folder")
    try:
        train, val = (torchvision.datasets.ImageFolder(os.path.join(root, s)) for s in ("train", "val"))
    except FileNotFoundError as e:
        raise SystemExit(f"error: cannot read --data {root}: {str(e).splitlines()[0]}") from None
    if train.classes != val.classes:
        raise SystemExit(f"error: {root}/train and {root}/val have different class folders; make them the same")
    return train, val, len(train.classes), 224


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Seeded(torch.utils.data.Dataset):
    """(index, sample_seed) from common.ResumableSampler, or an index (evaluation: seed 0) -> (transform(image), label),
    draws seeded: they depend on (seed, epoch, index) only (exact resume; two processes see one process's batch)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, 0)
        image, label = self.base[index]
        with common.seeded(sample_seed):
            return self.transform(image), label


def to_device(x, device, params=None):
    """uint8 images (B, 3, H, W) -> float on the device, colour-augmented when the worker's params are given
    (colour_augment), normalised (channels_last for the CNNs on CUDA): the workers hand over 4x fewer bytes."""
    x = x.to(device, non_blocking=True).float().div_(255)
    x = x if params is None else colour_augment(x, params.to(device, non_blocking=True))
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last if device.type == "cuda" else
                                         torch.contiguous_format)


# --- Model ---
def build_backbone(arch, image_size):
    """SimCLR's encoder f: a randomly initialised torchvision ResNet without its classifier, or (--tiny) four 3x3
    conv-BN-ReLU layers (32 -> 4 px) and global average pooling. Its width is net.dim."""
    if arch == "cnn":
        layers, c = [], 3
        for i, w in enumerate((32, 64, 64, 128)):
            layers += [nn.Conv2d(c, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.dim = c
        return net
    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:  # SimCLR App. B.9 (CIFAR): a 3x3 stride-1 first conv and no max-pool keep small images' detail
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.dim, net.fc = net.fc.in_features, nn.Identity()
    return net


class SimCLR(nn.Module):
    """Encoder f and projection head g. SimCLR writes g(h) = W2 ReLU(W1 h) (Sec. 2.1); this g is lightly's 2-layer
    SimCLRProjectionHead (batch_norm=True, as lightly's DCL benchmarks): Linear-BN-ReLU-Linear-BN, linears without
    bias, hidden width = f's width. The loss sees z = g(f(x)); evaluation uses the representation f(x)."""

    def __init__(self, arch, image_size, proj_dim):
        super().__init__()
        self.backbone = build_backbone(arch, image_size)
        d = self.backbone.dim
        self.head = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                                  nn.Linear(d, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))

    def forward(self, x):
        return self.head(self.backbone(x))


# --- Method ---
class SimCLRViews:
    """SimCLR's augmentations (Chen et al. 2020, App. A), the worker part: RandomResizedCrop 0.08-1, flip (PIL ops on
    PIL images, torchvision's on tensors), colour draws (colour_params: jitter strength 1, 0.5 up to 64 px; blur above
    64 px only, as SimCLR's CIFAR variant). image -> two views, each (uint8 image (3, S, S), params (11,))."""

    def __init__(self, size):
        self.crop = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                                v2.RandomHorizontalFlip(), v2.PILToTensor()])  # uint8 out; tensors pass through
        self.colour = functools.partial(colour_params, 1.0 if size > 64 else 0.5, size > 64)

    def __call__(self, image):
        return tuple((self.crop(image), self.colour()) for _ in range(2))


def colour_params(strength=1.0, blur=True):
    """One view's draws of SimCLR's colour distortion, in the worker (they follow its per-sample seed): ColorJitter
    (0.8 s, 0.8 s, 0.8 s, 0.2 s) w.p. 0.8 (as its get_params: the 4 ops in a random permutation, brightness, contrast,
    saturation U(1 - 0.8 s, 1 + 0.8 s), hue U(-0.2 s, 0.2 s)), grayscale w.p. 0.2, blur w.p. 0.5 of sigma U(0.1, 2).
    -> (11,): [jitter on, order (4; 0 brightness 1 contrast 2 saturation 3 hue), factors (4, by op), grey, sigma]."""
    on, order, s = torch.rand(()) < 0.8, torch.randperm(4), torch.tensor([0.8, 0.8, 0.8, 0.2]) * strength
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]) + s * (2 * torch.rand(4) - 1)  # U(1 - s, 1 + s), hue U(-s, s)
    grey, blurred, sigma = torch.rand(()) < 0.2, torch.rand(()) < 0.5, torch.empty(()).uniform_(0.1, 2.0)
    return torch.cat([on[None], order, factors, grey[None], sigma[None] * (blurred & blur)]).float()


def _hue_shift(x, shift):
    """torchvision's adjust_hue, batched: RGB -> HSV, hue + shift (B, 1, 1, 1) modulo 1, HSV -> RGB in closed form."""
    (r, g, b), v = x.unbind(1), x.amax(1)
    chroma = (v - x.amin(1)).clamp_min(1e-12)  # (B, H, W); value and chroma are kept (grey pixels: hue 0)
    h6 = torch.where(v == r, (g - b) / chroma, torch.where(v == g, 2 + (b - r) / chroma, 4 + (r - g) / chroma))
    k = (x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h6[:, None] + 6 * shift) % 6
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


@torch.no_grad()
def colour_augment(x, params):
    """SimCLR's colour distortion on the device, batched, with the worker's draws (colour_params): torchvision's
    adjust_brightness / contrast / saturation / hue in each view's order, rgb_to_grayscale, gaussian_blur (separable,
    reflect padding), on floats. x (B, 3, H, W) in [0, 1], params (B, 11) -> (B, 3, H, W) in [0, 1]."""
    on, hue, grey, sigma = (params[:, i].view(-1, 1, 1, 1) for i in (0, 8, 9, 10))
    # ColorJitter's four ops in each view's drawn order. The hue rotation, the costly one, runs once for the batch:
    # the blends (0 brightness, 1 contrast, 2 saturation) a view draws before its hue fill slots 0-2, those after
    # it slots 3-5; a slot left empty has factor 1, the identity.
    order, slot = params[:, 1:5].long(), torch.arange(6, device=x.device)
    at = (order == 3).long().argmax(1, keepdim=True)  # (B, 1) the hue's place in the order
    pos = torch.where(slot < 3, slot, slot - 2 + at)  # (B, 6) the place in the order each slot plays
    used = (on.view(-1, 1) > 0) & torch.where(slot < 3, slot < at, pos <= 3)
    ops = order.gather(1, pos.clamp(max=3))
    f = torch.where(used, params[:, 5:9].gather(1, ops), 1.0)
    for j in range(6):
        if j == 3:
            x = torch.where(on > 0, _hue_shift(x, hue), x)
        luma, op, fj = v2.functional.rgb_to_grayscale(x), ops[:, j].view(-1, 1, 1, 1), f[:, j].view(-1, 1, 1, 1)
        ref = (op == 2) * luma + (op == 1) * luma.mean((2, 3), keepdim=True)  # black, mean grey or per-pixel grey
        x = torch.lerp(ref, x, fj).clamp_(0, 1)  # torchvision's blend fj x + (1 - fj) ref; exactly x at fj = 1
    x = torch.where(grey > 0, v2.functional.rgb_to_grayscale(x).expand_as(x), x)
    r = x.shape[-1] // 20  # SimCLR's kernel, 10% of the side: 2 r + 1 taps (23 at 224 px: 5.5 sigma at sigma 2)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)[:, None]  # (B * 3, 1, taps): per view and channel
    y = F.pad(x, (r,) * 4, mode="reflect").flatten(0, 1)[None]  # (1, B * 3, H + 2r, W + 2r)
    y = F.conv2d(F.conv2d(y, k[:, :, None], groups=len(k)), k[..., None], groups=len(k))
    return y.view_as(x)  # sigma 0: the kernel is 1 at the centre, exactly 0 elsewhere


def _contrastive_loss(z1, z2, temperature, weight_fn=None, keep_positive=False, gather=False):
    """Shared by DCL (positive removed from the denominator) and NT-Xent (kept). Anchors are the local 2n embeddings
    of both views; with gather=True the candidates are the global batch of all processes (gradients flow back) and
    the anchor's own columns are offset by rank * n. fp32 with autocast off, whatever the caller runs under: at
    tau = 0.1 a bf16 matmul would put errors of ~0.04 into every logit."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        g1, g2 = (common.all_gather_with_grad(z1), common.all_gather_with_grad(z2)) if gather else (z1, z2)
        m, offset = g1.shape[0], common.get_rank() * n if gather else 0
        logits = torch.cat([z1, z2]) @ torch.cat([g1, g2]).T / temperature  # (2n, 2m): anchors x all images
        i = torch.arange(n, device=z1.device) + offset
        cols = torch.arange(2 * m, device=z1.device)
        own = torch.cat([i, m + i])  # (2n,) each anchor's own column
        mask = cols == own[:, None]  # (2n, 2m); built by comparison: no data-dependent indexing
        if not keep_positive:
            mask |= cols == torch.cat([m + i, i])[:, None]  # Eq. 6: its positive, the other view of the same image
        log_denominator = logits.masked_fill(mask, float("-inf")).logsumexp(1)  # (2n,) one sum over both views
        pos = (z1 * z2).sum(1) / temperature  # (n,) <z_i^(1), z_i^(2)> / tau
        if weight_fn is not None:  # weights see the whole global batch, as one process would
            pos = weight_fn(g1, g2)[offset:offset + n] * pos
        return (log_denominator - pos.repeat(2)).mean()  # mean over the 2n anchors (lightly's convention)


def dcl_loss(z1, z2, temperature=0.1, weight_fn=None, gather=False):
    """Eq. 6: L_i^(k) = -<z_i^(1), z_i^(2)>/tau + log sum_{l in {1,2}, j != i} exp(<z_i^(k), z_j^(l)>/tau), averaged
    over i and k. z1, z2: (n, D), any scale. weight_fn(z1, z2) -> (n,) multiplies the positive term (DCLW)."""
    return _contrastive_loss(z1, z2, temperature, weight_fn, keep_positive=False, gather=gather)


@torch.no_grad()
def vmf_weights(z1, z2, sigma=0.5):
    """DCLW: w_i = 2 - exp(<z_i1, z_i2>/sigma) / mean_j exp(<z_j1, z_j2>/sigma) = 2 - N softmax(...)_i, a negative
    von Mises-Fisher weight: mean 1, hard positives (low similarity) up to 2, easy ones below 1 (even < 0).
    Detached (lightly #793; the paper does not say). (n,)"""
    s = (F.normalize(z1.float(), dim=1) * F.normalize(z2.float(), dim=1)).sum(1) / sigma
    return 2 - z1.shape[0] * torch.softmax(s, 0)


def dclw_loss(z1, z2, temperature=0.1, sigma=0.5, gather=False):
    """L_DCW: Eq. 6 with the positive term weighted by vmf_weights."""
    return dcl_loss(z1, z2, temperature, functools.partial(vmf_weights, sigma=sigma), gather)


def nt_xent_loss(z1, z2, temperature, gather=False):
    """SimCLR's NT-Xent: the positive stays in the denominator (the coupled baseline DCL removes it from)."""
    return _contrastive_loss(z1, z2, temperature, keep_positive=True, gather=gather)


LOSSES = {"dcl": dcl_loss, "dclw": dclw_loss, "ntxent": nt_xent_loss}


def loss_function(args):
    """The training loss of --loss at --temperature (and --sigma), negatives from the global batch."""
    kw = {"sigma": args.sigma} if args.loss == "dclw" else {}
    return functools.partial(LOSSES[args.loss], temperature=args.temperature, gather=True, **kw)


class LARS(torch.optim.Optimizer):
    """SimCLR's optimizer (You et al. 2017): SGD with momentum where each weight tensor's step is rescaled by the
    trust ratio eta * ||w|| / ||g + wd * w||. Groups with eta=None (biases, BatchNorm) get plain momentum SGD and
    no weight decay, as in SimCLR. Multi-tensor (foreach) updates, no host synchronisation."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["eta"] is not None:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norm, g_norm = torch._foreach_norm(params), torch._foreach_norm(grads)
                torch._foreach_mul_(grads, [torch.where((w > 0) & (g > 0), group["eta"] * w / g, 1.0)
                                            for w, g in zip(w_norm, g_norm)])
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


# --- Evaluation ---
def eval_transform(size):
    resize = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)] if size > 64 else [
        v2.Resize(size, antialias=True)]
    return v2.Compose([*resize, v2.ToImage(), v2.ToPureTensor()])  # PIL ops on PIL images


@torch.no_grad()
def extract_features(backbone, dataset, device, amp, batch_size=256, workers=0, gather=True):
    """Frozen features and labels, in eval mode (BatchNorm statistics untouched). Every process embeds a contiguous
    shard (the last index repeated to equal sizes); gather=True returns the whole set (N, F), (N,) on every
    process, gather=False this process's rows [rank * ceil(N / world), ...): memory per process is its shard."""
    was_training = backbone.training
    backbone.eval()
    rank, world, n = common.get_rank(), common.get_world_size(), len(dataset)
    per = math.ceil(n / world)
    shard = torch.utils.data.Subset(dataset, [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)])
    feats, labels = [], []
    for x, y in torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers,
                                            pin_memory=device.type == "cuda"):
        with common.autocast(device, amp):
            feats.append(backbone(to_device(x, device)).float())
        labels.append(y.to(device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if not gather:
        own = max(0, min(per, n - rank * per))  # the repeated last index belongs to the last shard only
        return feats[:own], labels[:own]
    return common.concat_all_gather(feats)[:n], common.concat_all_gather(labels)[:n]


@torch.no_grad()
def knn_predict(feats, bank, bank_labels, classes, k=200, t=0.1):
    """Weighted kNN (Wu et al. 2018, as in lightly's benchmarks): the k most cosine-similar memory features vote for
    their label with weight exp(sim / t). feats (B, F) the same on every process, bank (M, F) this process's shard
    of the memory bank, both L2-normalised -> (B,) predictions. Each process takes the top k of its shard; the
    top k of the gathered candidates (world x k per query) are the global top k."""
    world, preds = common.get_world_size(), []
    k = min(k, int(common.all_reduce_sum(torch.tensor(bank.shape[0], device=feats.device))))
    for chunk in feats.split(1024):
        sim = torch.full((len(chunk), k), -float("inf"), device=feats.device)  # a shard with fewer than k rows
        lab = torch.zeros(len(chunk), k, dtype=torch.long, device=feats.device)  # pads with weight exp(-inf) = 0
        local = (chunk @ bank.T).topk(min(k, bank.shape[0]), dim=1)  # (b, <=k)
        sim[:, :local.values.shape[1]], lab[:, :local.values.shape[1]] = local.values, bank_labels[local.indices]
        if world > 1:  # (world * b, k) -> (b, world * k) candidates
            sim, lab = (common.concat_all_gather(x).view(world, len(chunk), k).transpose(0, 1).flatten(1)
                        for x in (sim, lab))
        sim, top = sim.topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], classes, device=feats.device)
        preds.append(votes.scatter_add_(1, lab.gather(1, top), (sim / t).exp()).argmax(1))
    return torch.cat(preds)


def linear_probe(train_f, train_y, val_f, val_y, classes, epochs, lr, batch_size=256):
    """A linear classifier on frozen, standardised features (SGD, momentum 0.9, cosine); val top-1 in %. Features are
    cached once, without augmentation [inferred: SimCLR's probe trains 90 epochs on augmented crops; this takes
    seconds]. train_f, train_y: this process's shard, rows [rank * ceil(N / world), ...); the probe is data-parallel:
    every process walks the same batches of the whole set, takes the rows it holds, and the gradient is the mean
    over each whole batch, as one process computes it."""
    n = int(common.all_reduce_sum(torch.tensor(len(train_f), device=val_f.device)))
    first = common.get_rank() * math.ceil(n / common.get_world_size())
    f64 = train_f.double()  # mean and (unbiased) std of the whole set, from sums over the shards
    s = common.all_reduce_sum(torch.stack([f64.sum(0), (f64 ** 2).sum(0)]))
    mean, var = s[0] / n, (s[1] - s[0] ** 2 / n) / (n - 1)
    mean, std = mean.float(), var.clamp_min(0).sqrt().float() + 1e-6
    with common.seeded(0):  # the same probe for the same features, whatever the training consumed
        clf = nn.Linear(val_f.shape[1], classes).to(val_f.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(batch_size):
                own = idx.to(val_f.device) - first
                own = own[(own >= 0) & (own < len(train_f))]
                loss = F.cross_entropy(clf((train_f[own] - mean) / std), train_y[own], reduction="sum") / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in clf.parameters():
                    common.all_reduce_sum(p.grad)
                opt.step()
                sched.step()
    with torch.no_grad():
        return 100.0 * (clf((val_f - mean) / std).argmax(1) == val_y).float().mean().item()


def evaluate(backbone, memory_set, val_set, classes, args, device, amp):
    """Linear probe top-1 (the paper's headline) and weighted kNN top-1, both in %, on the frozen backbone. Every
    process embeds a shard; the memory bank stays sharded, the (smaller) val set is gathered."""
    kw = dict(batch_size=max(args.batch_size, 256), workers=args.workers)
    train_f, train_y = extract_features(backbone, memory_set, device, amp, gather=False, **kw)
    val_f, val_y = extract_features(backbone, val_set, device, amp, **kw)
    pred = knn_predict(F.normalize(val_f, dim=1), F.normalize(train_f, dim=1), train_y, classes, args.knn_k, args.knn_t)
    return {"linear_top1": linear_probe(train_f, train_y, val_f, val_y, classes, args.probe_epochs, args.probe_lr),
            "knn_top1": 100.0 * (pred == val_y).float().mean().item()}


# --- Train ---
def train_step(train_model, optimizer, scaler, views, loss_fn, device, amp):
    """One SimCLR step: both views ((uint8 images, colour params) each) colour-augmented as one batch outside the
    compiled model, one forward pass (BatchNorm sees the 2B images, as SimCLR), the global-batch loss in fp32 outside
    autocast, backward (DDP averages the gradients), the optimizer step. No host sync; returns (loss, z1, z2)."""
    x, params = (torch.cat(t) for t in zip(*views))
    x = to_device(x, device, params)  # before autocast: the colour ops (the blur's conv) stay fp32
    with common.autocast(device, amp):
        z1, z2 = train_model(x).chunk(2)
    loss = loss_fn(z1, z2)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), z1.detach(), z2.detach()


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    amp = args.amp or common.default_amp(device)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")

    train_set, val_set, classes, native_size = load_datasets(args)
    size = args.image_size or native_size
    sampler = common.ResumableSampler(len(train_set), args.batch_size, seed=args.seed)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = SimCLR(args.arch, size, args.proj_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world > 1:  # SimCLR's global BN; on CPU (gloo) BatchNorm statistics stay per process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    common.seed_everything(args.seed + rank)
    global_batch = args.batch_size * world
    lr = args.lr * math.sqrt(global_batch)  # SimCLR's square-root rule on the GLOBAL batch
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]  # BatchNorm: no weight decay, no trust ratio
    optimizer = LARS([{"params": weights}, {"params": others, "weight_decay": 0.0, "eta": None}], lr=lr,
                     momentum=args.momentum, weight_decay=args.weight_decay, eta=args.lars_eta)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    # after the models: a resumed run restores this rank's RNG state over the initialisation's draws
    state = common.load_checkpoint(ckpt_path, "dcl", resume=not args.eval_only)

    eval_data = (*(Seeded(s, eval_transform(size)) for s in (train_set, val_set)), classes, args, device, amp)
    step, init_metrics = 0, {}
    if state is not None:
        objects = {"model": model} if args.eval_only else {"model": model, "optimizer": optimizer, "scaler": scaler}
        common.restore(state, ckpt_path, **objects)
        step, init_metrics = state["step"], state["metrics_init"]
        common.print0(f"loaded {ckpt_path} (step {step})")
    elif args.tiny:  # the random-initialisation baseline, printed beside the trained numbers
        init_metrics = evaluate(model.backbone, *eval_data)

    loader = torch.utils.data.DataLoader(Seeded(train_set, SimCLRViews(size)), batch_size=args.batch_size,
                                         sampler=sampler, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    steps_per_epoch = sampler.steps_per_epoch
    schedule = common.cosine_schedule(lr, 0.0, args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch)
    total = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, len(schedule))
    total = step if args.eval_only else total

    train_model = common.distribute(model, device, args.compile)  # DDP, then torch.compile
    loss_fn = loss_function(args)
    common.print0(f"{args.loss} | {args.arch} | global batch {global_batch} = {args.batch_size} x {world} | "
                  f"lr {lr:.4g} | {len(train_set)} images, {classes} classes, {size} px | "
                  f"{steps_per_epoch} steps/epoch, {total} steps")

    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="dcl")
    t0, seen = time.time(), 0
    model.train()  # the one place: evaluation restores the mode it found, but a model starts training here
    while step < total:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for views, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = schedule[step]
            loss, z1, z2 = train_step(train_model, optimizer, scaler, views, loss_fn, device, amp)
            step, seen = step + 1, seen + global_batch
            bar.update()
            if step % args.log_every == 0 or step == total or step % steps_per_epoch == 0:  # also before every save
                # global-batch means of the loss and of the positives' cosine (alignment): the only host sync
                stats = torch.stack([loss, F.cosine_similarity(z1.float(), z2.float()).mean()])
                loss_v, pos_v = (common.all_reduce_sum(stats) / world).tolist()
                if not math.isfinite(loss_v):
                    raise SystemExit(f"error: loss is {loss_v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": loss_v, "pos_cos": pos_v,
                                                   "lr": schedule[step - 1],
                                                   "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{loss_v:.4f}")
                t0, seen = time.time(), 0
            if step == total:
                break
        common.save_checkpoint(ckpt_path, "dcl", step, {  # at every epoch end and when --max-steps stops the run
            "args": vars(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "epoch": step // steps_per_epoch, "metrics_init": init_metrics},
            finite=[model])  # a collective (every rank calls it); refuses to overwrite with non-finite parameters
    bar.close()

    metrics = evaluate(model.backbone, *eval_data)  # every process embeds its shard
    metrics.update({f"{k}_init": v for k, v in init_metrics.items()})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)  # these three: rank 0 only
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    common.print0("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
