"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.
Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski, Armand Joulin. NeurIPS 2020. arXiv 2006.09882.

SwAV learns features by predicting, from one crop of an image, the cluster assignment ("code") of another crop.
Codes are computed online for every batch by a few Sinkhorn-Knopp iterations that spread the batch evenly over K
learnable prototypes; each crop's temperature-softmax over its prototype scores is trained by cross-entropy to match
the codes of the other (large) crops: the "swapped" prediction. Multi-crop adds cheap low-resolution views. There is
no momentum encoder; an optional FIFO queue of past embeddings only enlarges the Sinkhorn problem at small batch.

Implemented here (paper -> function): Eq. 1-2, the swapped prediction over all crops -> `swav_loss`; Sec. 3.1, codes as
the entropic transport solution Diag(u) exp(C^T Z / eps) Diag(v) by 3 Sinkhorn-Knopp iterations, all-reduced so the
equipartition is over the global batch -> `sinkhorn`, and the queue for small batches -> `SwAVQueue`; Sec. 3.2
multi-crop -> `multicrop_transform` (in the worker), `colour_augment` (on the device), `SwAV.forward`; as main_swav.py:
prototypes normalised every step and frozen at first -> `normalize_prototypes_`, `freeze_prototype_grads_`, SGD wrapped
in LARC with warmup + cosine lr -> `LARS`, `lr_schedule`, the queue trimmed to a multiple of the global batch ->
`check_args`; linear evaluation as eval_linear.py (fresh crops every epoch, best top-1 over the epochs) ->
`linear_probe`, plus a weighted kNN -> `knn_accuracy`; a run stuck at loss ln K stops -> `CollapseGuard`. Defaults: the
200-epoch batch-256 recipe of swav_200ep_bs256_pretrain.sh (ResNet-50, 2x224 + 6x96 crops, 3000 prototypes, lr 0.6,
queue 3840 from epoch 15; 72.7% linear top-1 on ImageNet in the official README) when the global batch is 256.

  python swav.py --tiny                                                     # CPU smoke run, about a minute
  python swav.py --tiny --data DIR   # small real 32-px ImageFolder: preset TINY_DATA on top of TINY, about 2 minutes
  python swav.py --data ~/data/cifar10 --arch cifar_resnet18 --size-crops 32 --nmb-crops 2 --min-scale-crops 0.14 \\
      --max-scale-crops 1 --batch-size 256 --freeze-prototypes-niters 195 --queue-length 0  # 1 GPU, CIFAR [inferred]
  torchrun --nproc_per_node=8 swav.py --data /data/imagenet --batch-size 32     # global batch 256, lr 0.6, 200 ep
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
      swav.py --data /data/imagenet --batch-size 16
