"""Infrastructure shared by every method file, and nothing algorithmic.

Distributed setup from torchrun's environment, gathers, the momentum (EMA) copy, schedules, seeding,
a sampler that resumes mid-epoch exactly, JSON logs and atomic checkpoints. Copy this file together
with any one method file. torch, numpy and the standard library only.
"""
import contextlib
import copy
import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist

# --- Distributed ---
def setup_distributed():
    """Init the process group when launched by torchrun (nccl on CUDA, gloo on CPU), else run alone.
    Returns (rank, world_size, device)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        local_rank, rank, world = 0, 0, 1
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:  # TF32 matmuls and convolutions: free speed on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return rank, world, device

def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()

def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0

def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def is_main():
    return get_rank() == 0

def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)

def all_reduce_sum(x):
    """In-place SUM over processes (identity when alone); returns x."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x

@torch.no_grad()
def concat_all_gather(x):
    """(B, ...) per process -> (world*B, ...) in rank order, no gradient (queues, momentum features)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)

class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss used every rank's x: sum the incoming gradients, keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]

def all_gather_with_grad(x):
    """(B, ...) -> (world*B, ...) in rank order; gradients flow back to the owning process. With DDP's
    gradient averaging this gives exactly the gradient of the mean of the per-process losses."""
    return x if get_world_size() == 1 else _GatherWithGrad.apply(x)

def gather_objects(obj):
    """Any picklable object from every process, as a list indexed by rank (per-rank RNG states, queues)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out

def unwrap(model):
    """The plain module behind DDP and torch.compile (in either order)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model

def distribute(model, device, backend=None):
    """The module to train: DDP when there is more than one process, then torch.compile(backend) when a
    backend is given. DDP first, then compile: the documented order, which keeps DDP's bucketed
    all-reduce overlapping the backward pass."""
    if get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model, backend=backend) if backend else model

# --- Momentum (EMA) model ---
def momentum_copy(model):
    """A frozen deep copy to serve as the momentum (teacher / key) encoder."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    return m

@torch.no_grad()
def ema_update_(ema, model, momentum):
    """ema <- momentum * ema + (1 - momentum) * model for every parameter, in one fused call.
    Buffers (BatchNorm statistics) are left to the momentum model's own forward passes, as in MoCo."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    assert len(ema_params) == len(params), "momentum model and model differ in structure"
    torch._foreach_lerp_(ema_params, params, 1.0 - momentum)

# --- Schedules ---
def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """Per-iteration values: linear warmup from warmup_start to base, then a half cosine to final."""
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])

# --- Seeding and data order ---
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

@contextlib.contextmanager
def seeded(seed):
    """Run a block with python and torch RNGs seeded to `seed`, then restore the outer state, so that
    per-sample augmentations do not consume the training RNG."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)

class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled by (seed, epoch); each global batch is split into contiguous per-rank slices, so the
    all-gathered batch equals the batch one process would see; the tail that does not fill a global
    batch is dropped; `set_epoch(epoch, start_step)` resumes mid-epoch without loading skipped batches.
    Yields (index, sample_seed): augmentations seeded by it depend on (seed, epoch, index) only, not on
    the number of workers or on where a run was resumed."""

    def __init__(self, n, batch_size, seed=0, shuffle=True, rank=None, world_size=None):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world_size is None else world_size
        self.steps_per_epoch = n // (batch_size * self.world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"error: {n} samples do not fill one global batch of "
                             f"{batch_size} x {self.world} processes; lower --batch-size")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        gb = self.batch_size * self.world
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * gb + self.rank * self.batch_size
            for i in order[lo:lo + self.batch_size].tolist():
                yield i, (self.seed * 1000003 + self.epoch) * 1000003 + i

# --- Mixed precision ---
def autocast(device, amp):
    """bf16/fp16 autocast on the device, or a no-op for amp='none'."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

def default_amp(device):
    return "bf16" if device.type == "cuda" else "none"

# --- Outputs ---
def log_jsonl(output_dir, record):
    """Append one JSON object to <output_dir>/log.jsonl (rank 0 only)."""
    if is_main():
        with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

def save_json(path, obj):
    if is_main():
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)

