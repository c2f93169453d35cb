"""HPCL-Net: hyper-pixel-wise contrastive learning for old (relic) landslide segmentation from RGB and DEM.
Yiming Zhou, Yuexing Peng, Wei Li, Junchuan Yu, Daqing Ge, Wei Xiang. "Hyper-pixel-wise Contrastive Learning Augmented
Segmentation Network for Old Landslide Detection through Fusing High-Resolution Remote Sensing Images and Digital
Elevation Model Data", arXiv 2308.01251 (2023; v4: "A Multi-Source Data Fusion-based Semantic Segmentation Model for
Relic Landslide Detection").

An RGB encoder and a DEM encoder (elevation, slope, hillshade) are fused in semantic space and decoded to a
landslide / background map trained with cross-entropy. Hyper-pixels (cells of the stride-4 embedding map, pooled) of a
momentum (EMA) copy of the network fill two global class-wise FIFO queues across images and iterations; each online
hyper-pixel anchor (half from landslide boundaries) is contrasted with the queued keys of its class (positives) and of
the other class (negatives): L = CE + lambda L_hpcl. No code is public and only the abstract is certain (fusion in
semantic space, global hyper-pixel queues, a momentum encoder); everything else follows the spec (its Sec. numbers
below) and is [inferred], each a flag: ResNet-18-layout encoders (DEM at half width), late fusion at strides 8/16/32
(--fusion), FPN decoder, projection head, grid or k-means hyper-pixels (--hp, --cell), purity labels (--purity),
boundary-first anchors (--anchors, --boundary-frac), queue size, sampled positives / negatives, tau, lambda, loss form
(--hpcl-form), m, class-weighted CE, Dice, AdamW + poly lr, 5 epochs of CE warm-up and the SynthLoess data.

Sec. 3 model -> `SegNet`, `dem_derivatives`; Sec. 4 hyper-pixels -> `hyperpixel_grid`, `hyperpixel_kmeans`,
`hyperpixel_pool`, `hyperpixel_labels`, `boundary_cells`, `sample_anchors`, queues -> `ClassQueue`, momentum encoder ->
`momentum_update_`; Sec. 5 L_hpcl -> `hpcl_loss`, total loss -> `train_step`; Sec. 8 metrics from one confusion matrix
over the test set (summed over processes) -> `seg_metrics`, `evaluate`. Ablations: `--fusion rgb --hpcl-weight 0`
(RGB only), `--hpcl-weight 0` (RGB + DEM), the defaults (RGB + DEM + HPCL).

--batch-size is per process; the spec's recipe is a global batch of 16, 80 epochs:
  python hpcl.py --tiny                                                        # CPU smoke run, < 1 minute
  python hpcl.py --tiny --fusion rgb --hpcl-weight 0                           # the RGB-only ablation
  python hpcl.py --data /data/loess                                            # one GPU: 16 x 1
  torchrun --nproc_per_node=8 hpcl.py --data /data/loess --batch-size 2        # 2 x 8 = 16
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
      hpcl.py --data /data/loess --batch-size 1                                # 1 x 16 = 16 (SyncBN on CUDA)
--data DIR holds train/ and test/ (or val/), each with rgb/, dem/ and mask/ folders of tiles of the same names:
rgb/<name>.png|.npy (H, W, 3 uint8), dem/<name>.npy|.png (H, W elevation in metres; 16-bit PNG allowed),
mask/<name>.png|.npy (H, W, nonzero = landslide); H and W multiples of 32.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import common

# --- Arguments ---
PAPER_GLOBAL_BATCH = 16  # the spec's mini recipe [inferred]; the paper's batch is not public
STRIDE = 4  # the embedding map and the hyper-pixels live at stride 4 (Sec. 3)
# --tiny [inferred]: 64-px tiles, channels 8/16/32/64, emb 16, queue 256 (spec Sec. 3), short schedule.
TINY = dict(epochs=6, batch_size=8, lr=3e-3, workers=0, log_every=20, widths=[8, 16, 32, 64], depths=[1, 1, 1, 1],
            dec_dim=32, emb_dim=16, queue=256, anchors=16, pos_sample=128, neg_sample=128, hpcl_warmup_epochs=1,
            tile_size=64, train_tiles=320, test_tiles=96)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="HPCL-Net (arXiv 2308.01251)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic' (SynthLoess, built in) or a folder with train/ "
                   "and test/ (or val/), each holding rgb/, dem/ and mask/ tiles (see the docstring)")
    p.add_argument("--output-dir", default="runs/hpcl")
    p.add_argument("--epochs", type=int, default=80, help="[inferred: spec's mini recipe]")
    p.add_argument("--batch-size", type=int, default=16, help="per process (global: 16 [inferred])")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr, poly decay (Sec. 6) [inferred]")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay [inferred]")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --output-dir (or untrained)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps; 0 = evaluate the untrained model")
    p.add_argument("--tiny", action="store_true", help="small model, short schedule, 64-px built-in tiles (unless "
                   "--data is given): CPU smoke run; flags given explicitly win")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--fusion", choices=["late", "early", "rgb"], default="late", help="late: two encoders fused at "
                   "strides 8/16/32 (concat, 1x1 conv, BN, ReLU; Sec. 3); early: one encoder on RGB + elevation; "
                   "rgb: no DEM (the ablation's RGB-only model) [inferred]")
    m.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 512], help="RGB encoder stage widths at "
                   "strides 4/8/16/32; the DEM encoder has half [inferred: ResNet-18 layout]")
    m.add_argument("--depths", type=int, nargs=4, default=[2, 2, 2, 2], help="basic blocks per stage [inferred]")
    m.add_argument("--dec-dim", type=int, default=256, help="FPN decoder width = phi's input (Sec. 3) [inferred]")
    m.add_argument("--emb-dim", type=int, default=128, help="dimension of phi's L2-normalised embedding [inferred]")
    m.add_argument("--hp", choices=["grid", "kmeans"], default="grid", help="hyper-pixels: regular cells or a few "
                   "k-means iterations in (x, y, RGB, DEM) (Sec. 4) [inferred]")
    m.add_argument("--cell", type=int, default=2, help="s: hyper-pixel side in stride-4 positions [inferred]")
    m.add_argument("--purity", type=float, default=0.75, help="rho: a cell is landslide when its GT fraction >= "
                   "rho, background when <= 1 - rho, else ignored (Sec. 4) [inferred]")
    m.add_argument("--anchors", type=int, default=64, help="n: anchors per image and class (Sec. 4) [inferred]")
    m.add_argument("--boundary-frac", type=float, default=0.5, help="share of boundary anchors (Sec. 4) [inferred]")
    m.add_argument("--queue", type=int, default=4096, help="Q: length of each class queue (Sec. 4) [inferred]")
    m.add_argument("--pos-sample", type=int, default=256, help="|P_q|: queued positives (Sec. 5) [inferred]")
    m.add_argument("--neg-sample", type=int, default=512, help="|N_q|: queued negatives (Sec. 5) [inferred]")
    m.add_argument("--tau", type=float, default=0.1, help="tau of L_hpcl (Sec. 5) [inferred]")
    m.add_argument("--hpcl-weight", type=float, default=0.1, help="lambda in L = CE + lambda L_hpcl (Sec. 5); 0 = "
                   "no contrastive term (ablation) [inferred]")
    m.add_argument("--hpcl-form", choices=["per_positive", "supcon"], default="per_positive", help="one InfoNCE per "
                   "positive (Sec. 5) or SupCon (all positives in one denominator) [inferred]")
    m.add_argument("--momentum", type=float, default=0.99, help="m of the momentum encoder (Sec. 4) [inferred]")
    m.add_argument("--hpcl-warmup-epochs", type=int, default=5, help="epochs of CE alone before L_hpcl; the queues "
                   "fill meanwhile (Sec. 6) [inferred]")
    m.add_argument("--dice", action="store_true", help="add a (global) Dice loss on the landslide class [inferred]")
    m.add_argument("--class-weighted", choices=["auto", "on", "off"], default="auto", help="CE weights inverse to "
                   "sqrt(class frequency); auto: when landslides are < 15%% of training pixels (Sec. 5) [inferred]")
    m.add_argument("--poly", type=float, default=0.9, help="power of the poly lr decay (Sec. 6) [inferred]")
    m.add_argument("--dem-scale", type=float, default=10.0, help="metres per unit of elevation input [inferred]")
    m.add_argument("--gsd", type=float, default=1.0, help="DEM metres per pixel (SynthLoess: 1), for the slope")
    m.add_argument("--train-tiles", type=int, default=600, help="training tiles used (SynthLoess: generated; --data: "
                   "the first N, 0 = all) (Sec. 6) [inferred]")
    m.add_argument("--test-tiles", type=int, default=200, help="SynthLoess test tiles (Sec. 7) [inferred]")
    m.add_argument("--tile-size", type=int, default=128, help="SynthLoess tile side in pixels (Sec. 7) [inferred]")
    args = p.parse_args(argv)
    if args.tiny:  # the tiny preset fills every flag that was not written on the command line
        for a in p._actions:
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
        for k, v in TINY.items():
            if k not in given:
                setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check that depends on the flags and the world size alone (no file system): one-line errors."""
    if args.batch_size < 1 or args.epochs < 1 or args.cell < 1 or args.anchors < 1:
        raise SystemExit("error: --batch-size, --epochs, --cell and --anchors must be >= 1")
    if args.tau <= 0 or args.hpcl_weight < 0 or not 0 <= args.momentum <= 1:
        raise SystemExit("error: --tau must be positive, --hpcl-weight >= 0 and --momentum in [0, 1]")
    if not 0.5 <= args.purity <= 1 or not 0 <= args.boundary_frac <= 1:
        raise SystemExit("error: --purity must be in [0.5, 1] and --boundary-frac in [0, 1]")
    if args.max_steps is not None and args.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    if args.data == "synthetic" and args.tile_size % 32:
        raise SystemExit(f"error: --tile-size {args.tile_size} is not a multiple of 32 (the encoder's stride)")
    keys = world * args.batch_size * args.anchors  # keys of one class enqueued per step, over all processes
    if keys > args.queue:
        raise SystemExit(f"error: one step enqueues up to {keys} keys per class ({world} x --batch-size "
                         f"{args.batch_size} x --anchors {args.anchors}), more than --queue {args.queue}; raise "
                         "--queue or lower --anchors")
    if min(args.pos_sample, args.neg_sample) < 1 or max(args.pos_sample, args.neg_sample) > args.queue:
        raise SystemExit("error: --pos-sample and --neg-sample must be in [1, --queue]")
    if args.batch_size * world != PAPER_GLOBAL_BATCH and not args.tiny:
        common.print0(f"note: global batch {args.batch_size * world} = {args.batch_size} x {world}; the recipe's is "
                      f"{PAPER_GLOBAL_BATCH} (--batch-size {max(1, PAPER_GLOBAL_BATCH // world)} with {world} "
                      "processes)")


