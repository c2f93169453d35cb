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


def load_ckpt(output_dir, name="checkpoint.pt"):
    return torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=False)


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


# --- The pretrained path, without a download ---
WORDS = ("the a of and to in is on with for red green blue big small circle square left right top bottom "
         "image report normal chest lung heart return def self if else for while import class").split()


def save_tiny_bert(path, words=WORDS, layers=2):
    """A random 2-layer BERT and its WordPiece vocabulary, written with save_pretrained as a hub folder is.
    Dropout 0.1 as BERT-base, so a test can see whether training runs with dropout on."""
    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz0123456789.,",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789")]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def save_tiny_roberta(path, layers=2):
    """A random 2-layer RoBERTa with a byte-level BPE vocabulary (every byte, no merges), via save_pretrained."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    os.makedirs(path, exist_ok=True)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte-to-unicode table
    extra = iter(range(256, 512))
    byte_chars = [chr(b if b in printable else next(extra)) for b in range(256)]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_chars, "<mask>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    RobertaTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")).save_pretrained(path)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=1026, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(path)
    return path


def save_tiny_vit(path, image_size=32, patch_size=8, layers=2):
    """A random 2-layer ViT via save_pretrained, with dropout 0.1 so that its training mode is visible."""
    from transformers import ViTConfig, ViTModel
    os.makedirs(path, exist_ok=True)
    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=patch_size, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


class DropoutRecorder:
    """Records every call of a dropout module with p > 0 anywhere in the process: (module, training,
    grad_enabled). Calls made with gradients on are the training forward passes of the online model."""

    def __enter__(self):
        self.calls = []

        def hook(module, inputs):
            if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
                self.calls.append((module, module.training, torch.is_grad_enabled()))
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def training_calls(self):
        """(module, training) for the calls made with gradients enabled."""
        return [(m, t) for m, t, g in self.calls if g]


def run_main_inprocess(module, argv):
    """module.main(argv) in this process (so that hooks and counters see it), with its SystemExit turned
    into an AssertionError carrying the message."""
    try:
        module.main([str(a) for a in argv])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise AssertionError(f"{module.__name__}.main exited: {e.code}") from None