"""
import argparse
import functools
import itertools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

import common

# --- Arguments ---
# --tiny [inferred]: 2x32 + 2x16-px crops, 2 epochs of 64 steps at batch 32. It keeps the paper's K = 3000 and D = 128
# and uses the batch-4096 recipe's warmup (0.3 -> 4.8): on the built-in textures, K = 30-300 or no warmup often
# collapsed to loss = ln K in runs this short. On real 32-px digits it collapses: TINY_DATA below replaces it there.
TINY = dict(epochs=2, batch_size=32, lr=4.8, final_lr=0.0048, warmup_epochs=1, start_warmup=0.3, workers=0,
            log_every=10, arch="small_cnn", hidden_mlp=128, size_crops=[32, 16], nmb_crops=[2, 2],
            min_scale_crops=[0.3, 0.1], max_scale_crops=[1.0, 0.3], freeze_prototypes_niters=20, queue_length=128,
            epoch_queue_starts=1, collapse_window=15, probe_fixed_features=True, probe_standardize=True)
# --tiny with a real --data folder [inferred, measured on sklearn digits at 32 px, 1,437 train images; the values
# above collapse there]: as solo-learn's CIFAR recipe, 2 x 32-px crops, a late queue (512 from epoch 2; solo-learn:
# 3840 from 50), prototypes frozen ~1 epoch (44 steps); 7 epochs (~300 steps, ~2 min on 1 core), K 100 (3000, or 300
# at eps 0.05, stayed at ln K), eps 0.02, lr 0.3 from 0.01 over 1 epoch, crop scale min 0.4 (not swept). Flags win.
TINY_DATA = dict(epochs=7, nmb_prototypes=100, epsilon=0.02, lr=0.3, final_lr=0.001, start_warmup=0.01,
                 freeze_prototypes_niters=44, queue_length=512, epoch_queue_starts=2, size_crops=[32], nmb_crops=[2],
                 min_scale_crops=[0.4], max_scale_crops=[1.0])


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="SwAV (arXiv 2006.09882)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic', an ImageFolder root with train/ and val/, or a "
                   "folder holding torchvision's cifar-10-batches-py or cifar-100-python (never downloaded)")
    p.add_argument("--output-dir", default="runs/swav")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="per process (swav_200ep_bs256_pretrain.sh: 64 x 4 "
                   "GPUs = 256; the official README's 8-GPU line: 32 x 8 = 256)")
    p.add_argument("--lr", type=float, default=0.6, help="base_lr of the batch-256 recipe (4.8 at 4096); not "
                   "rescaled with the batch: the authors advise linear scaling or a grid search")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the checkpoint in --output-dir (or the untrained model)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps; 0 = evaluate the untrained model")
    p.add_argument("--tiny", action="store_true", help="small CNN, short schedule, small synthetic data; with a "
                   "real --data folder also the small-real-data preset TINY_DATA (7 epochs, 2 x 32-px crops, K 100, "
                   "eps 0.02, lr 0.3, queue 512 from epoch 2) [inferred]")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "cifar_resnet18", "small_cnn"], help="torchvision ResNet (random init), ResNet-18 with a 3x3 stem and "
                   "no max-pool for 32-px images [inferred], or a small GroupNorm CNN (--tiny) [inferred]")
    m.add_argument("--hidden-mlp", type=int, default=2048, help="hidden width of the projection head (0: one linear)")
    m.add_argument("--feat-dim", type=int, default=128, help="dimension of the L2-normalised embedding z")
    m.add_argument("--nmb-prototypes", type=int, default=3000, help="K, the number of prototypes c_k (Sec. 3.1)")
    m.add_argument("--temperature", type=float, default=0.1, help="tau of the softmax over prototype scores (Eq. 2)")
    m.add_argument("--epsilon", type=float, default=0.05, help="eps, entropy weight of the transport problem (Sec. 3.1)")
    m.add_argument("--sinkhorn-iterations", type=int, default=3, help="Sinkhorn-Knopp iterations (Sec. 3.1)")
    m.add_argument("--crops-for-assign", type=int, nargs="+", default=[0, 1], help="crops whose codes are predicted")
    m.add_argument("--nmb-crops", type=int, nargs="+", default=[2, 6], help="crops per resolution (Sec. 3.2: 2 + 6)")
    m.add_argument("--size-crops", type=int, nargs="+", default=[224, 96], help="crop resolutions (Sec. 3.2)")
    m.add_argument("--min-scale-crops", type=float, nargs="+", default=[0.14, 0.05], help="RandomResizedCrop min scale")
    m.add_argument("--max-scale-crops", type=float, nargs="+", default=[1.0, 0.14], help="RandomResizedCrop max scale")
    m.add_argument("--final-lr", type=float, default=0.0006, help="lr at the end of the cosine schedule")
    m.add_argument("--warmup-epochs", type=int, default=0, help="linear warmup epochs (10 in the batch-4096 recipe)")
    m.add_argument("--start-warmup", type=float, default=0.0, help="lr at the start of the warmup")
    m.add_argument("--freeze-prototypes-niters", type=int, default=5005, help="iterations without prototype updates "
                   "(one ImageNet epoch: 5005 at batch 256, 313 at 4096)")
    m.add_argument("--queue-length", type=int, default=3840, help="rows of the queue of past embeddings over all "
                   "processes (0: none); trimmed to a multiple of the global batch, as main_swav.py")
    m.add_argument("--epoch-queue-starts", type=int, default=15, help="epoch at which the queue is created")
    m.add_argument("--lars-trust", type=float, default=0.001, help="trust coefficient eta of LARC (apex, clip=False)")
    m.add_argument("--collapse-window", type=int, default=2000, help="stop when the loss stays within 0.01 of ln K "
                   "for this many steps after warmup and prototype freezing (collapse, pitfall #12); 0: never")
    m.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted kNN evaluation [inferred: lightly]")
    m.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights [inferred: lightly]")
    m.add_argument("--probe-epochs", type=int, default=100, help="epochs of the linear probe (eval_linear.py)")
    m.add_argument("--probe-lr", type=float, default=0.3, help="lr of the linear probe at batch 256 (eval_linear.py)")
    m.add_argument("--probe-fixed-features", action="store_true", help="[deviation] train the probe on centre-crop "
                   "features computed once, not on fresh RandomResizedCrops every epoch (fast; --tiny)")
    m.add_argument("--probe-standardize", action="store_true", help="[deviation] standardise probe features with "
                   "training statistics (keeps lr 0.3 sound for small backbones; --tiny)")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}  # flags given on the command line win over the preset
    preset = {**TINY, **(TINY_DATA if args.data != "synthetic" else {})} if args.tiny else {}
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check of the flags and the world size (no file system): one-line errors; trims the queue."""
    crop_flags = (args.nmb_crops, args.size_crops, args.min_scale_crops, args.max_scale_crops)
    if len({len(c) for c in crop_flags}) != 1:
        raise SystemExit("error: --nmb-crops, --size-crops, --min-scale-crops and --max-scale-crops need one value "
                         "per resolution each; give them the same length")
    if not all(0 <= i < sum(args.nmb_crops) for i in args.crops_for_assign) or sum(args.nmb_crops) < 2:
        raise SystemExit(f"error: --crops-for-assign {args.crops_for_assign} must index the {sum(args.nmb_crops)} "
                         "crops of --nmb-crops (at least 2 crops); use e.g. 0 1")
    if min(args.temperature, args.epsilon) <= 0 or args.queue_length < 0 or args.batch_size < 1:
        raise SystemExit("error: --temperature, --epsilon and --batch-size must be positive and --queue-length "
                         "non-negative")
    global_batch = args.batch_size * world
    if args.queue_length % global_batch:  # the queue shifts by whole batches: main_swav.py trims it
        if args.queue_length < global_batch:
            raise SystemExit(f"error: --queue-length {args.queue_length} is shorter than the global batch "
                             f"{global_batch} = {args.batch_size} x {world}; use at least {global_batch} (or 0)")
        args.queue_length -= args.queue_length % global_batch
        common.print0(f"queue length {args.queue_length}: --queue-length trimmed to a multiple of the global batch "
                      f"{global_batch} = {args.batch_size} x {world}")
    return args