# --- Data ---
class Tiles:
    """Tiles in memory: rgb (N, 3, S, S) uint8, dem (N, 1, S, S) float32 metres, mask (N, S, S) uint8 {0, 1}."""

    def __init__(self, rgb, dem, mask):
        self.rgb, self.dem, self.mask = rgb, dem, mask

    def __len__(self):
        return len(self.rgb)

    def __getitem__(self, s):  # a slice of the tiles
        return Tiles(self.rgb[s], self.dem[s], self.mask[s])


def _smooth_noise(g, n, size, cells):
    """(n, size, size) smooth noise in about [-1, 1]: a cells x cells random field, bicubic upsampled."""
    x = torch.randn(n, 1, cells, cells, generator=g)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def synth_loess(n, size, seed):
    """SynthLoess (Sec. 7) [inferred]: terrain (downslope plane, hills, gullies; metres, 1 m per pixel) with 0-2 old
    landslides, ellipses along the slope with a steep head scarp at the upslope rim, a lowered body and a hummocky toe
    (the mask); DEM distractors: smooth hollows. RGB: vegetation texture, weak shading; landslides only tint it
    weakly with blurred edges, and bare patches, terraces and roads look alike without a DEM signature."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)  # noqa: E731
    c = (torch.arange(size) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")  # (S, S) in [0, 1]
    theta = u(n, 1, 1, hi=2 * math.pi)
    dx, dy = torch.cos(theta), torch.sin(theta)  # downslope direction
    along, across = xx * dx + yy * dy, -xx * dy + yy * dx
    z = -u(n, 1, 1, lo=0.1, hi=0.25) * along * size  # metres; the plane falls downslope
    for _ in range(5):  # hills and basins
        cx, cy, s, a = u(n, 1, 1), u(n, 1, 1), u(n, 1, 1, lo=0.1, hi=0.3), u(n, 1, 1, lo=-0.06, hi=0.06) * size
        z = z + a * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2))
    z = z + 0.015 * size * torch.sin(2 * math.pi * u(n, 1, 1, lo=2, hi=4) * across + u(n, 1, 1, hi=6.3))  # gullies
    z = z + 0.004 * size * _smooth_noise(g, n, size, size // 8)  # roughness
    mask, soft = torch.zeros(n, size, size, dtype=torch.bool), torch.zeros(n, size, size)

    def ellipse():  # local coordinates of a random ellipse along the slope: (u along / a, v across / b)
        cx, cy = u(n, 1, 1, lo=0.15, hi=0.85), u(n, 1, 1, lo=0.15, hi=0.85)
        a, b = u(n, 1, 1, lo=0.12, hi=0.22), u(n, 1, 1, lo=0.09, hi=0.16)
        return ((xx - cx) * dx + (yy - cy) * dy) / a, (-(xx - cx) * dy + (yy - cy) * dx) / b

    count = torch.multinomial(torch.tensor([0.2, 0.45, 0.35]), n, replacement=True, generator=g)
    for k in range(2):  # landslides
        on = (count > k).float().view(n, 1, 1)
        eu, ev = ellipse()
        rho, depth = torch.sqrt(eu ** 2 + ev ** 2), u(n, 1, 1, lo=0.025, hi=0.045) * size * on
        rim = ((1 - rho) / 0.15).clamp(0, 1)  # a step down within the outer 15% of the radius
        up = torch.sigmoid(-(eu - 0.3) * 6)  # the scarp is upslope; downslope the body runs out smoothly
        toe = torch.exp(-((eu - 0.7) ** 2 / 0.04 + ev ** 2 / 0.3)) * (rho < 1.1)  # hummocky deposit
        hummocks = 1 + 0.5 * _smooth_noise(g, n, size, size // 6)
        z = z - depth * rim * up + 0.6 * depth * toe * hummocks
        mask |= (rho < 1) & (on > 0)
        soft = torch.maximum(soft, torch.sigmoid((1 - rho) / 0.15) * on)  # old landslides: blurred edges
    for _ in range(2):  # DEM distractors: smooth natural hollows, no scarp, no deposit
        eu, ev = ellipse()
        z = z - u(n, 1, 1, hi=0.035) * size * (u(n, 1, 1) < 0.6) * torch.exp(-(eu ** 2 + ev ** 2) / 0.5)
    dem = z.float()[:, None]
    shade = dem_derivatives(dem)[:, 2]  # (n, S, S) in [0, 1]
    veg = torch.tensor([0.33, 0.40, 0.22]).view(1, 3, 1, 1) + u(n, 3, 1, 1, lo=-0.05, hi=0.05)
    rgb = veg + 0.05 * _smooth_noise(g, n, size, 6)[:, None] + 0.05 * _smooth_noise(g, n, size, size // 2)[:, None]
    rgb = rgb * (0.9 + 0.2 * shade[:, None])  # weak terrain shading
    bare = torch.tensor([0.05, 0.03, 0.0]).view(1, 3, 1, 1)  # towards bare soil
    rgb = rgb + bare * u(n, 1, 1, 1, lo=0.5, hi=1.2) * soft[:, None]  # the weak landslide cue
    for _ in range(2):  # RGB distractors: bare patches with the same tint, no DEM signature
        eu, ev = ellipse()
        patch = torch.sigmoid((1 - torch.sqrt(eu ** 2 + ev ** 2)) / 0.15) * (u(n, 1, 1) < 0.6)
        rgb = rgb + bare * u(n, 1, 1, 1, lo=0.5, hi=1.2) * patch[:, None]
    terraces = (torch.sin(2 * math.pi * 12 * across) > 0.3).float() * (along > u(n, 1, 1)).float()
    rgb = rgb + 0.04 * (u(n, 1, 1) < 0.3).float()[:, None] * terraces[:, None]
    road = (torch.abs(xx * torch.cos(theta + 1) + yy * torch.sin(theta + 1) - u(n, 1, 1, lo=0.3, hi=1.0)) < 0.012)
    rgb = rgb + 0.12 * (road & (u(n, 1, 1) < 0.4))[:, None].float()
    rgb = rgb + 0.02 * torch.randn(rgb.shape, generator=g)
    rgb = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    return Tiles(rgb, dem, mask.to(torch.uint8))


def _read_array(path, kind):
    """kind 'rgb' -> (3, H, W) uint8, 'dem' -> (1, H, W) float32, 'mask' -> (H, W) uint8 {0, 1}."""
    mode = torchvision.io.ImageReadMode
    modes = {"rgb": mode.RGB, "mask": mode.GRAY, "dem": mode.UNCHANGED}
    try:
        if path.endswith(".npy"):
            a = torch.from_numpy(np.load(path, allow_pickle=False))
            a = a.permute(2, 0, 1) if kind == "rgb" and a.ndim == 3 and a.shape[-1] == 3 else a
        else:
            a = torchvision.io.decode_png(torchvision.io.read_file(path), modes[kind])
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    a = a if kind == "rgb" or a.ndim != 3 or a.shape[0] != 1 else a[0]
    if a.ndim != (3 if kind == "rgb" else 2) or (kind == "rgb" and a.shape[0] != 3):
        want = "H x W x 3" if kind == "rgb" else "H x W"
        raise SystemExit(f"error: {path} has shape {tuple(a.shape)}; expected {want}")
    return {"rgb": a.to(torch.uint8).contiguous(), "dem": a.float()[None], "mask": (a != 0).to(torch.uint8)}[kind]


def read_split(root, split):
    """root/split/{rgb,dem,mask}/<name>.<png|npy> -> Tiles, with one-line errors naming the file at fault."""
    d = os.path.join(root, split)
    rgb_dir = os.path.join(d, "rgb")
    names = sorted(f for f in os.listdir(rgb_dir) if f.endswith((".png", ".npy"))) if os.path.isdir(rgb_dir) else []
    if not names:
        raise SystemExit(f"error: {rgb_dir} holds no .png or .npy tiles; see `python hpcl.py --help` for the layout")
    rgbs, dems, masks, size = [], [], [], None
    for f in names:
        stem, path = os.path.splitext(f)[0], os.path.join(rgb_dir, f)
        found = {}
        for kind in ("dem", "mask"):
            cands = [os.path.join(d, kind, stem + e) for e in (".npy", ".png")]
            found[kind] = next((c for c in cands if os.path.exists(c)), None)
            if found[kind] is None:
                raise SystemExit(f"error: no {kind.upper() if kind == 'dem' else kind} tile for {path}: expected "
                                 f"{cands[0]} or {cands[1]}")
        rgb, dem, mask = _read_array(path, "rgb"), _read_array(found["dem"], "dem"), _read_array(found["mask"], "mask")
        for kind, other in (("dem", dem), ("mask", mask)):
            if other.shape[-2:] != rgb.shape[-2:]:
                raise SystemExit(f"error: {kind} {found[kind]} is {other.shape[-2]}x{other.shape[-1]} but its image "
                                 f"{path} is {rgb.shape[-2]}x{rgb.shape[-1]}; give them the same size")
        size = size or rgb.shape[-2:]
        if rgb.shape[-2:] != size or size[0] % 32 or size[1] % 32:
            raise SystemExit(f"error: {path} is {rgb.shape[-2]}x{rgb.shape[-1]}; every tile must have the same size, "
                             f"a multiple of 32 (the first is {size[0]}x{size[1]})")
        rgbs.append(rgb), dems.append(dem), masks.append(mask)
    return Tiles(torch.stack(rgbs), torch.stack(dems), torch.stack(masks))


def load_data(args):
    """(train, test) Tiles: SynthLoess, or the folders under --data."""
    if args.data == "synthetic":
        return (synth_loess(args.train_tiles, args.tile_size, seed=0),
                synth_loess(args.test_tiles, args.tile_size, seed=1))
    root = os.path.expanduser(args.data)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {args.data} is not a folder; pass 'synthetic' or a folder with train/ and "
                         "test/ (or val/) tiles")
    test = "test" if os.path.isdir(os.path.join(root, "test")) else "val"
    return read_split(root, "train")[:args.train_tiles or None], read_split(root, test)


class TrainTiles(torch.utils.data.Dataset):
    """(index, sample_seed) -> (rgb, dem, mask, priority): one joint flip and 90-degree rotation, brightness jitter of
    the RGB only (never the DEM, Sec. 6), a random priority per hyper-pixel for anchor sampling; all drawn from the
    sample seed, so resume is exact and two processes see the one-process global batch."""

    def __init__(self, tiles, n_cells, brightness=0.1):
        self.tiles, self.n_cells, self.brightness = tiles, n_cells, brightness

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, key):
        i, sample_seed = key
        t = self.tiles
        g = torch.Generator().manual_seed(sample_seed)
        k, flip = int(torch.randint(4, (), generator=g)), bool(torch.rand((), generator=g) < 0.5)
        gain = 1 + self.brightness * (2 * torch.rand((), generator=g) - 1)
        priority = torch.rand(self.n_cells, generator=g)
        out = []
        for x in (t.rgb[i], t.dem[i], t.mask[i]):
            x = torch.rot90(x, k, (-2, -1))
            out.append((x.flip(-1) if flip else x).contiguous())
        out[0] = (out[0].float() * gain).clamp(0, 255).round().to(torch.uint8)
        return (*out, priority)


# --- Model ---
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Encoder(nn.Module):
    """ResNet-style encoder (Sec. 3): a 7x7 stride-2 stem and max-pool, 4 stages of basic blocks at strides
    4/8/16/32; returns the 4 stage features."""

    def __init__(self, cin, widths, depths):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0])
        self.stages, c = nn.ModuleList(), widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            self.stages.append(nn.Sequential(*[BasicBlock(c if j == 0 else w, w, 2 if i and j == 0 else 1)
                                               for j in range(d)]))
            c = w

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """Sec. 3 [inferred]: RGB and DEM (half width) encoders fused at strides 8/16/32 (concat, 1x1 conv, BN, ReLU), an
    FPN decoder to stride 4, a 2-class head upsampled to full size, and phi (1x1 conv, ReLU, 1x1 conv, L2-normalise).
    (rgb, dem: (B, 3, H, W)) -> (logits (B, 2, H, W), embeddings (B, E, H/4, W/4))."""

    def __init__(self, fusion="late", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), dec_dim=256, emb_dim=128):
        super().__init__()
        self.fusion = fusion
        self.rgb = Encoder(4 if fusion == "early" else 3, widths, depths)
        if fusion == "late":
            half = [max(1, w // 2) for w in widths]
            self.dem = Encoder(3, half, depths)
            self.fuse = nn.ModuleList([conv_bn_relu(w + h, w, 1) for w, h in zip(widths[1:], half[1:])])
        self.lateral = nn.ModuleList([nn.Conv2d(w, dec_dim, 1) for w in widths])
        self.smooth = conv_bn_relu(dec_dim, dec_dim, 3)
        self.head = nn.Conv2d(dec_dim, 2, 1)
        self.phi = nn.Sequential(nn.Conv2d(dec_dim, dec_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dec_dim, emb_dim, 1))

    def forward(self, rgb, dem):
        feats = self.rgb(torch.cat([rgb, dem[:, :1]], 1) if self.fusion == "early" else rgb)
        if self.fusion == "late":
            dem_feats = self.dem(dem)
            feats = [feats[0]] + [f(torch.cat([a, b], 1)) for f, a, b in zip(self.fuse, feats[1:], dem_feats[1:])]
        x = self.lateral[3](feats[3])
        for i in (2, 1, 0):  # top-down: upsample and add the lateral of the finer stage
            x = self.lateral[i](feats[i]) + F.interpolate(x, size=feats[i].shape[-2:], mode="nearest")
        x = self.smooth(x)  # (B, dec, H/4, W/4): the fused decoder feature
        logits = F.interpolate(self.head(x), scale_factor=STRIDE, mode="bilinear", align_corners=False)
        return logits, F.normalize(self.phi(x), dim=1)


@torch.no_grad()
def momentum_update_(teacher, model, momentum):
    """Sec. 4: the momentum encoder is an EMA of every parameter of the network; BatchNorm buffers are copied,
    not averaged [inferred]."""
    common.ema_update_(teacher, model, momentum)
    for bt, b in zip(teacher.buffers(), model.buffers()):
        bt.copy_(b)


def dem_derivatives(dem, gsd=1.0, scale=10.0):
    """(B, 1, H, W) elevation in metres -> (B, 3, H, W): elevation minus the tile mean over `scale` metres, slope
    atan|grad z| / (pi/2) in [0, 1), and hillshade (sun from the upper left at 45 degrees) in [0, 1]; central
    finite differences with replicate padding (Sec. 3) [inferred]."""
    dem = dem.float()
    p = F.pad(dem, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / (2 * gsd)
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / (2 * gsd)
    slope = torch.atan(torch.sqrt(gx ** 2 + gy ** 2))
    light = torch.tensor([-1.0, -1.0, math.sqrt(2.0)], device=dem.device) / 2  # towards the upper-left sun, 45 deg
    shade = ((-gx * light[0] - gy * light[1] + light[2]) / torch.sqrt(gx ** 2 + gy ** 2 + 1)).clamp(0, 1)
    elev = (dem - dem.mean((-2, -1), keepdim=True)) / scale
    return torch.cat([elev, slope / (math.pi / 2), shade], 1)


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def model_inputs(rgb, dem, args, device):
    """uint8 RGB and metre DEM batches -> the network's float inputs, normalised on the device."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    rgb = rgb.to(device, non_blocking=True).float()
    rgb = ((rgb - MEAN.to(device)) / STD.to(device)).contiguous(memory_format=fmt)
    dem = dem_derivatives(dem.to(device, non_blocking=True), args.gsd, args.dem_scale)
    return rgb, dem.contiguous(memory_format=fmt)


