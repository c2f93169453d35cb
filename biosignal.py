"""Large-scale Training of Foundation Models for Wearable Biosignals.
Salar Abbaspourazad, Oussama Elachqar, Andrew C. Miller, Saba Emrani, Udhyakumar Nallasamy, Ian Shapiro (Apple).
ICLR 2024. arXiv 2312.05409.

Self-supervised encoders for Apple Watch PPG (4 channels) and single-lead ECG. A positive pair is two different
segments of the same participant, each augmented independently by a stochastic cascade (cut-out, magnitude warp,
time warp, Gaussian noise, channel permutation); a 1D EfficientNet student and its EMA (momentum) teacher embed them,
and a regularised InfoNCE contrasts student against teacher in both directions, with the participant's own
segments removed from the within-view negatives, plus a KoLeo term that spreads the embeddings. Frozen embeddings,
averaged per participant, are probed linearly for demographics and health conditions. `--pairs segment` is the
SimCLR-style ablation (two augmentations of one segment). There is no official code for the paper; the mechanics
follow Apple's official follow-up apple/ml-ppg-age-analysis, whose README says its SSL training is adapted from it.

Implemented here: encoder `EfficientNet1d`, `MBConv1d`, head `Embedder`; participant pairs `participant_pairs`,
`PairSampler`; augmentations `stochastic_cascade` (five; not-a-knot splines in `cubic_spline`); the loss `nt_xent_pid`
(InfoNCE with momentum keys, both directions, same-participant within-view negatives masked), `koleo_loss`,
`regularized_loss` = InfoNCE + gamma KoLeo; the EMA update at the start of each step (common.ema_update_);
`evaluate`: `participant_mean`, ridge with leave-one-out alpha (`ridge_fit`, `ridge_loo_alpha`) for continuous and
L2 logistic regression (`logistic_fit`) with `roc_auc` for binary attributes, re-identification and RankMe.
[inferred]: the synthetic cohort, the --tiny preset, the probe details (split, alpha grid, logistic C), the batch
composition (B distinct participants), KoLeo and negatives over the global batch under DDP, ECG augmentation
probabilities and rate [secondary], the cosine momentum schedule variant.

Data: `--data DIR` holds signals.npy (float, N x C x T; or signals.npz with an array `signals`), segments.csv (a
header with a `pid` column, then one row per segment in the order of signals) and participants.csv (header
`pid,split,<attribute>...`, split `train` or `test`, numbers, empty = missing; attributes holding only 0/1 are
probed as binary). Pretraining and probe fitting use the train participants, probe scores the test participants.

--batch-size is per process (participants per step). The paper-scale batch is 256 pairs:
  python biosignal.py --tiny                                                   # CPU smoke run, under a minute
  python biosignal.py --tiny --pairs segment                                   # the segment-positive ablation
  python biosignal.py --data /data/ahms_ppg                                    # one GPU: 256 x 1
  python biosignal.py --data /data/ahms_ecg --modality ecg                     # single-lead ECG
  torchrun --nproc_per_node=8 biosignal.py --data /data/ahms_ppg --batch-size 32           # 32 x 8 = 256
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
      biosignal.py --data /data/ahms_ppg --batch-size 16                                 # 16 x 16 = 256
"""
import argparse
import csv
import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# --- Arguments ---
PAPER_GLOBAL_BATCH = 256  # the follow-up's config: "batch 256 for similar results to" the paper
AUG_PROBS = {"ppg": (0.4, 0.25, 0.15, 0.25, 0.25),  # official follow-up config
             "ecg": (0.8, 0.5, 0.3, 0.5, 0.0)}  # [secondary, unverified]; one lead: no channel permutation
# --tiny [inferred]: D = 36 (f = 1), head 36 -> 128 -> 32, 5-s segments (320 samples at 64 Hz), 240 participants
# (160 train) x 16 segments, batch 16, 160 steps, lr 3e-3, m 0.98, a wider ridge grid (the spec's D = 72: 3x slower).
TINY = dict(epochs=16, batch_size=16, lr=3e-3, workers=0, log_every=20, width=36, proj="128,32", momentum=0.98,
            ridge_alphas="1e-2,0.1,1,10,100,1000")


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(description="Wearable biosignal foundation model (arXiv 2312.05409)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder (signals.npy, segments.csv...)")
    p.add_argument("--output-dir", default="runs/biosignal")
    p.add_argument("--epochs", type=int, default=100, help="passes over the train participants [inferred]")
    p.add_argument("--batch-size", type=int, default=256, help="participants (pairs) per process; the paper-scale "
                   "global batch is 256: the default on one GPU, 32 on 8 GPUs")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr (official follow-up)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam's coupled L2 (torch Adam, not AdamW)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the student (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --output-dir")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps; 0: the untrained model")
    p.add_argument("--tiny", action="store_true", help="small encoder, schedule and cohort: a CPU smoke run [inferred]")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--modality", choices=["ppg", "ecg"], default="ppg", help="4-channel PPG or single-lead ECG")
    m.add_argument("--pairs", choices=["participant", "segment"], default="participant", help="positives: two "
                   "segments of one participant (the paper) or two augmentations of one segment (ablation)")
    m.add_argument("--width", type=int, default=256, help="D, the embedding size; channels scale with f = D/36")
    m.add_argument("--proj", default="1024,128", help="hidden,output sizes of the projection head (no BatchNorm)")
    m.add_argument("--dropout", type=float, default=0.1, help="dropout in the projection head")
    m.add_argument("--tau", type=float, default=0.04, help="temperature tau of the InfoNCE")
    m.add_argument("--koleo", type=float, default=0.1, help="gamma, weight of the KoLeo regulariser")
    m.add_argument("--momentum", type=float, default=0.99, help="m: theta_t <- m theta_t + (1 - m) theta_s")
    m.add_argument("--momentum-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant m (official) or BYOL's cosine increase from m to 1 [inferred variant]")
    m.add_argument("--step-every", type=int, default=125000, help="StepLR period (official: 125 x 1000 steps)")
    m.add_argument("--step-gamma", type=float, default=0.5, help="StepLR factor (official)")
    m.add_argument("--aug-probs", default=None, help="probabilities of cut_out, magnitude_warp, time_warp, noise, "
                   "channel_permute; default PPG 0.4,0.25,0.15,0.25,0.25 (official), ECG 0.8,0.5,0.3,0.5,0 [secondary]")
    m.add_argument("--ecg-fs", type=int, default=128, help="ECG rate of the synthetic cohort [secondary: 512 -> 128]")
    m.add_argument("--probe-features", choices=["encoder", "head"], default="encoder", help="probe the D-dim "
                   "frozen encoder output, or the student's projection-head output (what the follow-up exports)")
    m.add_argument("--min-segments", type=int, default=1, help="fewer segments: not probed [inferred; follow-up: 30]")
    m.add_argument("--ridge-alphas", default="1e-10,1e-4,1e-3,1e-2,0.1,1", help="ridge alphas, LOO-chosen (RidgeCV's)")
    m.add_argument("--logreg-c", type=float, default=1.0, help="inverse L2 C of the logistic probes [inferred]")
    args = p.parse_args(argv)
    if args.tiny:  # a flag given on the command line wins over the preset
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for k, v in TINY.items():
            if not given & set(p._option_string_actions[f"--{k.replace('_', '-')}"].option_strings):
                setattr(args, k, v)
    return args