# --- Data ---
MEAN, STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # official SwAV (0.228, not 0.229)


class SyntheticTextures(torch.utils.data.Dataset):
    """10 texture classes filling 32-px images: stripes (horizontal, vertical, diagonal), checkerboards (straight,
    diagonal), dots, grid lines, concentric rings, waves, speckle. Period (6-12 px), phase, ring centre, polarity
    (light on dark or dark on light), a colour cast and pixel noise are random per image: neither colour nor brightness
    tells the class, only the pattern does, and it survives SwAV's crops, flips and colour distortions.
    Returns (uint8 image (3, S, S), label)."""
    classes = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "diagonal checkerboard",
               "dots", "grid lines", "rings", "waves", "speckle"]

    def __init__(self, n, seed, size=32):
        g = torch.Generator().manual_seed(seed)
        rand = functools.partial(torch.rand, generator=g)
        self.labels = torch.randint(0, len(self.classes), (n,), generator=g)
        c = torch.arange(size, dtype=torch.float32)
        yy, xx = torch.meshgrid(c, c, indexing="ij")  # (S, S) pixel coordinates
        f, phase = 2 * math.pi / (6 + 6 * rand(n, 1, 1)), 2 * math.pi * rand(n, 1, 1)  # (n, 1, 1)
        sign = torch.where(rand(n, 1, 1) < 0.5, -1.0, 1.0)  # diagonal stripes: either diagonal (a flip swaps them)
        x0, y0 = size * rand(n, 1, 1), size * rand(n, 1, 1)

        def wave(t):
            return torch.sin(f * t + phase)

        sx, sy, r2 = wave(xx), wave(yy), 2 ** 0.5
        patterns = [sy > 0, sx > 0, wave((xx + sign * yy) / r2) > 0, (sx > 0) ^ (sy > 0),
                    (wave((xx + yy) / r2) > 0) ^ (wave((xx - yy) / r2) > 0), (sx > 0.6) & (sy > 0.6),
                    (sx > 0.85) | (sy > 0.85), wave(torch.hypot(xx - x0, yy - y0)) > 0,
                    wave(yy + 2 * torch.sin(f * xx / 2)) > 0, rand(n, size, size) < 0.5]
        mask = torch.zeros(n, size, size, dtype=torch.bool)
        for k, p in enumerate(patterns):
            mask |= p & (self.labels == k)[:, None, None]
        mask ^= rand(n, 1, 1) < 0.5  # polarity
        tint = 0.5 + 0.5 * rand(n, 3, 1, 1)  # colour cast [inferred: fully random colours stall SwAV in 128 steps]
        img = torch.where(mask[:, None], 0.9, 0.1) * tint + 0.04 * torch.randn(n, 3, size, size, generator=g)
        self.images = (img.clamp(0, 1) * 255).round().to(torch.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def load_datasets(args):
    """(train, val, number of classes, resize_for_eval): unaugmented datasets of (image, label)."""
    if args.data == "synthetic":
        n_train, n_val = (2048, 1024) if args.tiny else (16384, 4096)
        train, val = SyntheticTextures(n_train, seed=0), SyntheticTextures(n_val, seed=1)
        return train, val, len(SyntheticTextures.classes), False
    root = os.path.expanduser(args.data)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {args.data} is not a folder; pass 'synthetic', an ImageFolder root with "
                         "train/ and val/, or the folder holding cifar-10-batches-py or cifar-100-python")
    try:
        for sub, cls in (("cifar-10-batches-py", torchvision.datasets.CIFAR10),
                         ("cifar-100-python", torchvision.datasets.CIFAR100)):
            if os.path.isdir(os.path.join(root, sub)):
                train, val = (cls(root, train=t, download=False) for t in (True, False))
                return train, val, len(train.classes), False
        if not all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
            raise SystemExit(f"error: {root} holds neither train/ and val/ (ImageFolder) nor cifar-10-batches-py or "
                             "cifar-100-python; point --data at such a folder")
        train, val = (torchvision.datasets.ImageFolder(os.path.join(root, s)) for s in ("train", "val"))
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: cannot read --data {root}: {str(e).splitlines()[0]}; check the folder") from None
    if train.classes != val.classes:
        raise SystemExit(f"error: {root}/train and {root}/val have different class folders; make them the same")
    return train, val, len(train.classes), min(train[0][0].size) > 64