# --- Method ---
def hyperpixel_grid(h, w, cell, device=None):
    """Regular hyper-pixels (Sec. 4): (h, w) long segment ids of cell x cell blocks, numbered row-major."""
    ys, xs = torch.arange(h, device=device) // cell, torch.arange(w, device=device) // cell
    return ys[:, None] * math.ceil(w / cell) + xs[None, :]


def hyperpixel_pool(feats, segments, n_segments=None):
    """Mean of feats (B, C, H, W) over each segment of segments (H, W) or (B, H, W) -> (pooled (B, K, C), counts
    (B, K)); K = n_segments or segments.max() + 1; an empty segment pools to 0."""
    b, c = feats.shape[:2]
    seg = segments.expand(b, *feats.shape[-2:]).reshape(b, -1)  # (B, HW)
    k = int(segments.max()) + 1 if n_segments is None else n_segments
    x = feats.reshape(b, c, -1).transpose(1, 2)  # (B, HW, C)
    pooled = x.new_zeros(b, k, c).scatter_add_(1, seg[..., None].expand(-1, -1, c), x)
    counts = x.new_zeros(b, k).scatter_add_(1, seg, x.new_ones(seg.shape))
    return pooled / counts.clamp(min=1)[..., None], counts


def hyperpixel_labels(mask, segments, purity=0.75, n_segments=None):
    """Sec. 4: landslide fraction f_k of the GT mask (B, H, W) in each segment (same resolution) -> labels (B, K):
    1 if f_k >= rho, 0 if f_k <= 1 - rho, -1 (ignored) for mixed or empty cells."""
    frac, counts = hyperpixel_pool(mask[:, None].float(), segments, n_segments)
    labels = torch.where(frac[..., 0] >= purity, 1, torch.where(frac[..., 0] <= 1 - purity, 0, -1))
    return torch.where(counts > 0, labels, -1)