def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state

def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

# --- Checkpoints: one protocol for every main ---
def _write_atomic(path, state):
    """Write a temporary file beside `path`, then rename: a crash never leaves half a file, and a failed
    write (full disk) removes its temporary file and leaves the last good checkpoint untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except Exception as e:  # full disk, lost mount, an object that cannot be pickled
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: cannot write {path} ({e}); the last good checkpoint is untouched") from None

def all_finite(modules):
    """True on every process when every parameter of `modules` is finite on every process (one host sync)."""
    params = [p.detach() for m in modules for p in m.parameters()]
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    flag = ok.float().reshape(1)
    if get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())

def save_checkpoint(path, method, step, state, per_rank=None, finite=()):
    """Collective: every process calls it. Writes {method, step, world_size, ranks, **state} atomically from
    rank 0, where `ranks[r]` holds process r's RNG state and its `per_rank` dict (queues that differ per
    process). Writes nothing, and stops with an error, when a parameter of the modules in `finite` is not
    finite: a diverged run never overwrites the last good checkpoint."""
    if finite and not all_finite(finite):
        raise SystemExit(f"error: parameters are not finite at step {step}; nothing was saved and the last "
                         f"good checkpoint {path} is untouched; lower --lr or use --amp none")
    ranks = gather_objects({"rng": rng_state(), **(per_rank or {})})
    if is_main():
        _write_atomic(path, {"method": method, "step": step, "world_size": get_world_size(), "ranks": ranks,
                             **state})
    if get_world_size() > 1:
        dist.barrier()  # no process runs ahead of a checkpoint that is not on disk yet

def read_checkpoint(path, method):
    """Load a file written by `method` (any process, no collective), with a one-line error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}); "
                         "delete it or choose another --output-dir") from None
    if not isinstance(state, dict) or state.get("method") != method:
        found = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"error: {path} is a checkpoint of '{found}', not '{method}'; "
                         "choose another --output-dir")
    return state

def load_checkpoint(path, method, resume=True):
    """Collective. The checkpoint at `path`, or None for a fresh start when no process sees one. Every
    process must see the same file: one that cannot (a node-local output dir) is an error, not a silent
    fresh start. With `resume` (training goes on), the checkpoint must come from the same number of
    processes and this process's RNG state is restored (so call it after building the models, whose
    initialisation draws random numbers); `state["rank"]` is then this process's `per_rank` dict."""
    seen = gather_objects(os.path.exists(path))
    if not any(seen):
        return None
    if not all(seen):
        missing = [r for r, s in enumerate(seen) if not s]
        raise SystemExit(f"error: processes {missing} cannot see {path}, which the others resume from; put "
                         "--output-dir on a file system that every node shares")
    state = read_checkpoint(path, method)
    steps = gather_objects(state.get("step"))
    if len(set(steps)) > 1:
        raise SystemExit(f"error: processes read checkpoints of different steps {steps} at {path}; "
                         "every node must see one shared --output-dir")
    if resume:
        saved_world = state.get("world_size", len(state.get("ranks", [])))
        if saved_world != get_world_size():
            raise SystemExit(f"error: {path} was written by {saved_world} processes, this run has "
                             f"{get_world_size()}; resume with the same number or choose another --output-dir")
        state["rank"] = state["ranks"][get_rank()]
        set_rng_state(state["rank"]["rng"])
    return state

def load_state(obj, state_dict, path):
    """obj.load_state_dict (a module, an optimizer, a queue) with a one-line error when it does not fit."""
    try:
        obj.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        msg = str(e).strip()
        first = msg.splitlines()[1].strip() if "\n" in msg else msg
        raise SystemExit(f"error: {path} does not fit this {type(obj).__name__} ({first}); use the flags it "
                         "was trained with or another --output-dir") from None

def restore(state, path, **objects):
    """Load each named object from state[name] (model=..., optimizer=..., scaler=...), one-line errors
    for a missing entry or one that does not fit."""
    for name, obj in objects.items():
        if name not in state:
            raise SystemExit(f"error: {path} has no '{name}'; it was written by another version or mode; "
                             "choose another --output-dir")
        load_state(obj, state[name], path)