class Seeded(torch.utils.data.Dataset):
    """(index, sample_seed) from common.ResumableSampler -> (transform(image), label), the transform's randomness
    seeded by sample_seed: crops depend on (seed, epoch, index) only, so resume is exact and two processes see the
    one-process global batch, and no augmentation draws from the training RNG. A plain index (the deterministic
    evaluation transforms: kNN memory, the probe's test set) is seeded by 0."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, 0)
        image, label = self.base[index]
        with common.seeded(sample_seed):
            return self.transform(image), label


# --- Model ---
def build_backbone(arch):
    """(backbone returning pooled features (B, F), F). torchvision ResNets are randomly initialised."""
    if arch == "small_cnn":  # GroupNorm: no batch statistics, so 2 CPU processes compute what 1 process does
        layers, c_in = [], 3
        for c_out, stride in ((16, 1), (32, 2), (64, 2), (128, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in
    net = torchvision.models.get_model(arch.replace("cifar_", ""), weights=None)
    if arch.startswith("cifar_"):  # 32-px images: 3x3 stride-1 stem, no max-pool
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with the statistics of the global batch on any device (nn.SyncBatchNorm is CUDA-only), as the
    official SyncBN head: a 2-process CPU run then computes what one process with the whole batch does."""

    def forward(self, x):
        if not self.training or common.get_world_size() == 1:
            return super().forward(x)
        stats = common.all_gather_with_grad(torch.stack([x.mean(0), (x * x).mean(0)])[None]).mean(0)  # (2, C)
        mean, var = stats[0], stats[1] - stats[0] ** 2  # biased variance normalises, as in BatchNorm
        with torch.no_grad():
            n = x.shape[0] * common.get_world_size()
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class SwAV(nn.Module):
    """Backbone -> projection head (Linear, BN, ReLU, Linear) -> L2-normalised z -> prototype scores z . c_k."""

    def __init__(self, arch, hidden_mlp, feat_dim, n_prototypes):
        super().__init__()
        self.backbone, dim = build_backbone(arch)
        self.projection_head = nn.Sequential(
            nn.Linear(dim, hidden_mlp), GlobalBatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
            nn.Linear(hidden_mlp, feat_dim)) if hidden_mlp else nn.Linear(dim, feat_dim)
        self.prototypes = nn.Linear(feat_dim, n_prototypes, bias=False)  # rows c_k, unit norm (normalize_prototypes_)

    def forward(self, groups):
        """groups: one tensor (n_g * B, 3, H_g, W_g) per resolution, its n_g crops concatenated (as the official
        forward), large first -> z (V*B, D) and scores (V*B, K), fp32, crop-major (rows v*B:(v+1)*B: crop v)."""
        z = F.normalize(self.projection_head(torch.cat([self.backbone(x) for x in groups])).float(), dim=1)
        with torch.autocast(z.device.type, enabled=False):  # scores feed exp(s / 0.05): keep them fp32
            return z, self.prototypes(z)


# --- Method ---
@torch.no_grad()
def sinkhorn(scores, eps=0.05, iters=3, world_size=1, all_reduce=None):
    """Sec. 3.1 codes Q* = Diag(u) exp(C^T Z / eps) Diag(v), by Sinkhorn-Knopp as the official distributed_sinkhorn.
    scores (b, K) of this process's b samples (queue rows included) -> soft codes (b, K), rows summing to 1.
    all_reduce sums a tensor over processes in place (None when alone), so the equipartition is over the global
    batch of B = b * world_size samples: every process gets the codes one process holding all of them would."""
    all_reduce = all_reduce or (lambda t: t)
    scores = scores.detach().float()  # fp32 under autocast too: exp(1 / 0.05) = 4.9e8 overflows fp16
    # A shift common to all processes cancels in the first normalisation; the mean of the per-process maxima is one
    # that a SUM all-reduce can give, and it keeps exp() from overflowing (pitfall: NaN codes from unnormalised z).
    shift = all_reduce(scores.max().reshape(1)) / world_size
    Q = torch.exp((scores - shift) / eps).t()  # (K, b)
    K, B = Q.shape[0], Q.shape[1] * world_size
    Q /= all_reduce(Q.sum().reshape(1))  # the global matrix sums to 1
    for _ in range(iters):
        Q /= all_reduce(Q.sum(dim=1, keepdim=True))  # rows: each prototype gets mass 1/K of the global batch
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # columns: each sample mass 1/B (a column lives on one process)
        Q /= B
    return (Q * B).t()


def swav_loss(scores, crops_for_assign=(0, 1), temperature=0.1, eps=0.05, iters=3, queue_scores=None,
              world_size=1, all_reduce=None):
    """Eq. 1-2 over all crops (official main_swav): for each assignment crop i, codes q_i = sinkhorn(scores_i), every
    other crop v predicts them, l = -mean_b sum_k q_i[k] log softmax(scores_v / tau)[k]; mean over the V - 1 crops,
    then over the assignment crops. scores: list of V tensors (b, K), large crops first. queue_scores: one (L, K) per
    assignment crop or None; its rows are prepended to the Sinkhorn problem and their codes dropped."""
    b, n_crops = scores[0].shape[0], len(scores)
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]  # fp32
    loss = 0.0
    for j, i in enumerate(crops_for_assign):
        s = scores[i] if queue_scores is None else torch.cat([queue_scores[j], scores[i]])
        q = sinkhorn(s, eps, iters, world_size, all_reduce)[-b:]  # (b, K), no gradient
        loss = loss + sum(-(q * log_p[v]).sum(1).mean() for v in range(n_crops) if v != i) / (n_crops - 1)
    return loss / len(crops_for_assign)


@torch.no_grad()
def normalize_prototypes_(linear):
    """Prototypes live on the unit sphere (scores are cosines): rows re-normalised before every forward."""
    linear.weight.copy_(F.normalize(linear.weight, dim=1))


def freeze_prototype_grads_(model, iteration, n_frozen):
    """No prototype update during the first n_frozen iterations (official freeze_prototypes_niters)."""
    if iteration < n_frozen:
        for p in model.prototypes.parameters():
            p.grad = None