def boundary_cells(labels_grid):
    """Sec. 4: (B, gh, gw) cell labels -> bool (B, gh, gw): a labelled cell with an 8-neighbour of the other label."""
    near = [F.max_pool2d((labels_grid == c).float()[:, None], 3, 1, 1)[:, 0] > 0 for c in (0, 1)]
    return ((labels_grid == 0) & near[1]) | ((labels_grid == 1) & near[0])


def segment_boundary(labels, segments):
    """boundary_cells for any segments (B, h, w): a segment is a boundary one when one of its positions has an
    8-neighbour position in a segment of the other label (for grid cells the same as boundary_cells)."""
    per_pos = torch.gather(labels, 1, segments.flatten(1)).view(segments.shape)  # (B, h, w) label of each position
    return hyperpixel_pool(boundary_cells(per_pos).float()[:, None], segments, labels.shape[1])[0][..., 0] > 0


def hyperpixel_kmeans(rgb, dem, cell, iters=3, spatial=1.0):
    """`--hp kmeans` [inferred]: a few k-means iterations in (y, x, RGB, elevation, slope) at stride 4, standardised
    per image, from the grid cells. rgb, dem: (B, 3, H, W) model inputs -> segments (B, H/4, W/4) long."""
    f = torch.cat([F.avg_pool2d(rgb.float(), STRIDE), F.avg_pool2d(dem[:, :2].float(), STRIDE)], 1)
    f = (f - f.mean((2, 3), keepdim=True)) / (f.std((2, 3), keepdim=True) + 1e-6)  # per image: batch-independent
    b, _, h, w = f.shape
    pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(f.device, f.dtype)
    f = torch.cat([pos[None].expand(b, -1, -1, -1) * (spatial / cell), f], 1)  # a cell is ~1 unit wide
    seg = hyperpixel_grid(h, w, cell, f.device).expand(b, h, w)
    k = math.ceil(h / cell) * math.ceil(w / cell)
    for _ in range(iters):
        centres, counts = hyperpixel_pool(f, seg, k)  # (B, K, C)
        d = torch.cdist(f.flatten(2).transpose(1, 2), centres).masked_fill(counts[:, None] == 0, float("inf"))
        seg = d.argmin(2).view(b, h, w)
    return seg