def parse_floats(text, flag):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} '{text}' is not a comma-separated list of numbers") from None


def check_args(args, world):
    """Every check that depends on the flags and the world size alone (no file system): one-line errors."""
    if args.tau <= 0 or args.koleo < 0 or not 0 <= args.momentum <= 1:
        raise SystemExit("error: --tau must be positive, --koleo >= 0 and --momentum in [0, 1]")
    if args.batch_size < 1 or args.batch_size * world < 2:
        raise SystemExit("error: the loss needs at least 2 participants in the global batch; raise --batch-size")
    if args.max_steps is not None and args.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    proj = parse_floats(args.proj, "--proj")
    if len(proj) != 2 or min(proj) < 1 or args.width < 36:
        raise SystemExit("error: --proj takes two sizes (hidden,output) and --width must be at least 36")
    probs = parse_floats(args.aug_probs, "--aug-probs") if args.aug_probs else AUG_PROBS[args.modality]
    if len(probs) != 5 or not all(0 <= q <= 1 for q in probs):
        raise SystemExit("error: --aug-probs takes five probabilities in [0, 1]")
    if min(parse_floats(args.ridge_alphas, "--ridge-alphas")) <= 0 or args.logreg_c <= 0:
        raise SystemExit("error: --ridge-alphas and --logreg-c must be positive")
    global_batch = args.batch_size * world
    if global_batch != PAPER_GLOBAL_BATCH and not args.tiny:
        common.print0(f"note: global batch {global_batch} = {args.batch_size} x {world}; the paper-scale batch is "
                      f"{PAPER_GLOBAL_BATCH} (--batch-size {max(1, PAPER_GLOBAL_BATCH // world)} with {world} "
                      "processes)")
    return args


# --- Data ---
class Cohort:
    """signals (N, C, T) (an array or a memory map), seg_pid (N,), and per participant: pid (P,), train (P,) bool,
    attrs {name: (P,) float, NaN = missing}."""

    def __init__(self, signals, seg_pid, pid, train, attrs):
        self.signals, self.seg_pid, self.pid, self.train, self.attrs = (
            signals, np.asarray(seg_pid), np.asarray(pid), np.asarray(train, bool), attrs)
        self.seg_train = np.isin(self.seg_pid, self.pid[self.train])  # (N,) segment of a train participant


def _beats(rng, seconds, hr, hrv):
    """Beat times (s) covering [-2 RR, seconds + 2 RR]: RR intervals around 60/hr with std hrv."""
    rr_mean = 60.0 / hr
    rr = np.clip(rr_mean + rng.normal(0, hrv, int(seconds / rr_mean) + 6), 0.3, 2.0)
    return np.cumsum(rr) - 2.5 * rr_mean - rng.uniform(0, rr_mean)


def _render(beats, t, waves):
    """Each time's sum over the beat before it and that beat's two neighbours of the beat shape sum_k amp_k
    N(t - beat; mu_k, sd_k) (unnormalised Gaussians). t (C, T) -> (C, T)."""
    k = np.searchsorted(beats, t) - 1
    x = [t - beats[np.clip(k + o, 0, len(beats) - 1)] for o in (-1, 0, 1)]
    return sum(amp * np.exp(-(d - mu) ** 2 / (2 * sd ** 2)) for d in x for amp, mu, sd in waves)