class SwAVQueue:
    """Queue of past embeddings, one per assignment crop, on each process (official: L / world rows per process;
    together the processes hold L rows). Newest rows first. Only enlarges the Sinkhorn problem: no gradient, no loss."""

    def __init__(self, n_assign, length, dim, device=None):
        self.embeddings = torch.zeros(n_assign, length, dim, device=device)  # (n_assign, L / world, D)
        self.n_pushed = 0

    @property
    def full(self):  # official: used once the last row is non-zero
        return self.n_pushed >= self.embeddings.shape[1]

    @torch.no_grad()
    def push(self, emb_list):
        """emb_list: one (b, D) batch of embeddings per assignment crop; FIFO shift by b."""
        b = emb_list[0].shape[0]
        self.embeddings[:, b:] = self.embeddings[:, :-b].clone()
        self.embeddings[:, :b] = torch.stack(emb_list).float()
        self.n_pushed = min(self.n_pushed + b, self.embeddings.shape[1])

    @torch.no_grad()
    def scores(self, prototype_weight):
        """Scores of the queued embeddings under the current prototypes: one (L / world, K) per assignment crop."""
        return list(self.embeddings @ prototype_weight.float().t())

    def state_dict(self):
        return {"embeddings": self.embeddings.cpu(), "n_pushed": self.n_pushed}

    def load_state_dict(self, state):
        self.embeddings.copy_(state["embeddings"])
        self.n_pushed = state["n_pushed"]


class MultiCrop:
    """image -> [(uint8 crop (3, S, S), colour parameters (11,))] per crop, large crops first."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        return [(t(image), colour_params(blur)) for t, blur in self.transforms]


def multicrop_transform(size_crops=(224, 96), nmb_crops=(2, 6), min_scale=(0.14, 0.05), max_scale=(1.0, 0.14)):
    """Sec. 3.2 multi-crop as the official MultiCropDataset, its worker part: RandomResizedCrop and flip (PIL ops on
    PIL images, torchvision's on the built-in tensors) and each crop's colour draws (colour_params, blur above 64 px
    only [inferred: the radius is in pixels and erases 32-px images]); the device applies them (colour_augment).
    image -> list of sum(nmb_crops) (uint8 crop, params), large crops first."""
    return MultiCrop([(v2.Compose([v2.RandomResizedCrop(size, scale=(lo, hi), antialias=True),
                                   v2.RandomHorizontalFlip(), v2.PILToTensor()]), size > 64)  # tensors pass through
                      for size, n, lo, hi in zip(size_crops, nmb_crops, min_scale, max_scale) for _ in range(n)])


def colour_params(blur=True):
    """One crop's draws of the official colour distortion, in the worker (they follow its per-sample seed):
    ColorJitter(0.8, 0.8, 0.8, 0.2) w.p. 0.8 (as its get_params: the 4 ops in a random permutation, brightness,
    contrast, saturation U(0.2, 1.8), hue U(-0.2, 0.2)), grayscale w.p. 0.2, PILRandomGaussianBlur w.p. 0.5, radius
    (PIL: sigma) U(0.1, 2). -> (11,): [jitter on, order (4; 0 brightness 1 contrast 2 saturation 3 hue), factors
    (4, by op), grey, sigma (0: no blur)]."""
    on, order = torch.rand(()) < 0.8, torch.randperm(4)
    factors = torch.tensor([0.2, 0.2, 0.2, -0.2]) + torch.tensor([1.6, 1.6, 1.6, 0.4]) * torch.rand(4)
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
    """Multi-crop's colour part on the device, batched over crops of one resolution, with the worker's draws
    (colour_params): torchvision's adjust_brightness / contrast / saturation / hue in each crop's order,
    rgb_to_grayscale, gaussian_blur of each crop's sigma (separable, reflect padding, 13 taps), on floats
    (PIL rounds to uint8 after each op). x (B, 3, H, W) in [0, 1], params (B, 11) -> (B, 3, H, W) in [0, 1]."""
    on, hue, grey, sigma = (params[:, i].view(-1, 1, 1, 1) for i in (0, 8, 9, 10))
    # ColorJitter's four ops in each crop's drawn order. The hue rotation, the costly one, runs once for the batch:
    # the blends (0 brightness, 1 contrast, 2 saturation) a crop draws before its hue fill slots 0-2, those after
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
    r = 6  # 13 taps: 3 sigma either side at the largest sigma, 2 (PIL's blur is not truncated)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)[:, None]  # (B * 3, 1, taps): per crop and channel
    y = F.pad(x, (r,) * 4, mode="reflect").flatten(0, 1)[None]  # (1, B * 3, H + 2r, W + 2r)
    y = F.conv2d(F.conv2d(y, k[:, :, None], groups=len(k)), k[..., None], groups=len(k))
    return y.view_as(x)  # sigma 0: the kernel is 1 at the centre, exactly 0 elsewhere


def lr_schedule(base_lr, final_lr, epochs, iters_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """Official per-iteration schedule: linear warmup from start_warmup to base_lr, then cosine to final_lr."""
    return common.cosine_schedule(base_lr, final_lr, epochs * iters_per_epoch, warmup_epochs * iters_per_epoch,
                                  start_warmup)


class LARS(torch.optim.Optimizer):
    """SGD with momentum wrapped in apex LARC (clip=False), as in the official SwAV: for every tensor with non-zero
    weight and gradient norms the update is (g + wd w) * trust ||w|| / (||g|| + wd ||w|| + eps) (else g, no weight
    decay); applied to all tensors (biases, norms, prototypes); tensors without gradient (frozen) are skipped."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = p.norm(), p.grad.norm()
                local_lr = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                d = torch.where((w_norm > 0) & (g_norm > 0), (p.grad + wd * p) * local_lr, p.grad)  # no host sync
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))  # first step: buf = d
                p.add_(buf.mul_(group["momentum"]).add_(d), alpha=-group["lr"])


