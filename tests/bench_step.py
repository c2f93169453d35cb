"""Training-step benchmark, run by hand (not collected by pytest): python tests/bench_step.py [--steps N] [swav msd ...]

Per method file at its --tiny configuration (warm-up steps, then N timed steps), the training step split into data
(the loader's next batch and its copy to the device), backward, optimizer, momentum (EMA) update, queue (read and
update) and forward (the rest: online and momentum forward passes, loss). Each file's own dataset, model, loss,
optimizer, queue and train step run as its train loop runs them; the parts are timed by wrapping Tensor.backward,
optimizer.step, common.ema_update_ and the queue's methods. On CUDA each part is synchronised; peak memory printed.
"""
import argparse
import collections
import contextlib
import functools
import itertools
import math
import os
import sys
import tempfile
import time
import traceback
from unittest import mock

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

PARTS = ("data", "forward", "backward", "optimizer", "momentum", "queue")


class Timer:
    """Milliseconds per part; a part called inside another part counts for the outer one."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ms, self.depth = collections.Counter(), 0

    @contextlib.contextmanager
    def part(self, name):
        outer, self.depth = self.depth == 0, self.depth + 1
        if outer:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            if outer:
                self.sync()
                self.ms[name] += 1e3 * (time.perf_counter() - t0)

    def wrap(self, stack, obj, attr, name):
        fn = getattr(obj, attr)  # AttributeError here: the file renamed what this benchmark times

        def timed(*a, **k):
            with self.part(name):
                return fn(*a, **k)
        stack.enter_context(mock.patch.object(obj, attr, timed))


def adamw(model, a, device, decay):  # the files' two AdamW groups: no weight decay where decay(name, p) is False
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decay(n, p)]},
              {"params": [p for n, p in named if not decay(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay, fused=device.type == "cuda")


def to(device, x):  # tensors, also in nested lists and tuples, to the device as the train loops copy them
    return x.to(device, non_blocking=True) if torch.is_tensor(x) else type(x)(to(device, y) for y in x)


def loader(ds, batch, a, device, **kw):
    return DataLoader(ds, batch_size=batch, sampler=common.ResumableSampler(len(ds), batch, seed=a.seed),
                      num_workers=a.workers, drop_last=True, pin_memory=device.type == "cuda", **kw)


def cnn(device):  # the CNN files' memory format: channels_last on CUDA
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


# Each setup returns (loader, prepare(batch) -> step input, step(input), optimizer, samples per step, parts timed).
# amp is bf16 or none, so the files' GradScaler (fp16 only) is a no-op and is left out where the step takes none.
def setup_swav(m, device, amp, t, stack, compile_):
    a = m.get_args(["--tiny"])
    train_set = m.load_datasets(a)[0]
    model = m.SwAV(a.arch, a.hidden_mlp, a.feat_dim, a.nmb_prototypes).to(device, memory_format=cnn(device))
    tf = m.multicrop_transform(a.size_crops, a.nmb_crops, a.min_scale_crops, a.max_scale_crops)
    opt = m.LARS(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, trust_coefficient=a.lars_trust)
    queue = m.SwAVQueue(len(a.crops_for_assign), a.queue_length, a.feat_dim, device)
    queue.n_pushed = a.queue_length  # full: its scores join Sinkhorn, as from --epoch-queue-starts on
    net = common.distribute(model, device, compile_)
    model.train()
    for attr in ("push", "scores"):
        t.wrap(stack, m.SwAVQueue, attr, "queue")

    def step(crops):
        loss, _ = m.train_step(net, model, crops, queue, a, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.freeze_prototype_grads_(model, a.freeze_prototypes_niters, a.freeze_prototypes_niters)  # after freezing
        opt.step()
    return (loader(m.Seeded(train_set, tf), a.batch_size, a, device),
            lambda b: to(device, b[0]), step, opt, a.batch_size, ("queue",))


def setup_dcl(m, device, amp, t, stack, compile_):
    a = m.get_args(["--tiny"])
    train_set, _, _, native = m.load_datasets(a)
    size = a.image_size or native
    model = m.SimCLR(a.arch, size, a.proj_dim).to(device, memory_format=cnn(device))
    opt = m.LARS([{"params": [p for p in model.parameters() if p.ndim > 1]},
                  {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0, "eta": None}],
                 lr=a.lr * math.sqrt(a.batch_size), momentum=a.momentum, weight_decay=a.weight_decay, eta=a.lars_eta)
    scaler, loss_fn = torch.amp.GradScaler(device.type, enabled=False), m.loss_function(a)
    net = common.distribute(model, device, compile_)
    model.train()
    return (loader(m.Seeded(train_set, m.SimCLRViews(size)), a.batch_size, a, device),
            lambda b: to(device, b[0]),  # train_step's own copy is then a no-op; its colour ops count as forward
            lambda views: m.train_step(net, opt, scaler, views, loss_fn, device, amp), opt, a.batch_size, ())


def setup_albef(m, device, amp, t, stack, compile_):
    a = m.get_args(["--tiny", "--output-dir", stack.enter_context(tempfile.TemporaryDirectory())])
    train = m.load_data(a)[0]
    tok = m.make_tokenizer(a, [c for _, caps, _ in train for c in caps])
    model = m.ALBEF(m.build_encoders(a, len(tok)), a.temp).to(device)
    model_m, queue = common.momentum_copy(model.enc), m.Queue(a.embed_dim, a.queue_size, a.seed).to(device)
    opt = adamw(model, a, device, lambda n, p: p.ndim != 1 and not n.endswith(".bias"))
    net = common.distribute(model, device, compile_)
    model.train()
    model_m.train()
    t.wrap(stack, m.Queue, "push", "queue")

    def step(batch):
        common.ema_update_(model_m, model.enc, a.momentum)
        with common.autocast(device, amp):
            l_itc, l_itm, l_mlm, keys = net(*batch, alpha=a.alpha, model_m=model_m, queue=queue, mode=a.mode)
        opt.zero_grad(set_to_none=True)
        (l_itc + l_itm + l_mlm).backward()
        opt.step()
        queue.push(*keys)
    collate = functools.partial(m.collate, pad_id=tok.pad_token_id)
    return (loader(m.PairSet(train, tok, a), a.batch_size, a, device, collate_fn=collate),
            functools.partial(to, device), step, opt, a.batch_size, ("momentum", "queue"))


def setup_msd(m, device, amp, t, stack, compile_):
    a = m.get_args(["--tiny"])
    train_ds, _, _, prompts = m.build_data(a)
    tok = m.WordTokenizer.build(train_ds.texts + sum(prompts.values(), []))
    model = m.build_model(a, len(tok)).to(device, memory_format=torch.channels_last)
    teacher, queue = common.momentum_copy(model), m.FeatureQueue(a.embed_dim, a.queue_size).to(device)
    queue.filled = a.queue_size  # full, as after the first windows
    opt = adamw(model, a, device, lambda n, p: p.ndim >= 2)
    student, A = common.distribute(model, device, compile_), a.accum_steps
    model.train()
    teacher.train()
    for attr in ("enqueue_", "keys"):
        t.wrap(stack, m.FeatureQueue, attr, "queue")
    ctx = functools.partial(common.autocast, device, amp)
    return (loader(train_ds, A * a.batch_size, a, device, collate_fn=m.Collate(tok, a.max_len)),
            lambda b: list(zip(*(x.to(device, non_blocking=True).chunk(A) for x in b[:3]))),
            lambda micro: m.msd_accum_step(student, teacher, micro, opt, queue, a.alpha, a.momentum, a.accum_mode,
                                           a.intra_modal_distill, None, ctx),
            opt, A * a.batch_size, ("momentum", "queue"))


def bench(name, args, device):
    """ms per step of each part, samples/s and peak memory of one method file."""
    amp, t = common.default_amp(device), Timer(device)
    with contextlib.ExitStack() as stack:
        common.seed_everything(0)
        batches, prepare, step, opt, samples, expected = globals()[f"setup_{name}"](
            __import__(name), device, amp, t, stack, args.compile)
        for obj, attr, part in ((torch.Tensor, "backward", "backward"), (opt, "step", "optimizer"),
                                (common, "ema_update_", "momentum")):
            t.wrap(stack, obj, attr, part)
        data = itertools.chain.from_iterable(itertools.repeat(batches))  # epochs without end
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # the timed steps start here
                t.ms, step_ms, t0 = collections.Counter(), 0.0, time.perf_counter()
                torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            with t.part("data"):
                x = prepare(next(data))
            t.sync()
            s0 = time.perf_counter()
            step(x)  # the parts inside it are timed by the wrappers; forward is the rest
            t.sync()
            step_ms = step_ms + 1e3 * (time.perf_counter() - s0) if i >= args.warmup else 0.0
        wall = time.perf_counter() - t0
    missing = [p for p in ("backward", "optimizer") + expected if p not in t.ms]
    if missing:
        raise RuntimeError(f"its train step never called the {missing} functions this benchmark times")
    ms = {p: t.ms[p] / args.steps for p in PARTS if p != "forward"}
    ms["forward"] = step_ms / args.steps - sum(v for p, v in ms.items() if p != "data")
    total = sum(ms.values())
    row = f"{name:6} {samples:7d} " + " ".join(f"{ms[p]:8.1f} {100 * ms[p] / total:3.0f}%" for p in PARTS)
    row += f" {total:8.1f} {samples * args.steps / wall:9.1f}"
    return row + (f" {torch.cuda.max_memory_allocated() / 2 ** 20:8.0f}" if device.type == "cuda" else "")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("methods", nargs="*", default=["swav", "dcl", "albef", "msd"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the --tiny runs use 1)")
    p.add_argument("--compile", default=None, metavar="BACKEND", help="torch.compile the online model, e.g. inductor")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{device.type}, amp {common.default_amp(device)}, {args.warmup} warm-up + {args.steps} timed steps at "
          f"each file's --tiny configuration; ms per step and % of the step")
    print(f"{'file':6} {'samples':>7} " + " ".join(f"{p:>13}" for p in PARTS) + f" {'step ms':>8} {'samples/s':>9}"
          + (f" {'peak MiB':>8}" if device.type == "cuda" else ""))
    failed = []
    for name in args.methods:
        try:
            print(bench(name, args, device), flush=True)
        except (Exception, SystemExit) as e:  # a file's API changed: say which file and where, then go on
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"{name:6} FAILED: {type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno}); "
                  f"update tests/bench_step.py to {name}.py's train loop", flush=True)
            failed.append(name)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