def synthetic_cohort(n_participants, n_segments, seconds, modality, seed=0, ecg_fs=128):
    """[inferred] A cohort whose hidden attributes (age, sex, BMI, hypertension) act only on stable morphology, while
    each segment draws nuisance: its heart-rate state, RR jitter, baseline wander, gain, motion bursts, noise.
    PPG (64 Hz, 4 channels): systolic + reflected Gaussian per beat; with age the reflection comes earlier and larger
    (augmentation index, + hypertension) and wider (shallower notch); BMI and sex widen the systolic wave; HRV falls
    with age; a late wave of random size and delay is each participant's own signature (no attribute). ECG (--ecg-fs,
    1 lead): P, Q, R, S, T Gaussians; age and sex act on PR, QRS, QTc and T amplitude. Participants are split 2:1
    into train and test. Returns a Cohort of float32 signals."""
    rng = np.random.default_rng(seed)
    P, fs, C = n_participants, (64 if modality == "ppg" else ecg_fs), (4 if modality == "ppg" else 1)
    age, sex, bmi = rng.uniform(20, 80, P), rng.integers(0, 2, P).astype(float), rng.normal(26, 4, P)  # sex 1 = F
    htn = (rng.random(P) < 1 / (1 + np.exp(-(0.08 * (age - 55) + 0.15 * (bmi - 27) - 1)))).astype(float)
    hr, a = rng.normal(65, 8, P), age - 20
    hrv = 0.06 * (1 - 0.008 * a)  # RR std (s)
    T = int(seconds * fs)
    t = np.arange(T) / fs
    signals = np.empty((P * n_segments, C, T), np.float32)
    for p in range(P):
        if modality == "ppg":  # (amplitude, delay after the beat, width) of each wave, in s
            delay, ratio = 0.30 * (1 - 0.006 * a[p]), 0.35 + 0.006 * a[p] + 0.1 * htn[p]
            w_sys = max(0.03, 0.06 + 0.003 * (bmi[p] - 26) + 0.015 * sex[p])
            own = rng.uniform(0.05, 0.25), rng.uniform(0.38, 0.5)  # an individual late wave: no attribute
            waves = [(1.0, 0.12, w_sys), (ratio, 0.12 + delay, 0.05 + 0.0008 * a[p]), (own[0], 0.12 + own[1], 0.04)]
        else:
            pr, qrs = 0.15 + 0.0008 * a[p] + 0.01 * htn[p], 0.08 + 0.012 * (1 - sex[p])
            qtc, t_amp = 0.39 + 0.02 * sex[p] + 0.0006 * a[p], 0.35 - 0.003 * a[p]
            r_amp = 1.0 + 0.3 * htn[p] - 0.02 * (bmi[p] - 26)
            waves = [(0.12, -pr, 0.025), (-0.15, -qrs / 3, qrs / 8), (r_amp, 0.0, qrs / 8), (-0.25, qrs / 3, qrs / 8)]
        for s in range(n_segments):
            hr_seg = np.clip(hr[p] + rng.normal(0, 6), 40, 140)
            beats = _beats(rng, seconds, hr_seg, hrv[p])
            tc = t[None] - rng.uniform(0, 0.03, (C, 1))  # small per-channel delays
            seg_waves = waves if modality == "ppg" else waves + [(t_amp, qtc * np.sqrt(60 / hr_seg) - 0.1, 0.05)]
            x = _render(beats, tc, seg_waves) * rng.uniform(0.5, 1.5, (C, 1))  # T wave: QT by Bazett
            x += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 2 * np.pi))
            if rng.random() < 0.2:  # motion artefact: a burst of noise on every channel
                n = int(rng.uniform(1, 3) * fs)
                start = rng.integers(0, max(1, T - n))
                x[:, start:start + n] += rng.normal(0, 0.5, (C, min(n, T - start)))
            signals[p * n_segments + s] = x + rng.normal(0, 0.05, (C, T))
    train = np.arange(P) % 3 != 2
    return Cohort(signals, np.repeat(np.arange(P), n_segments), np.arange(P), train,
                  {"age": age, "bmi": bmi, "sex": sex, "hypertension": htn})