def sample_anchors(labels, boundary, priority, n, boundary_frac=0.5):
    """Sec. 4: per image and class c up to n cells labelled c, round(n * frac) of them from boundary cells when
    available, the rest from the other cells of c, by descending random priority; no class, no anchors.
    labels (B, K) in {0, 1, -1}, boundary (B, K) bool, priority (B, K) in [0, 1) -> (index (B, 2n), label (B, 2n)):
    label -1 marks an empty slot. Fixed shapes, no host sync."""
    n = min(n, labels.shape[1])
    nb = round(n * boundary_frac)
    idx, lab = [], []
    for c in (0, 1):
        is_c = labels == c
        v1, i1 = torch.where(is_c & boundary, priority, -1.0).topk(nb, dim=1)  # boundary cells first
        taken = torch.zeros_like(is_c).scatter(1, i1, v1 >= 0)
        v2, i2 = torch.where(is_c & ~taken, priority, -1.0).topk(n, dim=1)  # then any other cell of class c
        i, ok = torch.cat([i1, i2], 1), torch.cat([v1, v2], 1) >= 0
        order = torch.sort((~ok).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # available slots first
        idx.append(i.gather(1, order))
        lab.append(torch.where(ok.gather(1, order), c, -1))
    return torch.cat(idx, 1), torch.cat(lab, 1)


class ClassQueue:
    """Sec. 4: a FIFO queue of momentum hyper-pixel keys per class, with per-class pointers; the same on every process
    (the global batch's keys are enqueued). Row `size` is a sink for skipped entries: enqueueing needs no host sync."""

    def __init__(self, dim, size, n_classes=2, device=None):
        self.size, self.n_classes = size, n_classes
        self.feats = torch.zeros(n_classes, size + 1, dim, device=device)
        self.ptr = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.filled = torch.zeros(n_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, feats, labels):
        """feats (N, D) keys, labels (N,) in {0..n_classes-1} or -1 (skipped); at most `size` per class per call."""
        feats = feats.detach().float()
        for c in range(self.n_classes):
            is_c = labels == c
            slot = torch.where(is_c, (self.ptr[c] + is_c.cumsum(0) - 1) % self.size, self.size)
            self.feats[c].index_copy_(0, slot, feats)
            added = is_c.sum()
            self.ptr[c] = (self.ptr[c] + added) % self.size
            self.filled[c] = torch.clamp(self.filled[c] + added, max=self.size)

    def get(self):
        """All slots: (feats (n_classes * size, D), labels (n_classes * size,)), label -1 for slots not yet filled."""
        slot = torch.arange(self.size, device=self.feats.device)
        labels = torch.where(slot[None] < self.filled[:, None], torch.arange(self.n_classes,
                             device=slot.device)[:, None], -1)
        return self.feats[:, :-1].reshape(-1, self.feats.shape[-1]), labels.flatten()

    def sample(self, n, generator):
        """n random slots of each queue without replacement (the same on every process: a shared generator) ->
        (feats (n_classes * n, D), labels), label -1 for slots not yet filled."""
        feats, labels = self.get()
        idx = torch.cat([torch.randperm(self.size, generator=generator)[:n] + c * self.size
                         for c in range(self.n_classes)]).to(feats.device)
        return feats[idx], labels[idx]

    def state_dict(self):
        return {"feats": self.feats.cpu(), "ptr": self.ptr.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state):
        if state["feats"].shape != self.feats.shape:
            raise ValueError(f"queue of shape {tuple(state['feats'].shape)}, expected {tuple(self.feats.shape)}")
        for k in ("feats", "ptr", "filled"):
            getattr(self, k).copy_(state[k])


def hpcl_terms(anchors, anchor_labels, bank, bank_labels, tau=0.1, form="per_positive", max_pos=None,
               max_neg=None):
    """Per-anchor L_hpcl (Sec. 5) -> (loss (A,), valid (A,)): an anchor counts when it is labelled and the bank holds
    one of its positives. Positives: bank entries of the anchor's label (the first max_pos of them in bank order),
    negatives: of the other label (the first max_neg); label -1 entries are ignored. fp32, autocast off.
      per_positive: mean over k+ of -log(e^{q.k+/tau} / (e^{q.k+/tau} + sum_{k-} e^{q.k-/tau}))
      supcon:       mean over k+ of -log(e^{q.k+/tau} / (sum_{k+'} e^{q.k+'/tau} + sum_{k-} e^{q.k-/tau}))"""
    with torch.autocast(anchors.device.type, enabled=False):
        q, k = F.normalize(anchors.float(), dim=1), F.normalize(bank.float(), dim=1)
        logits = q @ k.T / tau  # (A, M)
        onehot = F.one_hot(bank_labels.clamp(min=0), 2).bool() & (bank_labels >= 0)[:, None]  # (M, 2)
        rank = onehot.long().cumsum(0) - 1  # position of each entry among the entries of its label
        pos_ok = (rank < (max_pos or len(bank))) & onehot
        neg_ok = (rank < (max_neg or len(bank))) & onehot
        y = anchor_labels.clamp(min=0)
        pos = pos_ok.T[y] & (anchor_labels >= 0)[:, None]  # (A, M)
        neg = neg_ok.T[1 - y] & (anchor_labels >= 0)[:, None]
        neg_lse = logits.masked_fill(~neg, float("-inf")).logsumexp(1, keepdim=True)  # (A, 1)
        if form == "supcon":
            denom = logits.masked_fill(~(pos | neg), float("-inf")).logsumexp(1, keepdim=True)
            per = denom - logits
        else:  # softplus(lse_neg - l+) = -log(e^l+ / (e^l+ + sum e^l-)); an anchor without negatives scores 0
            per = F.softplus(neg_lse - logits)
        n_pos = pos.sum(1)
        loss = torch.where(pos, per, 0.0).sum(1) / n_pos.clamp(min=1)
        return loss, n_pos > 0


def hpcl_loss(anchors, anchor_labels, bank, bank_labels, tau=0.1, form="per_positive", max_pos=None, max_neg=None):
    """L_hpcl (Sec. 5): the mean of hpcl_terms over the valid anchors (0 when there is none)."""
    loss, valid = hpcl_terms(anchors, anchor_labels, bank, bank_labels, tau, form, max_pos, max_neg)
    return loss.sum() / valid.sum().clamp(min=1)


def class_weights(tiles, mode):
    """CE weights (2,) inverse to sqrt(class frequency), mean 1, when mode is 'on' or 'auto' with < 15% landslide
    pixels [inferred], else ones. From the training set: the same on every process."""
    f = tiles.mask.float().mean().clamp(1e-4, 1 - 1e-4)
    if mode == "off" or (mode == "auto" and f >= 0.15):
        return torch.ones(2)
    w = torch.stack([1 - f, f]).rsqrt()
    return w / w.mean()


# --- Evaluation ---
def confusion_matrix(pred, gt, n_classes=2):
    """(n, n) counts, rows = ground truth, columns = prediction."""
    return torch.bincount(gt.flatten().long() * n_classes + pred.flatten().long(),
                          minlength=n_classes ** 2).view(n_classes, n_classes)


def metrics_from_confusion(cm):
    """Sec. 8: IoU_c = TP/(TP+FP+FN), mIoU over the 2 classes, landslide precision, recall and F1."""
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    iou = tp / (tp + fp + fn).clamp(min=1)
    prec, rec = tp[1] / (tp[1] + fp[1]).clamp(min=1), tp[1] / (tp[1] + fn[1]).clamp(min=1)
    f1 = 2 * tp[1] / (2 * tp[1] + fp[1] + fn[1]).clamp(min=1)
    return {"miou": iou.mean().item(), "iou_landslide": iou[1].item(), "f1_landslide": f1.item(),
            "precision": prec.item(), "recall": rec.item(), "iou_bg": iou[0].item()}


def seg_metrics(pred, gt, n_classes=2):
    """Metrics of one confusion matrix accumulated over all pixels of pred (N,) against gt (N,)."""
    return metrics_from_confusion(confusion_matrix(pred, gt, n_classes))


def boundary_band(mask, width=4):
    """Pixels within `width` px of a GT edge (Sec. 8): dilation minus erosion of the mask (B, H, W)."""
    m = mask.float()[:, None]
    dil = F.max_pool2d(m, 2 * width + 1, 1, width)
    ero = -F.max_pool2d(-m, 2 * width + 1, 1, width)
    return (dil - ero)[:, 0] > 0


@torch.no_grad()
def predict(model, tiles, args, device, amp, batch_size=32):
    """Argmax predictions (N, H, W) of the tiles, model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    preds = [tiles.mask[:0].to(device, torch.long)]
    for s in range(0, len(tiles), batch_size):
        rgb, dem = model_inputs(tiles.rgb[s:s + batch_size], tiles.dem[s:s + batch_size], args, device)
        with common.autocast(device, amp):
            logits = model(rgb, dem)[0]
            preds.append((logits[:, 1] > logits[:, 0]).long())  # argmax of 2 classes
    model.train(was_training)
    return torch.cat(preds)


def evaluate(model, tiles, args, device, amp):
    """Sec. 8: one 2x2 confusion matrix over every pixel of the test set -> mIoU, landslide IoU and F1, precision,
    recall, background IoU, and landslide IoU in the 4-px band around GT edges. A collective: each process predicts
    its shard of the tiles and the confusion matrices are summed over processes."""
    per, rank = math.ceil(len(tiles) / common.get_world_size()), common.get_rank()
    own = tiles[rank * per:(rank + 1) * per]  # this process's shard: tiles [rank * ceil(N / world), ...)
    pred, gt = predict(model, own, args, device, amp), own.mask.to(device)
    band = boundary_band(gt)
    cm = common.all_reduce_sum(torch.stack([confusion_matrix(pred, gt), confusion_matrix(pred[band], gt[band])]))
    return {**metrics_from_confusion(cm[0]), "iou_landslide_boundary": metrics_from_confusion(cm[1])["iou_landslide"]}


def save_predictions_png(model, tiles, path, args, device, amp, n=8):
    """Rows: RGB tile, DEM hillshade, ground truth, prediction (white = landslide), for the first n test tiles."""
    t = tiles[:n]
    pred = predict(model, t, args, device, amp).cpu().float()
    rows = [t.rgb.float() / 255, *(x.float().expand(-1, 3, -1, -1) for x in (dem_derivatives(t.dem)[:, 2:],
                                                                           t.mask[:, None], pred[:, None]))]
    torchvision.utils.save_image(torch.cat(rows), path, nrow=len(t), padding=2, pad_value=0.5)


# --- Train ---
def train_step(train_model, model, teacher, queue, optimizer, scaler, batch, args, ce_weight, hpcl_on, generator,
               device, amp):
    """One step of Sec. 5: L = CE [+ Dice] + lambda L_hpcl (lambda = 0 during the warm-up), backward, optimizer
    step, EMA of the momentum encoder, then the momentum keys of this step's anchors (all processes) are enqueued:
    the loss uses the queue of the previous steps. Returns detached (loss, ce, hpcl). No host sync."""
    rgb_u8, dem_m, mask, priority = batch
    rgb, dem = model_inputs(rgb_u8, dem_m, args, device)
    mask, priority = mask.to(device, non_blocking=True).long(), priority.to(device, non_blocking=True)
    with common.autocast(device, amp):
        logits, emb = train_model(rgb, dem)
        with torch.no_grad():
            emb_k = teacher(rgb, dem)[1]
    b, _, h, w = emb.shape
    segments = (hyperpixel_kmeans(rgb, dem, args.cell) if args.hp == "kmeans" else
                hyperpixel_grid(h, w, args.cell, device).expand(b, h, w))
    k = math.ceil(h / args.cell) * math.ceil(w / args.cell)
    full = segments.repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2)  # the segments at the mask's size
    labels = hyperpixel_labels(mask, full, args.purity, k)  # (B, K)
    boundary = segment_boundary(labels, segments)  # for grid cells: boundary_cells of the cell grid
    idx, anchor_labels = sample_anchors(labels, boundary, priority, args.anchors, args.boundary_frac)
    with torch.autocast(device.type, enabled=False):
        def pooled(e):  # hyper-pixel embeddings of the anchors: averaged and re-normalised (Sec. 4)
            p = F.normalize(hyperpixel_pool(e.float(), segments, k)[0], dim=2)
            return p.gather(1, idx[..., None].expand(-1, -1, p.shape[2])).flatten(0, 1)  # (B * 2n, E)
        q, keys = pooled(emb), pooled(emb_k.detach())
        bank, bank_labels = queue.sample(max(args.pos_sample, args.neg_sample), generator)
        per_anchor, valid = hpcl_terms(q, anchor_labels.flatten(), bank, bank_labels, args.tau, args.hpcl_form,
                                       args.pos_sample, args.neg_sample)
        ce = F.cross_entropy(logits.float(), mask, weight=ce_weight, reduction="none")  # (B, H, W), w_y * CE
        counts = torch.stack([ce_weight[mask].sum(), valid.sum().float()])
        counts = common.all_reduce_sum(counts.detach().clone())  # over all processes: one collective
        world = common.get_world_size()
        loss_ce = ce.sum() * world / counts[0].clamp(min=1)
        loss_hpcl = (per_anchor * valid).sum() * world / counts[1].clamp(min=1)
        loss = loss_ce + (args.hpcl_weight if hpcl_on else 0.0) * loss_hpcl
        if args.dice:  # a global soft Dice: every process computes the same value from gathered sums
            prob = logits.float().softmax(1)[:, 1]
            s = common.all_gather_with_grad(torch.stack([(prob * mask).sum(), prob.sum(), mask.sum().float()])[None])
            s = s.sum(0)  # (3,) global intersection, prediction and GT sums
            loss = loss + 1 - (2 * s[0] + 1) / (s[1] + s[2] + 1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    momentum_update_(teacher, model, args.momentum)
    queue.enqueue(common.concat_all_gather(keys), common.concat_all_gather(anchor_labels.flatten()))
    return loss.detach(), loss_ce.detach(), loss_hpcl.detach()


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more OpenMP threads only add overhead (and stall on busy machines)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    train_tiles, test_tiles = load_data(args)
    size = train_tiles.rgb.shape[-1]
    n_cells = math.ceil(train_tiles.rgb.shape[-2] / STRIDE / args.cell) * math.ceil(size / STRIDE / args.cell)
    sampler = common.ResumableSampler(len(train_tiles), args.batch_size, seed=args.seed)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = SegNet(args.fusion, args.widths, args.depths, args.dec_dim, args.emb_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    teacher = common.momentum_copy(model)  # Sec. 4: the momentum encoder, an exact copy at the start
    queue = ClassQueue(args.emb_dim, args.queue, device=device)
    common.seed_everything(args.seed + rank)
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim > 1]},  # no decay: BN, biases
                                   {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    state = common.load_checkpoint(ckpt_path, "hpcl", resume=not args.eval_only)  # after the models: RNG restored
    step, init_metrics = 0, {}
    if state is not None:
        common.restore(state, ckpt_path, model=model)
        if not args.eval_only:
            common.restore(state, ckpt_path, teacher=teacher, queue=queue, optimizer=optimizer, scaler=scaler)
        step, init_metrics = state["step"], state["metrics_init"]
        common.print0(f"loaded {ckpt_path} (step {step})")
    elif args.tiny:  # the random-initialisation baseline, printed beside the trained numbers (a collective)
        init_metrics = evaluate(model, test_tiles, args, device, amp)
    ce_weight = class_weights(train_tiles, args.class_weighted).to(device)

    loader = torch.utils.data.DataLoader(TrainTiles(train_tiles, n_cells), batch_size=args.batch_size,
                                         sampler=sampler, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    spe = sampler.steps_per_epoch
    total = args.epochs * spe if args.max_steps is None else min(args.max_steps, args.epochs * spe)
    total = step if args.eval_only else total
    train_model = common.distribute(model, device, args.compile)  # DDP, then torch.compile
    common.print0(f"hpcl | fusion {args.fusion} | lambda {args.hpcl_weight:g} | global batch {args.batch_size * world}"
                  f" = {args.batch_size} x {world} | {len(train_tiles)} train / {len(test_tiles)} test tiles of "
                  f"{size} px | landslide pixels {train_tiles.mask.float().mean().item():.1%} | CE weights "
                  f"{[round(w, 3) for w in ce_weight.tolist()]} | {spe} steps/epoch, {total} steps")

    def save():  # a collective: every rank calls it; refuses to overwrite with non-finite parameters
        common.save_checkpoint(ckpt_path, "hpcl", step, {
            "args": vars(args), "model": model.state_dict(), "teacher": teacher.state_dict(),
            "queue": queue.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": step // spe, "metrics_init": init_metrics}, finite=[model])

    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="hpcl")
    t0, seen = time.time(), 0
    model.train()  # the one place; the teacher also trains, for its BatchNorm statistics (Sec. 4)
    teacher.train()
    while step < total:
        epoch = step // spe
        sampler.set_epoch(epoch, step - epoch * spe)
        for batch in loader:
            lr = args.lr * (1 - step / (args.epochs * spe)) ** args.poly  # Sec. 6: poly decay per iteration
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator().manual_seed(args.seed * 1000003 + step)  # the bank sample of this step
            loss, ce, hp = train_step(train_model, model, teacher, queue, optimizer, scaler, batch, args, ce_weight,
                                      epoch >= args.hpcl_warmup_epochs, generator, device, amp)
            step, seen = step + 1, seen + args.batch_size * world
            bar.update()
            if step % args.log_every == 0 or step == total or step % spe == 0:  # the only host sync
                loss_v, ce_v, hp_v = (common.all_reduce_sum(torch.stack([loss, ce, hp])) / world).tolist()
                if not math.isfinite(loss_v):
                    raise SystemExit(f"error: loss is {loss_v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": loss_v, "ce": ce_v,
                                                   "hpcl": hp_v, "lr": lr, "queue_filled": queue.filled.tolist(),
                                                   "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{loss_v:.3f}", hpcl=f"{hp_v:.3f}")
                t0, seen = time.time(), 0
            if step == total:
                break
        save()  # at every epoch end and when --max-steps stops the run
    bar.close()

    metrics = evaluate(model, test_tiles, args, device, amp)  # every process: its shard
    metrics.update({f"{k}_init": v for k, v in init_metrics.items()})
    if rank == 0:
        common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
        common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
        save_predictions_png(model, test_tiles[:math.ceil(len(test_tiles) / world)],  # from its own shard
                             os.path.join(args.output_dir, "predictions.png"), args, device, amp)
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_init")), flush=True)
        if init_metrics:
            print("untrained: " + "  ".join(f"{k} {v:.4f}" for k, v in init_metrics.items()), flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
