"""Input-pipeline benchmark, run by hand (not collected by pytest): python tests/bench.py [--images N] [--rounds R]

For each method file, the images per second of one worker running the file's training transform against an
official-style pipeline written here from the official code's transforms, side by side in one run (interleaved per
image, so that machine load hits both alike), on 500x375 JPEGs that the benchmark writes. Each pipeline starts from
the JPEG file (decode included; msd.py decodes straight to grey) and ends with what leaves the worker; the bytes
per sample are printed beside.
swav.py and dcl.py leave the colour distortion (jitter, grayscale, blur) and the normalisation to the device, batched
(colour_augment, with the draws the worker made): that part is timed separately, on this CPU with one thread, per
image of a batch of N images, and not counted in the worker's time.
"""
import argparse
import itertools
import os
import random
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from torch.utils.data import default_collate
from torchvision.datasets.folder import pil_loader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import albef  # noqa: E402
import dcl  # noqa: E402
import msd  # noqa: E402
import swav  # noqa: E402


class PILBlur:  # the official SwAV / MoCo v2 blur: PIL GaussianBlur with radius U(0.1, 2), p 0.5
    def __call__(self, img):
        from PIL import ImageFilter  # what the official code runs; Pillow ships with torchvision
        return img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))) if random.random() < 0.5 else img


def official_swav():  # src/multicropdataset.py: 2 x 224 (0.14-1) + 6 x 96 (0.05-0.14)
    norm = [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.228, 0.224, 0.225])]
    colour = [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2), PILBlur()]
    ts = [T.Compose([T.RandomResizedCrop(s, scale=sc), T.RandomHorizontalFlip(), *colour, *norm])
          for s, sc, n in ((224, (0.14, 1.0), 2), (96, (0.05, 0.14), 6)) for _ in range(n)]
    return lambda img: [t(img) for t in ts]


def official_simclr():  # SimCLR's recipe at 224 in torchvision/PIL (crop, flip, jitter 0.8, grey, blur), two views
    t = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)],
                   p=0.8), T.RandomGrayscale(p=0.2), PILBlur(), T.ToTensor(),
                   T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return lambda img: (t(img), t(img))


def official_albef():  # dataset/__init__.py: pretraining transform at 256 with RandomAugment(2, 7)
    return T.Compose([T.RandomResizedCrop(256, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), albef.RandomAugment(2, 7), T.ToTensor(),
                      T.Normalize(albef.MEAN, albef.STD)])


def official_msd():  # msd.py's recipe [inferred: no public code] as the ALBEF-style loaders MSD builds on write it:
    # an RGB PIL image, resize, affine and colour jitter in PIL, a float tensor normalised in the worker
    return T.Compose([T.Resize((224, 224)), T.RandomAffine(5, translate=(0.04, 0.04), scale=(0.95, 1.05)),
                      T.ColorJitter(brightness=0.2, contrast=0.2), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def from_file(transform):  # most pipelines start from torchvision's PIL loader
    return lambda path: transform(pil_loader(path))


def ours():
    a, seeds = albef.get_args(["--no-pretrained"]), itertools.count()  # msd: the sampler's per-sample seeds
    return {"swav": from_file(swav.multicrop_transform()), "dcl": from_file(dcl.SimCLRViews(224)),
            "albef": from_file(albef.PairSet([], None, a).transform),
            "msd": lambda path: T.functional.pil_to_tensor(msd.augment(msd.load_grey(path, 224), next(seeds)))}


def swav_device(batch):  # what train_step runs on the device: one colour_augment (+ normalise) per resolution
    cpu, groups = torch.device("cpu"), {}
    for crop, params in batch:
        groups.setdefault(crop.shape[-1], []).append((crop, params))
    return [swav.to_input(torch.cat([c for c, _ in g]), cpu, torch.cat([p for _, p in g])) for g in groups.values()]


def dcl_device(batch):  # what train_step runs on the device: both views in one colour_augment (+ normalise)
    x, params = (torch.cat(t) for t in zip(*batch))
    return dcl.to_device(x, torch.device("cpu"), params)


def nbytes(out):
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(nbytes(x) for x in out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)  # one data worker = one core
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(args.images):  # smooth random content at JPEG quality 90: realistic decode and crop costs
            x = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 32, generator=g), size=(375, 500), mode="bicubic")
            paths.append(f"{d}/{i}.jpg")
            T.functional.to_pil_image(x[0].clamp(0, 1)).save(paths[-1], quality=90)
        mine, official = ours(), {name: from_file(fn()) for name, fn in (
            ("swav", official_swav), ("dcl", official_simclr), ("albef", official_albef), ("msd", official_msd))}
        device = {"swav": swav_device, "dcl": dcl_device}
        print(f"{'file':6} {'ours ms':>8} {'official ms':>11} {'speed-up':>8} {'ours bytes':>10} {'official bytes':>14}"
              f" {'device ms (CPU)':>15} {'official / (ours + device)':>26}")
        for name in mine:
            t, size = {"ours": 0.0, "official": 0.0, "device": 0.0}, {}
            for _ in range(args.rounds):
                outs = []
                for path in paths:
                    for who, fn in (("ours", mine[name]), ("official", official[name])):
                        t0 = time.perf_counter()
                        out = fn(path)
                        t[who] += time.perf_counter() - t0
                        size[who] = nbytes(out)
                        outs += [out] if who == "ours" else []
                if name in device:  # this round's outputs of our worker as one collated batch, on this CPU
                    batch = default_collate(outs)
                    t0 = time.perf_counter()
                    device[name](batch)
                    t["device"] += time.perf_counter() - t0
            n = args.rounds * len(paths)
            dev = f"{1e3 * t['device'] / n:15.1f} {t['official'] / (t['ours'] + t['device']):25.2f}x" \
                if name in device else f"{'(normalise only)':>15} {'':>26}"
            print(f"{name:6} {1e3 * t['ours'] / n:8.1f} {1e3 * t['official'] / n:11.1f} "
                  f"{t['official'] / t['ours']:7.2f}x {size['ours']:10d} {size['official']:14d} {dev}", flush=True)
    print("speed-up: images per second of one data worker, ours against official (the colour part no longer runs "
          "there).\ndevice ms (CPU): our colour part + normalisation, batched, on one CPU thread per image; on a GPU "
          "it runs on\nthe batch and costs little. On a CPU-only run it adds to the main process: the last column "
          "counts it.")


if __name__ == "__main__":
    main()