def _read_csv(path):
    """(header, [(line number, fields)]) with one-line errors for a missing file or a row of the wrong width."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; --data needs signals.npy, segments.csv, participants.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise SystemExit(f"error: {path} is empty; it needs a header line")
    header = [h.strip() for h in rows[0]]
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise SystemExit(f"error: {path}:{line}: {len(row)} fields, the header has {len(header)}")
        out.append((line, [v.strip() for v in row]))
    return header, out


def load_cohort(args):
    """The built-in synthetic cohort, or --data DIR in the layout of the docstring."""
    if args.data == "synthetic":
        size = (240, 16, 5) if args.tiny else (600, 40, 60 if args.modality == "ppg" else 30)
        return synthetic_cohort(*size, args.modality, seed=0, ecg_fs=args.ecg_fs)
    root = os.path.expanduser(args.data)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {args.data} is not a folder; pass 'synthetic' or a folder with signals.npy, "
                         "segments.csv and participants.csv")
    npy, npz = os.path.join(root, "signals.npy"), os.path.join(root, "signals.npz")
    try:
        signals = np.load(npy, mmap_mode="r") if os.path.exists(npy) else np.load(npz)["signals"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot read the signals in {root} ({type(e).__name__}: {e}); write signals.npy or "
                         "signals.npz with an array 'signals' of shape (N, C, T)") from None
    if signals.ndim != 3:
        raise SystemExit(f"error: the signals in {root} have shape {signals.shape}; expected (N, C, T)")
    ppath = os.path.join(root, "participants.csv")
    header, rows = _read_csv(ppath)
    if header[:2] != ["pid", "split"]:
        raise SystemExit(f"error: {ppath}:1: the header must start with pid,split (found {','.join(header[:2])})")
    seen, pid, train, values = {}, [], [], []
    for line, row in rows:
        if row[1] not in ("train", "test"):
            raise SystemExit(f"error: {ppath}:{line}: split '{row[1]}' is not train or test")
        if row[0] in seen:
            first, split = seen[row[0]]
            what = f"in two splits ({split} at line {first}, {row[1]} here)" if split != row[1] else "listed twice"
            raise SystemExit(f"error: {ppath}:{line}: participant {row[0]} is {what}; give each participant one row")
        seen[row[0]] = (line, row[1])
        try:
            values.append([float(v) if v else float("nan") for v in row[2:]])
        except ValueError:
            raise SystemExit(f"error: {ppath}:{line}: a value in {','.join(row[2:])} is not a number") from None
        pid.append(row[0])
        train.append(row[1] == "train")
    index = {p: i for i, p in enumerate(pid)}
    spath = os.path.join(root, "segments.csv")
    sheader, srows = _read_csv(spath)
    if "pid" not in sheader:
        raise SystemExit(f"error: {spath}:1: no 'pid' column")
    col, seg_pid = sheader.index("pid"), []
    for line, row in srows:
        if row[col] not in index:
            raise SystemExit(f"error: {spath}:{line}: participant {row[col]} is not in {ppath}")
        seg_pid.append(index[row[col]])
    if len(seg_pid) != len(signals):
        raise SystemExit(f"error: {spath} has {len(seg_pid)} segments, the signals {len(signals)}; one row each")
    values = np.array(values, dtype=np.float64).reshape(len(pid), len(header) - 2)
    return Cohort(signals, seg_pid, np.arange(len(pid)), train,
                  {h: values[:, i] for i, h in enumerate(header[2:])})


def zscore(x):
    """Per channel per segment, population std (official: before augmentation). (..., T) -> float32."""
    x = np.asarray(x, np.float32)
    return (x - x.mean(-1, keepdims=True)) / np.maximum(x.std(-1, keepdims=True), 1e-8)


def participant_pairs(ids, rng, batch_size=None):
    """For every participant with >= 2 segments, two different random segments, participants in random order (each
    at most once). ids (N,) -> (idx_a, idx_b), each (B,), B = #participants or batch_size."""
    ids = np.asarray(ids)
    order = rng.permutation(len(ids))
    order = order[np.argsort(ids[order], kind="stable")]  # grouped by id, random within a group
    first = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])  # start of every group
    size = np.diff(np.r_[first, len(ids)])
    first = first[size >= 2][rng.permutation(int((size >= 2).sum()))]
    a, b = order[first], order[first + 1]
    return (a, b) if batch_size is None else (a[:batch_size], b[:batch_size])


class PairSampler(torch.utils.data.Sampler):
    """Each epoch: `participant_pairs` over the train segments (seeded by seed and epoch), cut into global batches of
    distinct participants, each split into contiguous per-rank slices (so two processes see the one-process batch);
    with segment positives both views come from the first segment. Yields (idx_a, idx_b, sample_seed); `set_epoch
    (epoch, start_step)` resumes mid-epoch. The tail that does not fill a global batch is dropped."""

    def __init__(self, seg_ids, batch_size, seed, segment_pairs=False):
        self.ids, self.seg = np.flatnonzero(seg_ids >= 0), segment_pairs
        self.pid = seg_ids[self.ids]
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = common.get_rank(), common.get_world_size()
        self.steps_per_epoch = len(np.unique(self.pid)) // (batch_size * self.world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"error: {len(np.unique(self.pid))} training participants do not fill one global batch "
                             f"of {batch_size} x {self.world}; lower --batch-size")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        a, b = participant_pairs(self.pid, np.random.default_rng([self.seed, self.epoch]))
        a, b = self.ids[a], self.ids[a if self.seg else b]
        gb = self.batch_size * self.world
        for step in range(self.start_step, self.steps_per_epoch):
            for i in range(step * gb + self.rank * self.batch_size, step * gb + (self.rank + 1) * self.batch_size):
                yield int(a[i]), int(b[i]), (self.seed * 1000003 + self.epoch) * 1000003 + i


class PairViews(torch.utils.data.Dataset):
    """(idx_a, idx_b, sample_seed) -> two independently augmented z-scored views (C, T) and the participant id.
    The augmentations are seeded by sample_seed only: exact resume and the same views on any number of processes."""

    def __init__(self, cohort, probs):
        self.cohort, self.probs = cohort, probs

    def __len__(self):
        return len(self.cohort.seg_pid)

    def __getitem__(self, key):
        a, b, seed = key
        rng = np.random.default_rng(seed)
        v1, v2 = (stochastic_cascade(zscore(self.cohort.signals[i]).T, self.probs, rng).T for i in (a, b))
        return torch.from_numpy(np.ascontiguousarray(v1)), torch.from_numpy(np.ascontiguousarray(v2)), \
            int(self.cohort.seg_pid[a])


# --- Model ---
def _bn(c):
    return nn.BatchNorm1d(c, eps=1e-3, momentum=0.1)


