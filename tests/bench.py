"""Input-pipeline benchmark, run by hand (not collected by pytest): python tests/bench.py [--images N] [--rounds R]

For each method file, the images per second of one worker running the file's training transform against an
official-style pipeline written here from the official code's transforms, side by side in one run (interleaved per
image, so that machine load hits both alike), on 500x375 JPEGs that the benchmark writes. Each pipeline starts from
the JPEG file (decode included) and ends with what leaves the worker; the bytes per sample are printed beside.
"""
import argparse
import os
import random
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import ImageFilter
from torchvision.datasets.folder import pil_loader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import albef  # noqa: E402
import dcl  # noqa: E402
import swav  # noqa: E402


class PILBlur:  # the official SwAV / MoCo v2 blur: PIL GaussianBlur with radius U(0.1, 2), p 0.5
    def __call__(self, img):
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


def ours():
    a = albef.get_args(["--no-pretrained"])
    return {"swav": swav.multicrop_transform(), "dcl": (lambda t: lambda img: (t(img), t(img)))(dcl.simclr_transform(224)),
            "albef": albef.PairSet([], None, a).transform}


def nbytes(out):
    return sum(x.numel() * x.element_size() for x in (out if isinstance(out, (list, tuple)) else [out]))


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
        mine, official = ours(), {"swav": official_swav(), "dcl": official_simclr(), "albef": official_albef()}
        print(f"{'file':6} {'ours ms':>8} {'official ms':>11} {'speed-up':>8} {'ours bytes':>10} {'official bytes':>14}")
        for name in mine:
            t, size = {"ours": 0.0, "official": 0.0}, {}
            for _ in range(args.rounds):
                for path in paths:
                    for who, fn in (("ours", mine[name]), ("official", official[name])):
                        t0 = time.perf_counter()
                        out = fn(pil_loader(path))
                        t[who] += time.perf_counter() - t0
                        size[who] = nbytes(out)
            n = args.rounds * len(paths)
            print(f"{name:6} {1e3 * t['ours'] / n:8.1f} {1e3 * t['official'] / n:11.1f} "
                  f"{t['official'] / t['ours']:7.2f}x {size['ours']:10d} {size['official']:14d}", flush=True)


if __name__ == "__main__":
    main()