# --- Evaluation ---
def to_input(x, device, params=None):
    """uint8 images (B, 3, H, W) -> float on the device, colour-augmented when the worker's params are given
    (colour_augment), normalised (channels_last on CUDA): the workers hand over 4x fewer bytes than float crops."""
    x = x.to(device, non_blocking=True).float().div_(255)
    x = x if params is None else colour_augment(x, params.to(device, non_blocking=True))
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last if device.type == "cuda" else
                                         torch.contiguous_format)


def eval_transform(size, resize):
    """eval_linear.py's test transform: Resize(256) + CenterCrop(224), scaled to `size`; small images resized only."""
    crop = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)] if resize else [
        v2.Resize(size, antialias=True)]
    return v2.Compose([*crop, v2.ToImage(), v2.ToPureTensor()])  # PIL ops on PIL images


def probe_train_transform(size):
    """eval_linear.py's train transform: RandomResizedCrop(224) (scale 0.08-1) + flip, at `size`."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
                       v2.ToPureTensor()])


@torch.no_grad()
def extract_features(backbone, dataset, device, amp, batch_size=256, workers=0, gather=True):
    """Frozen features and labels in eval mode (BatchNorm statistics untouched). Every process embeds a contiguous
    shard (the last index repeated to equal sizes); gather=True returns the whole set (N, F), (N,) on every process,
    gather=False only this process's rows [rank * ceil(N / world), ...): memory per process is its shard."""
    rank, world, n = common.get_rank(), common.get_world_size(), len(dataset)
    per = math.ceil(n / world)
    shard = torch.utils.data.Subset(dataset, [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)])
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y in loader:
        with common.autocast(device, amp):
            feats.append(backbone(to_input(x, device)).float())
        labels.append(y.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if not gather:
        own = max(0, min(per, n - rank * per))  # the repeated last index belongs to the last shard only
        return feats[:own], labels[:own]
    return common.concat_all_gather(feats)[:n], common.concat_all_gather(labels)[:n]


@torch.no_grad()
def knn_accuracy(train_f, train_y, val_f, val_y, n_classes, k=200, t=0.1):
    """Weighted kNN (Wu et al. 2018; lightly's benchmarks): the k most cosine-similar training features vote for
    their label with weight exp(sim / t). Top-1 in %. train_f, train_y: this process's shard of the training set;
    val_f, val_y: the whole val set on every process. Each process takes the top k of its shard, and the top k
    of the gathered candidates (world x k per query) are the global top k."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    correct, world, k = 0, common.get_world_size(), min(k, int(common.all_reduce_sum(
        torch.tensor(len(train_f), device=val_f.device))))
    for f, y in zip(val_f.split(1024), val_y.split(1024)):
        sim = torch.full((len(f), k), -float("inf"), device=f.device)  # a shard with fewer than k rows pads
        lab = torch.zeros(len(f), k, dtype=torch.long, device=f.device)  # with weight exp(-inf) = 0
        local = (f @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (b, <=k)
        sim[:, :local.values.shape[1]], lab[:, :local.values.shape[1]] = local.values, train_y[local.indices]
        if world > 1:  # (world * b, k) -> (b, world * k) candidates
            sim, lab = (common.concat_all_gather(x).view(world, len(f), k).transpose(0, 1).flatten(1)
                        for x in (sim, lab))
        sim, top = sim.topk(k, dim=1)
        votes = torch.zeros(len(f), n_classes, device=f.device).scatter_add_(1, lab.gather(1, top), (sim / t).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return 100.0 * correct / len(val_y)


def linear_probe(batches, val_f, val_y, n_classes, epochs=100, lr=0.3, standardize=None):
    """eval_linear.py on frozen features: Linear (init N(0, 0.01), bias 0) trained by SGD (momentum 0.9, wd 1e-6,
    no Nesterov), lr cosine-annealed per epoch to 0, tested on val_f after every epoch. batches(epoch) yields this
    process's (features, labels), parts of one global batch (sizes may differ); the loss is the mean over the
    global batch, as one process would take it (DDP's average when the parts are equal). standardize: (mean, std)
    applied to all features, or None (official). Returns (best top-1 over the epochs, which eval_linear.py reports,
    last), in %."""
    mean, std = standardize or (0.0, 1.0)
    clf = nn.Linear(val_f.shape[1], n_classes).to(val_f.device)
    g = torch.Generator().manual_seed(0)  # own RNG: the probe does not move the training RNG
    clf.weight.data.copy_(torch.randn(clf.weight.shape, generator=g).to(val_f.device) * 0.01)
    clf.bias.data.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.0)
    best = acc = 0.0
    for epoch in range(epochs):
        for f, y in batches(epoch):
            n = common.all_reduce_sum(torch.tensor(float(len(y)), device=f.device))  # the global batch
            loss = F.cross_entropy(clf((f - mean) / std), y, reduction="sum") / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in clf.parameters():
                common.all_reduce_sum(p.grad)
            opt.step()
        sched.step()
        with torch.no_grad():
            acc = 100.0 * (clf((val_f - mean) / std).argmax(1) == val_y).float().mean().item()
        best = max(best, acc)
    return best, acc


def evaluate(backbone, train_set, val_set, n_classes, resize, args, device, amp):
    """Linear probe top-1 (the paper's headline; best over the probe epochs, as eval_linear.py) and weighted kNN
    top-1, in %, on frozen backbone features (eval mode). The probe re-crops the training images every epoch
    (RandomResizedCrop + flip) at global batch 256 (eval_linear.py: 32 x 8 GPUs); --probe-fixed-features trains on
    the centre-crop features computed once instead, and --probe-standardize standardises features [deviations]."""
    was_training = backbone.training
    backbone.eval()
    size, world = args.size_crops[0], common.get_world_size()
    train_f, train_y = extract_features(backbone, Seeded(train_set, eval_transform(size, resize)), device, amp,
                                        workers=args.workers, gather=False)  # this process's shard
    val_f, val_y = extract_features(backbone, Seeded(val_set, eval_transform(size, resize)), device, amp,
                                    workers=args.workers)
    sampler = common.ResumableSampler(len(train_set), max(1, min(256, len(train_set)) // world), seed=0)
    loader = torch.utils.data.DataLoader(Seeded(train_set, probe_train_transform(size)), batch_size=sampler.batch_size,
                                         sampler=sampler, num_workers=args.workers, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda")
    one_process = common.ResumableSampler(len(train_set), sampler.batch_size * world, seed=0, rank=0, world_size=1)

    def batches(epoch):
        sampler.set_epoch(epoch), one_process.set_epoch(epoch)
        if args.probe_fixed_features:  # each global batch of the one-process order, from the rows of this shard
            first = common.get_rank() * math.ceil(len(train_set) / world)
            order = torch.tensor([i for i, _ in one_process], device=device).view(-1, sampler.batch_size * world)
            for idx in order - first:
                idx = idx[(idx >= 0) & (idx < len(train_f))]
                yield train_f[idx], train_y[idx]
            return
        for x, y in loader:
            with torch.no_grad(), common.autocast(device, amp):
                f = backbone(to_input(x, device)).float()
            yield f, y.to(device)

    stats = None
    if args.probe_standardize:  # over the whole training set: sums over the shards
        f64 = train_f.double()
        s = common.all_reduce_sum(torch.stack([torch.full_like(val_f[0], len(f64), dtype=torch.float64),
                                               f64.sum(0), (f64 ** 2).sum(0)]))
        var = (s[2] - s[1] ** 2 / s[0]) / (s[0] - 1)  # unbiased, as torch.std
        stats = ((s[1] / s[0]).float(), var.clamp_min(0).sqrt().float() + 1e-6)
    best, last = linear_probe(batches, val_f, val_y, n_classes, args.probe_epochs, args.probe_lr, stats)
    backbone.train(was_training)
    return {"linear_top1": best, "knn_top1": knn_accuracy(train_f, train_y, val_f, val_y, n_classes, args.knn_k,
                                                         args.knn_t), "linear_top1_last_epoch": last}


# --- Train ---
class CollapseGuard:
    """Pitfall #12: a collapsed SwAV maps every image to one point, its codes are uniform and the loss is ln K.
    update(step, loss) stops the run (before anything is saved) once the loss has stayed within `tol` of ln K for
    `window` steps after `start` (the warmup and the frozen prototypes)."""

    def __init__(self, n_prototypes, start, window, tol=0.01):
        self.ln_k, self.start, self.window, self.tol, self.since = math.log(n_prototypes), start, window, tol, None

    def update(self, step, loss):
        stuck = self.window and step > self.start and abs(loss - self.ln_k) < self.tol
        self.since = (step if self.since is None else self.since) if stuck else None
        if stuck and step - self.since >= self.window:
            raise SystemExit(f"error: collapse: the loss stayed within {self.tol} of ln K = {self.ln_k:.4f} from step "
                             f"{self.since} to {step} (every image gets the same code); nothing was saved after it. "
                             "Try --epsilon 0.03, fewer --nmb-prototypes, a lower --lr, more "
                             "--freeze-prototypes-niters or no queue (official README, 'Common issues')")


def train_step(train_model, model, crops, queue, args, amp):
    """Forward, loss and backward on this process's share of the global batch (gradients of the global-batch mean
    once DDP averages them). crops: (uint8 crops, colour params) on the device, large first; colour_augment runs
    once per resolution, outside the compiled model. Returns (loss, queue_in_use)."""
    n_crops = len(crops)
    normalize_prototypes_(model.prototypes)
    groups = [to_input(torch.cat(x), x[0].device, torch.cat(p)) for x, p in
              (zip(*g) for _, g in itertools.groupby(crops, key=lambda c: c[0].shape[-1]))]  # one per resolution
    with common.autocast(groups[0].device, amp):
        z, scores = train_model(groups)
    queue_scores = queue.scores(model.prototypes.weight) if queue is not None and queue.full else None
    loss = swav_loss(list(scores.chunk(n_crops)), args.crops_for_assign, args.temperature, args.epsilon,
                     args.sinkhorn_iterations, queue_scores, common.get_world_size(), common.all_reduce_sum)
    if queue is not None:  # after the codes: the current batch is not its own queue
        queue.push([z.detach().chunk(n_crops)[i] for i in args.crops_for_assign])
    return loss, queue_scores is not None


def main(argv=None):
    args = get_args(argv)
    if args.tiny and "OMP_NUM_THREADS" not in os.environ:  # ops on 32-px crops are too small to gain from threads,
        torch.set_num_threads(1)  # and on a busy machine spinning OpenMP threads made --tiny 10x slower (measured)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    amp = args.amp or common.default_amp(device)
    global_batch = args.batch_size * world
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")

    train_set, val_set, n_classes, resize = load_datasets(args)
    common.seed_everything(args.seed)  # same initial model on every rank
    model = SwAV(args.arch, args.hidden_mlp, args.feat_dim, args.nmb_prototypes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world > 1:  # official: SyncBN, so the batch statistics are those of the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    common.seed_everything(args.seed + rank)
    init_metrics = evaluate(model.backbone, train_set, val_set, n_classes, resize, args, device, amp) \
        if args.tiny and not args.eval_only else {}

    sampler = common.ResumableSampler(len(train_set), args.batch_size, seed=args.seed)
    transform = multicrop_transform(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops)
    loader = torch.utils.data.DataLoader(Seeded(train_set, transform), batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    steps_per_epoch = sampler.steps_per_epoch
    schedule = lr_schedule(args.lr, args.final_lr, args.epochs, steps_per_epoch, args.warmup_epochs, args.start_warmup)
    total = args.epochs * steps_per_epoch
    total = total if args.max_steps is None else min(args.max_steps, total)
    optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, trust_coefficient=args.lars_trust)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    opt_state = {"optimizer": optimizer, **({"scaler": scaler} if scaler.is_enabled() else {})}

    step, queue = 0, None
    state = common.load_checkpoint(ckpt_path, "swav", resume=not args.eval_only)  # restores this rank's RNG
    if state is not None:
        common.restore(state, ckpt_path, model=model, **({} if args.eval_only else opt_state))
        step = state["step"]
        if not args.eval_only and state["rank"].get("queue") is not None:
            queue = SwAVQueue(len(args.crops_for_assign), args.queue_length // world, args.feat_dim, device)
            common.load_state(queue, state["rank"]["queue"], ckpt_path)
        common.print0(f"resumed from {ckpt_path} at step {step}")
    total = step if args.eval_only else total

    train_model = common.distribute(model, device, args.compile)
    common.print0(f"swav | {args.arch} | global batch {global_batch} = {args.batch_size} x {world} | lr {args.lr:g} | "
                  f"{len(train_set)} images, {n_classes} classes | crops {args.nmb_crops} x {args.size_crops} px | "
                  f"K {args.nmb_prototypes} | eps {args.epsilon:g} | queue {args.queue_length} from epoch "
                  f"{args.epoch_queue_starts} | {steps_per_epoch} steps/epoch, {total} steps")
    guard = CollapseGuard(args.nmb_prototypes, max(args.freeze_prototypes_niters, args.warmup_epochs * steps_per_epoch),
                          args.collapse_window)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="swav")
    t0, seen = time.time(), 0
    model.train()  # the one place: evaluation and from-checkpoint paths leave it in eval mode
    while step < total:
        epoch = step // steps_per_epoch
        if queue is None and args.queue_length and epoch >= args.epoch_queue_starts:
            # Sec. 3.1: for small batches; started late, once the features have settled
            queue = SwAVQueue(len(args.crops_for_assign), args.queue_length // world, args.feat_dim, device)
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for crops, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = schedule[step]
            crops = [(c.to(device, non_blocking=True), p.to(device, non_blocking=True)) for c, p in crops]
            loss, queue_in_use = train_step(train_model, model, crops, queue, args, amp)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            freeze_prototype_grads_(model, step, args.freeze_prototypes_niters)
            scaler.step(optimizer)
            scaler.update()
            step, seen = step + 1, seen + global_batch
            bar.update()
            if step % args.log_every == 0 or step == total or step % steps_per_epoch == 0:
                loss_v = (common.all_reduce_sum(loss.detach().reshape(1).clone()) / world).item()  # global mean
                if not math.isfinite(loss_v):  # before anything is saved
                    raise SystemExit(f"error: loss is {loss_v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {
                    "step": step, "epoch": epoch, "loss": loss_v,
                    "loss_minus_ln_k": loss_v - math.log(args.nmb_prototypes),  # stuck near 0 = collapse
                    "queue_in_use": queue_in_use, "lr": schedule[step - 1],
                    "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{loss_v:.4f}")
                guard.update(step, loss_v)
                t0, seen = time.time(), 0
            if step == total:
                break
        common.save_checkpoint(ckpt_path, "swav", step, {  # at every epoch end and when --max-steps stops the run
            "args": vars(args), "model": model.state_dict(), "epoch": step // steps_per_epoch,
            **{k: v.state_dict() for k, v in opt_state.items()}},
            per_rank={"queue": queue.state_dict() if queue is not None else None}, finite=[model])
    bar.close()

    metrics = evaluate(model.backbone, train_set, val_set, n_classes, resize, args, device, amp)
    metrics.update({f"{k}_init": v for k, v in init_metrics.items()})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    common.print0("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