class MBConv1d(nn.Module):
    """1x1 expand (not for expansion 1) -> BN -> swish -> depthwise conv -> BN -> swish -> squeeze-excite (ratio 0.25
    of the expanded width) -> 1x1 project -> BN; residual when the shape is kept; no drop-connect."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential() if expand == 1 else nn.Sequential(nn.Conv1d(cin, mid, 1, bias=False), _bn(mid),
                                                                        nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv1d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False),
                                       _bn(mid), nn.SiLU())
        squeeze = max(1, int(0.25 * mid))
        self.se = nn.Sequential(nn.Conv1d(mid, squeeze, 1), nn.SiLU(), nn.Conv1d(squeeze, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv1d(mid, cout, 1, bias=False), _bn(cout))
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        h = self.project(h * self.se(h.mean(-1, keepdim=True)))
        return x + h if self.residual else h


class EfficientNet1d(nn.Module):
    """The follow-up's models/efficientnet.py: f = D/36; stem conv k3 s2 to int(6f); 16 MBConv blocks in 7 stages
    (channels/f, repeats, kernel, first stride), expansion 7 except the first block; 1x1 conv to D = 36f, BN, swish,
    global average pooling -> (B, D). Total stride 64. D = 256 gives ~3.15M parameters."""
    STAGES = ((4, 1, 3, 1), (5, 2, 3, 2), (7, 2, 5, 2), (9, 3, 3, 2), (11, 3, 5, 2), (14, 4, 5, 2), (18, 1, 5, 1))

    def __init__(self, in_channels, width=256):
        super().__init__()
        f = width / 36
        c = int(6 * f)
        layers = [nn.Conv1d(in_channels, c, 3, 2, 1, bias=False), _bn(c), nn.SiLU()]
        for i, (ch, repeats, k, stride) in enumerate(self.STAGES):
            for r in range(repeats):
                layers.append(MBConv1d(c, int(ch * f), k, stride if r == 0 else 1, 1 if i == 0 else 7))
                c = int(ch * f)
        layers += [nn.Conv1d(c, width, 1, bias=False), _bn(width), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.dim = width

    def forward(self, x):  # (B, C, T) -> (B, D)
        return self.net(x).mean(-1)


class Embedder(nn.Module):
    """Encoder + projection head (Linear D -> 1024, ReLU, Dropout 0.1, Linear -> 128; no BatchNorm, not normalised:
    the loss normalises). forward(v1, v2) embeds the two views in two passes (BatchNorm statistics per view, as the
    official two forward passes) inside one call, so that DDP sees one forward per backward."""

    def __init__(self, in_channels, width, hidden, out, dropout):
        super().__init__()
        self.backbone = EfficientNet1d(in_channels, width)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(hidden, out))

    def forward(self, v1, v2):
        return self.head(self.backbone(v1)), self.head(self.backbone(v2))


# --- Method ---
def cubic_spline(xk, yk, x):
    """Not-a-knot cubic spline through (xk[n], yk[n] or yk[n, k]) evaluated at x[T] (scipy's CubicSpline default,
    which the official augmentations use; n >= 4). Returns (T,) or (T, k)."""
    xk, yk, x = np.asarray(xk, float), np.asarray(yk, float), np.asarray(x, float)
    n, h = len(xk), np.diff(xk)
    d = np.diff(yk, axis=0) / (h if yk.ndim == 1 else h[:, None])
    A, r = np.zeros((n, n)), np.zeros((n,) + yk.shape[1:])
    for i in range(1, n - 1):  # continuity of the first derivative at interior knots (M = second derivatives)
        A[i, i - 1:i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        r[i] = 6 * (d[i] - d[i - 1])
    A[0, :3] = h[1], -(h[0] + h[1]), h[0]  # not-a-knot: third derivative continuous at the second knot
    A[-1, -3:] = h[-1], -(h[-2] + h[-1]), h[-2]  # and at the second-to-last
    M = np.linalg.solve(A, r)
    i = np.clip(np.searchsorted(xk, x, side="right") - 1, 0, n - 2)
    dx, hi = x - xk[i], h[i]
    if yk.ndim > 1:
        dx, hi = dx[:, None], hi[:, None]
    return yk[i] + dx * (d[i] - hi * (2 * M[i] + M[i + 1]) / 6) + dx ** 2 * M[i] / 2 + dx ** 3 * (M[i + 1] - M[i]) / (
        6 * hi)


@functools.lru_cache(maxsize=8)
def _spline_basis(T, n_knots):
    """(T, n) matrix B with spline(knots, y)(0..T-1) = B @ y for knots linspace(0, T-1, n): the spline is linear
    in y, so one basis serves every draw."""
    xk = np.linspace(0, T - 1, n_knots)
    return xk, cubic_spline(xk, np.eye(n_knots), np.arange(T))


def cut_out(x, rng, lo=0.3, hi=0.5):
    """Zero one contiguous block of randint(floor(lo T), floor(hi T)) time steps, all channels. x (T, C)."""
    T = len(x)
    n = int(rng.integers(int(lo * T), int(hi * T)))
    start = int(rng.integers(0, T - n))
    x = x.copy()
    x[start:start + n] = 0
    return x


def magnitude_warp(x, rng, sigma=0.2, knots=5):
    """Multiply by one smooth curve for all channels: knots + 2 ends ~ N(1, sigma), cubic spline over time."""
    _, basis = _spline_basis(len(x), knots + 2)
    return x * (basis @ rng.normal(1.0, sigma, knots + 2))[:, None]


def time_warp(x, rng, sigma=0.1, knots=5):
    """Per channel: w = spline through (tau_k, tau_k N(1, sigma)), rescaled so w(T-1) = T-1; the warped times are the
    sample positions and the regular grid is read off: x'(t) = interp(t, clip(w), x). Endpoints are kept."""
    T = len(x)
    xk, basis = _spline_basis(T, knots + 2)
    w = basis @ (xk[:, None] * rng.normal(1.0, sigma, (knots + 2, x.shape[1])))  # (T, C)
    w = np.clip(w * (T - 1) / w[-1], 0, T - 1)
    t = np.arange(T)
    return np.stack([np.interp(t, w[:, c], x[:, c]) for c in range(x.shape[1])], 1)


