"""Helpers every method test uses: run a script with --tiny, under torchrun, and compare checkpoints."""
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(threads):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_script(script, *args, timeout=300, check=True, threads=2):
    """python <script> <args>; returns the CompletedProcess (stdout+stderr in .stdout)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, *args, nproc=2, timeout=300, check=True):
    """torchrun --standalone --nproc_per_node=<nproc> <script> <args> on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--nnodes", "1",
           os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.load(f)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(output_dir):
    return torch.load(os.path.join(output_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)


def assert_tensors_close(a, b, atol=0.0, rtol=0.0, path="state"):
    """Recursively compare nested dicts/lists of tensors (atol=rtol=0 means bit-exact)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, f"{path}: shape {a.shape} vs {getattr(b, 'shape', b)}"
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{path}: max diff {(a - b).abs().max().item():.3g}"
        else:
            assert torch.equal(a, b), f"{path}: differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_tensors_close(a[k], b[k], atol, rtol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_close(x, y, atol, rtol, f"{path}[{i}]")