def add_gaussian_noise(x, rng, lo=0.05, hi=0.10):
    """Additive N(0, sigma^2), sigma ~ U[lo, hi] (the signal is z-scored)."""
    return x + rng.normal(0.0, rng.uniform(lo, hi), x.shape)


def channel_permute(x, rng):
    """A random permutation of the (PPG) channels."""
    return x[:, rng.permutation(x.shape[1])]


AUGMENTATIONS = (cut_out, magnitude_warp, time_warp, add_gaussian_noise, channel_permute)


def stochastic_cascade(x, probs, rng):
    """The stochastic augmentation module: each augmentation in this order with its own coin flip. x (T, C)."""
    for aug, p in zip(AUGMENTATIONS, probs):
        if rng.random() < p:
            x = aug(x, rng)
    return np.asarray(x, np.float32)


def nt_xent_pid(s, t, pids, tau=0.04, gather=False):
    """Regularised InfoNCE of the follow-up's info_nce_reg.py: l1_i = -log e^{s_i t_i/tau} / (sum_j e^{s_i t_j/tau}
    + sum_{j: pid_j != pid_i} e^{s_i s_j/tau}) (a 2B-1 denominator; same-participant within-view terms and the self
    term removed, cross-view ones kept), l2 the same with s and t swapped; returns mean(l1)/2 + mean(l2)/2. s, t
    (n, D) any scale, t the teacher's keys. gather=True: anchors local, candidates the global batch (gradient flows
    back to s through the gather). fp32 with autocast off: at tau = 0.04 bf16 logits would err by ~0.1."""
    with torch.autocast(s.device.type, enabled=False):
        s, t = F.normalize(s.float(), dim=1), F.normalize(t.float(), dim=1)
        n = s.shape[0]
        gs, gt, gp = (common.all_gather_with_grad(s), common.concat_all_gather(t),
                      common.concat_all_gather(pids)) if gather else (s, t, pids)
        own = torch.arange(n, device=s.device) + (common.get_rank() * n if gather else 0)
        same = pids[:, None] == gp[None, :]  # (n, m): the participant's own segments (self included)

        def direction(a, cross_keys, within_keys):
            cross = a @ cross_keys.T / tau  # (n, m)
            within = (a @ within_keys.T / tau).masked_fill(same, float("-inf"))
            positive = cross.gather(1, own[:, None])[:, 0]
            return (torch.cat([cross, within], 1).logsumexp(1) - positive).mean()
        return 0.5 * direction(s, gt, gs) + 0.5 * direction(t, gs, gt)


def koleo_loss(z, eps=1e-8, gather=False):
    """KoLeo (DINOv2): -mean_i log(||z_i - z_j(i) + eps|| + eps), j(i) the nearest neighbour (largest dot product)
    of the L2-normalised z_i. gather=True: neighbours from the global batch. (n, D) -> scalar, fp32."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1, eps=eps)
        g = common.all_gather_with_grad(z) if gather else z
        n = z.shape[0]
        own = torch.arange(n, device=z.device) + (common.get_rank() * n if gather else 0)
        with torch.no_grad():
            dots = (z @ g.T).masked_fill(torch.arange(g.shape[0], device=z.device) == own[:, None], -1.0)
            j = dots.argmax(1)
        return -torch.log((z - g[j] + eps).norm(dim=1) + eps).mean()


def regularized_loss(s, t, pids, tau=0.04, gamma=0.1, gather=False):
    """L = L_nce + gamma (KoLeo(s) + KoLeo(t)) / 2; the teacher's term carries no gradient."""
    kol = 0.5 * (koleo_loss(s, gather=gather) + koleo_loss(t.detach(), gather=gather))
    return nt_xent_pid(s, t, pids, tau, gather) + gamma * kol


def momentum_at(step, total, m, schedule):
    """m of the EMA teacher at this step: constant (official) or BYOL's 1 - (1 - m)(cos(pi k/K) + 1)/2."""
    if schedule == "constant":
        return m
    return 1 - (1 - m) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


# --- Evaluation ---
def participant_mean(emb, ids, min_segments=1, rows=None):
    """Mean embedding of each participant with >= min_segments segments. ids (N,), emb (N, D) or, sharded, the (n, D)
    segments `rows` of this process (the sums are added over processes) -> (uid (U,), (U, D))."""
    uid, inv, count = torch.unique(ids, return_inverse=True, return_counts=True)
    total = torch.zeros(len(uid), emb.shape[1], dtype=emb.dtype, device=emb.device)
    total.index_add_(0, inv if rows is None else inv[rows], emb)
    total = total if rows is None else common.all_reduce_sum(total)
    keep = count >= min_segments
    return uid[keep], (total / count[:, None])[keep]


def ridge_fit(X, y, alpha):
    """argmin_w,b ||y - Xw - b||^2 + alpha ||w||^2 (intercept not penalised), closed form. -> (w (D,), b)."""
    X, y = X.double(), y.double()
    xm, ym = X.mean(0), y.mean()
    Xc = X - xm
    w = torch.linalg.solve(Xc.T @ Xc + alpha * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ (y - ym))
    return w, ym - xm @ w


def ridge_predict(X, w, b):
    return X.double() @ w + b


def ridge_loo_alpha(X, y, alphas):
    """The alpha with the smallest exact leave-one-out squared error (as RidgeCV): for the linear smoother
    H = Xa (Xa^T Xa + diag(alpha, ..., alpha, 0))^-1 Xa^T (Xa = [X, 1]) the LOO residual is e_i / (1 - H_ii)."""
    Xa = torch.cat([X.double(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
    y = y.double()

    def loo_error(alpha):  # H_ii = x_i A^-1 x_i^T and H y without the (U, U) matrix H
        pen = torch.full((Xa.shape[1],), float(alpha), dtype=torch.float64)
        pen[-1] = 0
        P = torch.linalg.solve(Xa.T @ Xa + torch.diag(pen), Xa.T)  # (D + 1, U)
        return (((y - Xa @ (P @ y)) / (1 - (Xa * P.T).sum(1))) ** 2).mean().item()
    return min(alphas, key=loo_error)


def logistic_fit(X, y, C=1.0, iters=100):
    """L2 logistic regression: argmin sum_i BCE(x_i w + b, y_i) + ||w||^2 / (2C) (intercept not penalised), LBFGS in
    float64. -> (w (D,), b)."""
    X, y = X.double(), y.double()
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X @ w[:-1] + w[-1], y, reduction="sum") + (w[:-1] ** 2).sum() / (
            2 * C)
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach()[:-1], w.detach()[-1]


def roc_auc(y, score):
    """ROC AUC by the Mann-Whitney rank formula (average ranks for ties), numpy only."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, float)
    _, tie, count = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(count) - (count - 1) / 2)[tie]  # average 1-based rank of each tie group
    n1, n0 = y.sum(), (~y).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def shard(n):
    """Rows [rank * ceil(n / world), ...) of n, the last repeated to equal sizes, and how many are this process's."""
    start = common.get_rank() * (per := math.ceil(n / common.get_world_size()))
    return [min(i, n - 1) for i in range(start, start + per)], max(0, min(per, n - start))


@torch.no_grad()
def embed(model, signals, rows, device, amp, head=False, batch_size=256):
    """Frozen embeddings (n, D) of the z-scored, unaugmented segments `rows` (only they are read), in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        with common.autocast(device, amp):
            h = model.backbone(torch.from_numpy(zscore(signals[list(rows[i:i + batch_size])])).to(device))
            out.append((model.head(h) if head else h).float())
    model.train(was)
    return torch.cat(out)


def evaluate(model, cohort, args, device, amp):
    """The paper's protocol on frozen embeddings averaged per participant: per attribute a linear probe fitted on
    the train participants, scored on the test participants (MAE and Pearson r for continuous attributes, ridge
    with LOO alpha; ROC AUC for binary ones, logistic regression), on standardised features. Plus re-identification
    top-1 (another segment of the same test participant is the nearest test segment) and RankMe of the test
    embeddings. A flat dict. Each process embeds its shard of the segments, participant sums and re-identification
    rows are summed; every process fits the same probes on the same (U, D) means: no rank-0-only branch."""
    idx, own = shard(len(cohort.signals))
    emb = embed(model, cohort.signals, idx, device, amp, head=args.probe_features == "head")[:own].double()
    ids = torch.from_numpy(cohort.seg_pid.astype(np.int64))
    uid, mean = (x.cpu() for x in participant_mean(emb, ids.to(device), args.min_segments, rows=idx[:own]))
    train = torch.from_numpy(cohort.train[uid.numpy()])
    mu, sd = mean[train].mean(0), mean[train].std(0) + 1e-8
    feats = (mean - mu) / sd
    alphas = parse_floats(args.ridge_alphas, "--ridge-alphas")
    metrics = {}
    for name, values in cohort.attrs.items():
        y = torch.from_numpy(values[uid.numpy()])
        ok = ~torch.isnan(y)
        tr, te = ok & train, ok & ~train
        if tr.sum() < 3 or te.sum() < 2:
            continue
        if set(np.unique(values[~np.isnan(values)])) <= {0.0, 1.0}:
            w, b = logistic_fit(feats[tr], y[tr], args.logreg_c)
            metrics[f"{name}_auc"] = roc_auc(y[te].numpy(), (feats[te] @ w + b).numpy())
        else:
            w, b = ridge_fit(feats[tr], y[tr], ridge_loo_alpha(feats[tr], y[tr], alphas))
            pred = ridge_predict(feats[te], w, b)
            metrics[f"{name}_mae"] = (pred - y[te]).abs().mean().item()
            metrics[f"{name}_r"] = torch.corrcoef(torch.stack([pred, y[te]]))[0, 1].item()
    test = np.flatnonzero(~cohort.seg_train)
    test = np.sort(np.random.default_rng(0).permutation(test)[:4096])  # re-identification among <= 4096 segments
    mine = torch.from_numpy((test >= idx[0]) & (test < idx[0] + own))  # this process's rows; the others stay 0
    emb = torch.zeros(len(test), emb.shape[1], dtype=emb.dtype, device=emb.device).index_copy_(
        0, mine.nonzero()[:, 0].to(emb.device), emb[torch.from_numpy(test)[mine] - idx[0]])
    emb, test = common.all_reduce_sum(emb).cpu(), torch.from_numpy(test)
    z = F.normalize(emb.float(), dim=1)
    sim = (z @ z.T).fill_diagonal_(-2.0)
    metrics["reid_top1"] = (ids[test][sim.argmax(1)] == ids[test]).float().mean().item()
    sv = torch.linalg.svdvals(emb)
    p = sv / sv.sum() + 1e-12
    metrics["rankme"] = torch.exp(-(p * p.log()).sum()).item()  # effective rank (Garrido et al. 2023)
    return metrics


# --- Train ---
def train_step(student, teacher, optimizer, scaler, v1, v2, pids, args, device, amp, m):
    """One step as the follow-up's run_train_step: EMA update first, then student(v1), student(v2) and teacher(v1),
    teacher(v2) (two passes each), the regularised loss in both directions, L = (L(s1, t2) + L(s2, t1)) / 2, over the
    global batch in fp32, backward (DDP averages), Adam. Returns the detached (loss, positive cosine), no host sync."""
    common.ema_update_(teacher, common.unwrap(student), m)
    v1, v2, pids = (x.to(device, non_blocking=True) for x in (v1, v2, pids))
    with common.autocast(device, amp):
        s1, s2 = student(v1, v2)
        with torch.no_grad():
            t1, t2 = teacher(v1, v2)
    loss = 0.5 * (regularized_loss(s1, t2, pids, args.tau, args.koleo, gather=True)
                  + regularized_loss(s2, t1, pids, args.tau, args.koleo, gather=True))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    cos = F.cosine_similarity(s1.detach().float(), t2.float()).mean()  # alignment of the positives
    return torch.stack([loss.detach(), cos])


def build(args, in_channels, device):
    hidden, out = (int(v) for v in parse_floats(args.proj, "--proj"))
    return Embedder(in_channels, args.width, hidden, out, args.dropout).to(device)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    amp = args.amp or common.default_amp(device)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    cohort = load_cohort(args)
    probs = parse_floats(args.aug_probs, "--aug-probs") if args.aug_probs else AUG_PROBS[args.modality]
    sampler = PairSampler(np.where(cohort.seg_train, cohort.seg_pid, -1), args.batch_size, args.seed,
                          segment_pairs=args.pairs == "segment")
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = build(args, cohort.signals.shape[1], device)
    if device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    teacher = common.momentum_copy(model)  # the follow-up's ssl_wrapper: a deepcopy of the student
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    common.seed_everything(args.seed + rank)
    state = common.load_checkpoint(ckpt_path, "biosignal", resume=not args.eval_only)  # after the models
    step, metrics_init = 0, {}
    if state is not None:
        common.restore(state, ckpt_path, model=model, teacher=teacher)
        if not args.eval_only:
            common.restore(state, ckpt_path, optimizer=optimizer, scaler=scaler)
        step, metrics_init = state["step"], state["metrics_init"]
        common.print0(f"loaded {ckpt_path} (step {step})")
    elif args.tiny:  # the random-initialisation baseline, printed beside the trained numbers (a collective)
        metrics_init = evaluate(model, cohort, args, device, amp)

    loader = torch.utils.data.DataLoader(PairViews(cohort, probs), batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    spe = sampler.steps_per_epoch
    total = args.epochs * spe if args.max_steps is None else min(args.max_steps, args.epochs * spe)
    total = step if args.eval_only else total
    student = common.distribute(model, device, args.compile)  # DDP, then torch.compile
    global_batch = args.batch_size * world
    common.print0(f"biosignal {args.modality} | {args.pairs} positives | D {args.width} | global batch {global_batch} "
                  f"= {args.batch_size} x {world} | {cohort.train.sum()} train / {(~cohort.train).sum()} test "
                  f"participants, {len(cohort.seg_pid)} segments of {tuple(cohort.signals.shape[1:])} | "
                  f"{spe} steps/epoch, {total} steps")

    def save():  # a collective: every rank calls it; refuses to overwrite with non-finite parameters
        common.save_checkpoint(ckpt_path, "biosignal", step, {
            "args": vars(args), "model": model.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": step // spe,
            "metrics_init": metrics_init}, finite=[model])

    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="biosignal")
    t0, seen = time.time(), 0
    # the one place: the official wrapper's model.train() puts the teacher in train mode too (batch-statistics BN,
    # head dropout on); evaluation restores the mode it found
    model.train()
    teacher.train()
    while step < total:
        epoch = step // spe
        sampler.set_epoch(epoch, step - epoch * spe)
        for v1, v2, pids in loader:
            lr = args.lr * args.step_gamma ** (step // args.step_every)  # StepLR
            for group in optimizer.param_groups:
                group["lr"] = lr
            m = momentum_at(step, args.epochs * spe, args.momentum, args.momentum_schedule)  # not --max-steps
            stats = train_step(student, teacher, optimizer, scaler, v1, v2, pids, args, device, amp, m)
            step, seen = step + 1, seen + global_batch
            bar.update()
            if step % args.log_every == 0 or step == total or step % spe == 0:  # also before every save
                loss_v, cos_v = (common.all_reduce_sum(stats) / world).tolist()  # the only host sync
                if not math.isfinite(loss_v):
                    raise SystemExit(f"error: loss is {loss_v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": loss_v, "pos_cos": cos_v,
                                                   "lr": lr, "momentum": m,
                                                   "samples_per_s": seen / (time.time() - t0)})
                bar.set_postfix(loss=f"{loss_v:.4f}")
                t0, seen = time.time(), 0
            if step == total:
                break
        save()  # at every epoch end and when --max-steps stops the run
    bar.close()

    metrics = evaluate(model, cohort, args, device, amp)  # sharded: every rank takes part
    metrics.update({f"{k}_init": v for k, v in metrics_init.items()})
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"eval": metrics, "step": step})
    if rank == 0:
        print(f"linear probes on frozen {args.probe_features} embeddings, participant means, test participants "
              f"({args.pairs} positives, step {step}):", flush=True)
        for k, v in metrics.items():
            if not k.endswith("_init"):
                init = f"random init {metrics_init[k]:8.3f} -> " if k in metrics_init else ""
                print(f"  {k:18s} {init}trained {v:8.3f}", flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
