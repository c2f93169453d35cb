"""CoCoSoDa: Effective Contrastive Learning for Code Search.
Ensheng Shi, Yanlin Wang, Wenchao Gu, Lun Du, Hongyu Zhang, Shi Han, Dongmei Zhang, Hongbin Sun. ICSE 2023.
arXiv:2204.03293. Official code: github.com/DeepSoftwareAnalytics/CoCoSoDa (read, not copied).

One shared Transformer encoder (UniXcoder, a RoBERTa) embeds code and queries by mean pooling. Pre-training
(--mode pretrain) adds a momentum copy that embeds soft-augmented inputs (SoDa: tokens dynamically masked or
replaced by their syntactic type), four queues of past embeddings as extra negatives, and the multimodal
contrastive loss: InfoNCE over [in-batch | queue] logits for code->query, code->augmented query, query->code,
query->augmented code (inter-modal) and, with --intra, code->augmented code and query->augmented query
(intra-modal). Fine-tuning (--mode finetune) is plain in-batch InfoNCE per language. Metric: MRR over the pool.

Where (the paper's components): soft_augment + soda_op = soft data augmentation (DM, DR, DRST, DMST) with token
types from python_token_types/align_types; Encoder + mean_pool = code/query encoder; common.ema_update_ =
momentum encoder; Queue = the four queues; moco_logits + cocosoda_loss = multimodal contrastive loss;
finetune_loss = fine-tuning stage; mrr + recall_at_k = evaluation (top-1000 rule of the official run.py).

Launch (paper: global batch 128, 100k pre-training steps on the six CodeSearchNet languages):
  python cocosoda.py --tiny                                    # CPU smoke: stdlib functions, random-init encoder
  python cocosoda.py --data dataset --lang python              # one GPU, pre-train from microsoft/unixcoder-base
  torchrun --nproc_per_node=8 cocosoda.py --data dataset --batch-size 16
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 cocosoda.py \
      --data dataset --batch-size 8
  torchrun --nproc_per_node=8 cocosoda.py --mode finetune --data dataset --lang ruby --batch-size 16 \
      --model-name runs/cocosoda/encoder --eval-steps 0 --output-dir runs/cocosoda_ruby
  python cocosoda.py --mode finetune --data dataset --lang python --max-steps 0 \
      --model-name DeepSoftwareAnalytics/CoCoSoDa            # zero-shot MRR of the released checkpoint
Real data: CodeSearchNet as written by the official dataset/get_data.sh + preprocess.py, i.e.
<data>/<lang>/{train,valid,test,codebase}.jsonl with code_tokens, docstring_tokens, url per line.
"""
import argparse
import ast
import bisect
import collections
import json
import keyword
import math
import os
import random
import re
import sysconfig
import time
import tokenize
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import AutoTokenizer, RobertaConfig, RobertaModel

import common

# --- Arguments ---
LANGS = ["ruby", "javascript", "go", "python", "java", "php"]
TINY = dict(batch_size=32, lr=1e-3, workers=0, log_every=10, from_scratch=True, hidden_size=64, num_layers=2,
            num_heads=4, code_len=64, nl_len=32, queue_size=128, momentum=0.99, pretrain_steps=150, epochs=1)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="CoCoSoDa: momentum contrast with soft data augmentation for code search")
    p.add_argument("--data", default="synthetic", help="'synthetic': the built-in corpus, real functions with "
                   "docstrings from this Python's standard library; or a CodeSearchNet folder with "
                   "<lang>/{train,valid,test,codebase}.jsonl")
    p.add_argument("--output-dir", default="runs/cocosoda")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (pre-training length: --pretrain-steps)")
    p.add_argument("--batch-size", type=int, default=128, help="per process; the paper's global batch is 128")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW lr, linear decay to 0, no warmup (official)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="not on biases and LayerNorm (official)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=123456)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--mode", choices=["pretrain", "finetune"], default="pretrain",
                   help="pretrain: CoCoSoDa (momentum, queues, SoDa); finetune: in-batch InfoNCE on --lang")
    m.add_argument("--model-name", default="microsoft/unixcoder-base", help="initial encoder, HF name or local path")
    m.add_argument("--from-scratch", action="store_true",
                   help="random-init RoBERTa of the sizes below, word-piece vocabulary built from the training data")
    m.add_argument("--hidden-size", type=int, default=768, help="--from-scratch: d (unixcoder-base)")
    m.add_argument("--num-layers", type=int, default=12, help="--from-scratch: layers (unixcoder-base)")
    m.add_argument("--num-heads", type=int, default=12, help="--from-scratch: attention heads (unixcoder-base)")
    m.add_argument("--dropout", type=float, default=None, help="encoder dropout (default: the config's, 0.1)")
    m.add_argument("--lang", default="python", help="CodeSearchNet language fine-tuned and evaluated")
    m.add_argument("--pretrain-langs", nargs="+", default=LANGS, help="languages pre-trained on")
    m.add_argument("--lang-alpha", type=float, default=0.7, help="language i sampled prop. to (n_i/N)^alpha")
    m.add_argument("--pretrain-steps", type=int, default=100000, help="pre-training optimizer steps (official)")
    m.add_argument("--code-len", type=int, default=256, help="code length in tokens")
    m.add_argument("--nl-len", type=int, default=128, help="query length in tokens")
    m.add_argument("--queue-size", type=int, default=1024, help="K, length of each of the four queues")
    m.add_argument("--momentum", type=float, default=0.999, help="m of the momentum encoder")
    m.add_argument("--temperature", type=float, default=0.07, help="tau of the pre-training loss (moco_t)")
    m.add_argument("--scale", type=float, default=20.0, help="logit multiplier of the official loop (20/tau in "
                   "pre-training, 20 = 1/0.05 in fine-tuning)")
    m.add_argument("--mlm-prob", type=float, default=0.1, help="SoDa rate: probability a token is selected")
    m.add_argument("--soda-mode", choices=["paper", "official"], default="paper",
                   help="paper: the 4 operators in turn; official: the released code, where only DM (every 4th "
                   "step) changes the input [inferred default]")
    m.add_argument("--intra", action="store_true", help="add the intra-modal terms (paper; off in run_cocosoda.sh)")
    m.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    m.add_argument("--eval-steps", type=int, default=1000,
                   help="validation MRR + checkpoint every N steps (official pre-training); 0: at epoch ends only")
    args = p.parse_args(argv)
    if args.tiny:  # tiny values only where the user kept the default; a given --model-name is used as given
        for k, v in TINY.items():
            if getattr(args, k) == p.get_default(k) and not (k == "from_scratch" and args.model_name !=
                                                               p.get_default("model_name")):
                setattr(args, k, v)
    return args


# --- Data ---
TYPES = ["keyword", "identifier", "number", "string", "separator", "operator", "comment", "other"]
SEPARATORS = set("()[]{},:;.") | {"->", "..."}
_NUMBER, _STRING = re.compile(tokenize.Number), re.compile(tokenize.StringPrefix + r"['\"]")


def python_token_types(code_tokens):
    """Lexical type of each code token from the standard library's tokenize/keyword rules: our stand-in for the
    tree-sitter leaf types of the official code (which need a compiled grammar)."""
    out = []
    for t in code_tokens:
        if keyword.iskeyword(t):
            out.append("keyword")
        elif t.isidentifier():
            out.append("identifier")
        elif _NUMBER.fullmatch(t):
            out.append("number")
        elif _STRING.match(t):
            out.append("string")
        elif t.startswith("#"):
            out.append("comment")
        elif t in SEPARATORS:
            out.append("separator")
        elif t in tokenize.EXACT_TOKEN_TYPES:
            out.append("operator")
        else:
            out.append("other")
    return out


def _functions(node):
    """Function definitions below node, found through statements only (cheaper than ast.walk)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler)):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child
            yield from _functions(child)


def stdlib_corpus():
    """Functions with a docstring from this Python's standard library, CodeSearchNet-style: docstring_tokens =
    first paragraph of the docstring (the query), code_tokens = the function without docstring and comments.
    Files are read in sorted order; summaries that occur twice are dropped (ambiguous queries); ~1 in 10
    functions (by a hash of its url) is held out. Same Python version -> same corpus, on every machine."""
    root = sysconfig.get_path("stdlib")
    skip = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__"}
    drop = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [os.path.join(d, f) for f in names if f.endswith(".py")]
    examples = []
    for path in sorted(files):
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines, rel = src.splitlines(keepends=True), os.path.relpath(path, root).replace(os.sep, "/")
        for node in _functions(tree):
            if not (doc := ast.get_docstring(node)):
                continue
            ds = node.body[0]  # the docstring statement: its rows are left out of the code
            doc_rows = range(ds.lineno - node.lineno + 1, ds.end_lineno - node.lineno + 2)
            try:
                code = [t.string for t in tokenize.generate_tokens(iter(lines[node.lineno - 1:node.end_lineno]).__next__)
                        if t.type not in drop and t.start[0] not in doc_rows]
            except (tokenize.TokenError, SyntaxError):
                continue
            query = re.findall(r"\w+|[^\w\s]", doc.split("\n\n")[0])
            examples.append({"url": f"{rel}:{node.lineno}", "code_tokens": code, "docstring_tokens": query})
    seen = collections.Counter(" ".join(e["docstring_tokens"]) for e in examples)
    examples = [e for e in examples if seen[" ".join(e["docstring_tokens"])] == 1 and len(e["docstring_tokens"]) >= 3]
    test = [e for e in examples if zlib.crc32(e["url"].encode()) % 10 == 0]
    return [e for e in examples if zlib.crc32(e["url"].encode()) % 10 != 0], test


def read_jsonl(path, keys):
    """CodeSearchNet jsonl -> list of {key: value}; token fields given as strings are split on whitespace."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; --data needs CodeSearchNet jsonl files <lang>/"
                         "{train,valid,test,codebase}.jsonl (see dataset/preprocess.py of the official code)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                js = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path} line {n} is not valid JSON; fix or remove that line") from None
            missing = [k for k in keys if k not in js]
            if missing:
                raise SystemExit(f"error: {path} line {n} has no '{missing[0]}' field; each line needs "
                                 f"{', '.join(keys)}")
            rows.append({k: js[k].split() if k.endswith("_tokens") and isinstance(js[k], str) else js[k]
                         for k in keys})
    if not rows:
        raise SystemExit(f"error: {path} is empty; give a CodeSearchNet jsonl file with one example per line")
    return rows


def read_pool(root, lang, split):
    """Retrieval pool of the official evaluation: queries from <split>.jsonl, candidates codebase.jsonl, gold
    candidate of each query = the one with its url. -> (query word lists, code word lists, gold (Nq,))."""
    queries = read_jsonl(os.path.join(root, lang, f"{split}.jsonl"), ("docstring_tokens", "url"))
    codes = read_jsonl(os.path.join(root, lang, "codebase.jsonl"), ("code_tokens", "url"))
    where = {c["url"]: i for i, c in enumerate(codes)}
    lost = next((q["url"] for q in queries if q["url"] not in where), None)
    if lost is not None:
        raise SystemExit(f"error: url {lost} of {lang}/{split}.jsonl is not in {lang}/codebase.jsonl; the "
                         "codebase must hold the code of every query")
    return ([q["docstring_tokens"] for q in queries], [c["code_tokens"] for c in codes],
            torch.tensor([where[q["url"]] for q in queries]))


def load_data(args):
    """-> (training examples, {"test": pool, "valid": pool (CodeSearchNet only)})."""
    if args.data == "synthetic":
        train, test = stdlib_corpus()
        return train, {"test": ([e["docstring_tokens"] for e in test], [e["code_tokens"] for e in test],
                                torch.arange(len(test)))}
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: --data {args.data} is not a directory; give a CodeSearchNet folder with "
                         "<lang>/train.jsonl, test.jsonl, codebase.jsonl, or --data synthetic")
    langs = args.pretrain_langs if args.mode == "pretrain" else [args.lang]
    parts = [read_jsonl(os.path.join(args.data, lang, "train.jsonl"), ("code_tokens", "docstring_tokens"))
             for lang in langs]
    # Official pre-training draws language i with prob. (n_i/N)^0.7 (renormalised) for each batch; we resample
    # each language to that share once, so batches mix languages in the same proportions.
    n = [len(x) for x in parts]
    q = [(k / sum(n)) ** args.lang_alpha for k in n]
    g, train = torch.Generator().manual_seed(args.seed), []
    for part, qi in zip(parts, q):
        m = round(qi / sum(q) * sum(n))
        train += [part[i] for i in torch.randperm(len(part), generator=g).repeat(m // len(part) + 1)[:m].tolist()]
    pools = {"test": read_pool(args.data, args.lang, "test")}
    if os.path.isfile(os.path.join(args.data, args.lang, "valid.jsonl")):
        pools["valid"] = read_pool(args.data, args.lang, "valid")
    return train, pools


class WordTokenizer:
    """Offline tokenizer for --from-scratch: lower-cased word pieces (identifiers split at _ and camelCase, so
    `getValue` and "get the value" share pieces), vocabulary = pieces seen twice in the training data. Ids of
    <s>, <pad>, </s> are 0, 1, 2 as in RoBERTa/UniXcoder; the type tokens are built in."""
    FILE = "word_vocab.json"
    SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<encoder-only>"] + [f"<{t}>" for t in TYPES]
    PIECE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[^\W\d_]+|[^\w\s]")

    def __init__(self, vocab):
        self.vocab, self.index = vocab, {w: i for i, w in enumerate(vocab)}
        self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id, self.enc_id = range(6)
        self.type_ids = {t: self.index[f"<{t}>"] for t in TYPES}
        self.vocab_size = len(vocab)

    @classmethod
    def build(cls, examples, min_count=2):
        counts = collections.Counter(p.lower() for e in examples for w in e["code_tokens"] + e["docstring_tokens"]
                                     for p in cls.PIECE.findall(w))
        return cls(cls.SPECIALS + sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)))

    def __call__(self, words, limit):
        """words -> (piece ids, index of the word each piece comes from), at most `limit` pieces."""
        ids, word_of = [], []
        for j, w in enumerate(words):
            for piece in self.PIECE.findall(w):
                ids.append(self.index.get(piece.lower(), self.unk_id))
                word_of.append(j)
            if len(ids) >= limit:
                break
        return ids[:limit], word_of[:limit]

    def save_pretrained(self, path):
        with open(os.path.join(path, self.FILE), "w") as f:
            json.dump(self.vocab, f)


class HFTokenizer:
    """A pretrained BPE tokenizer (UniXcoder's) with the same interface; <encoder-only> and the type tokens are
    added as special tokens (official: type vocabularies as additional special tokens, embeddings resized)."""

    def __init__(self, name):
        self.tok = AutoTokenizer.from_pretrained(name)
        new = [t for t in ["<encoder-only>"] + [f"<{t}>" for t in TYPES] if t not in self.tok.get_vocab()]
        self.tok.add_tokens(new, special_tokens=True)
        t = self.tok
        self.cls_id, self.pad_id, self.sep_id, self.mask_id = t.cls_token_id, t.pad_token_id, t.sep_token_id, t.mask_token_id
        self.enc_id = t.convert_tokens_to_ids("<encoder-only>")
        self.type_ids = {k: t.convert_tokens_to_ids(f"<{k}>") for k in TYPES}
        self.vocab_size = len(t)

    def __call__(self, words, limit):
        # Official: tokenize " ".join(tokens); the offsets map each BPE piece back to its word (for its type).
        enc = self.tok(" ".join(words), add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                       max_length=limit)
        starts = [0]
        for w in words:
            starts.append(starts[-1] + len(w) + 1)
        return enc["input_ids"], [bisect.bisect_right(starts, s) - 1 for s, _ in enc["offset_mapping"]]

    def save_pretrained(self, path):
        self.tok.save_pretrained(path)


def align_types(tok, words, types, max_len):
    """UniXcoder input [<s>, <encoder-only>, </s>, pieces..., </s>, <pad>...] of length max_len, and the type
    token id of each piece's word at the same positions (the ids themselves outside the pieces).
    -> (ids (L,), type_ids (L,) or None)."""
    ids, word_of = tok(words, max_len - 4)
    prefix, pad = [tok.cls_id, tok.enc_id, tok.sep_id], [tok.pad_id] * (max_len - 4 - len(ids))
    full = torch.tensor(prefix + ids + [tok.sep_id] + pad)
    if types is None:
        return full, None
    return full, torch.tensor(prefix + [tok.type_ids[types[j]] for j in word_of] + [tok.sep_id] + pad)


def protected_mask(ids, tok):
    """Positions SoDa never changes: the 3 prefix tokens (official: augments ids[:, 3:]), </s> and padding."""
    pos = torch.arange(ids.shape[-1], device=ids.device) < 3
    return pos | torch.isin(ids, torch.tensor([tok.cls_id, tok.sep_id, tok.pad_id, tok.enc_id], device=ids.device))


class CodeSearchDataset(torch.utils.data.Dataset):
    """(code, query) ids; when pre-training, also the soft-augmented views the momentum encoder embeds."""

    def __init__(self, examples, tok, args):
        self.examples, self.tok, self.args = examples, tok, args

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, key):
        i, sample_seed, step = key
        e, a, tok = self.examples[i], self.args, self.tok
        soda = a.mode == "pretrain"
        code, types = align_types(tok, e["code_tokens"], python_token_types(e["code_tokens"]) if soda else None,
                                  a.code_len)
        nl, _ = align_types(tok, e["docstring_tokens"], None, a.nl_len)
        if not soda:
            return code, nl
        op, target = soda_op(step, a.soda_mode)
        code_k, nl_k = code, nl  # no operator: the key differs only by dropout and momentum weights
        if op is not None:
            with common.seeded(sample_seed):  # depends on (seed, epoch, index) only: exact resume, any world size
                kw = dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size)
                target_id = tok.type_ids[target] if target else None
                code_k = soft_augment(code[None], types[None], a.mlm_prob, op, protected=protected_mask(code[None], tok),
                                      target_type=target_id, **kw)[0]
                if op == "mask":  # official: the query is augmented on DM steps only
                    nl_k = soft_augment(nl[None], None, a.mlm_prob, op, protected=protected_mask(nl[None], tok), **kw)[0]
        return code, code_k, nl, nl_k


class StepSampler(common.ResumableSampler):
    """common.ResumableSampler that also hands each sample its global optimizer step: the SoDa operator of a
    batch depends on the step (the official loop cycles through them)."""

    def __iter__(self):
        first = self.epoch * self.steps_per_epoch + self.start_step
        for k, (i, seed) in enumerate(super().__iter__()):
            yield i, seed, first + k // self.batch_size


# --- Model ---
def mean_pool(hidden, mask):
    """Mean of the token states where mask is true (pads excluded, prefix included): (B, L, d), (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class Encoder(nn.Module):
    """The shared code/query encoder: RoBERTa states, mean pooled, L2-normalised (no projection head)."""

    def __init__(self, backbone, pad_id):
        super().__init__()
        self.backbone, self.pad_id = backbone, pad_id

    def encode(self, ids):  # (B, L) -> (B, d)
        mask = ids.ne(self.pad_id)
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return F.normalize(mean_pool(hidden, mask).float(), dim=-1)

    def forward(self, code, nl):  # one call for both modalities, so DDP sees a single forward per step
        return self.encode(code), self.encode(nl)


def build_encoder(args, train):
    """-> (tokenizer, Encoder). Pretrained weights by name/path, or --from-scratch from a config (offline)."""
    if args.from_scratch:
        tok = WordTokenizer.build(train)
        d = 0.1 if args.dropout is None else args.dropout
        cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                            num_attention_heads=args.num_heads, intermediate_size=4 * args.hidden_size,
                            max_position_embeddings=max(args.code_len, args.nl_len) + 2, pad_token_id=tok.pad_id,
                            bos_token_id=tok.cls_id, eos_token_id=tok.sep_id, hidden_dropout_prob=d,
                            attention_probs_dropout_prob=d)
        return tok, Encoder(RobertaModel(cfg, add_pooling_layer=False), tok.pad_id)
    drop = {} if args.dropout is None else dict(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    try:
        if os.path.isfile(os.path.join(args.model_name, WordTokenizer.FILE)):  # an encoder exported by --from-scratch
            with open(os.path.join(args.model_name, WordTokenizer.FILE)) as f:
                tok = WordTokenizer(json.load(f))
        else:
            tok = HFTokenizer(args.model_name)
        backbone = RobertaModel.from_pretrained(args.model_name, add_pooling_layer=False, **drop)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load --model-name {args.model_name} ({str(e).splitlines()[0][:120]}); "
                         "pass a local copy of the model, or --from-scratch to build the architecture with random "
                         "weights") from None
    if tok.vocab_size > backbone.config.vocab_size:
        backbone.resize_token_embeddings(tok.vocab_size)
    return tok, Encoder(backbone, tok.pad_id)


# --- Method ---
SODA_CYCLE = ["mask", "replace_type", "replace_type_specified", "mask_type"]  # DM, DR, DRST, DMST


def soda_op(step, mode):
    """SoDa operator and target type for 0-based optimizer step `step`. The official loop counts from 1 and uses
    DM if count % 4 == 0, DR if 1, DRST if 2, DMST if 3; the target type is drawn with random.seed(count).
    'official' reproduces the released code, where DR/DRST/DMST never change the input (no type ids in the
    batch): only DM remains."""
    op = SODA_CYCLE[(step + 1) % 4]
    if mode == "official" and op != "mask":
        return None, None
    specified = op in ("replace_type_specified", "mask_type")
    return op, random.Random(step + 1).choice(TYPES[:6]) if specified else None  # types present in code


def soft_augment(ids, type_ids, p, op, mask_id, protected, generator=None, vocab_size=None, target_type=None,
                 replace_prob=0.8):
    """Soft data augmentation on (B, L) ids; returns a new tensor, protected positions never change.
    Each eligible token is selected with probability p, then replaced with probability replace_prob by:
      mask                    <mask> (DM; of the others, half get a random token when vocab_size is given)
      replace_type            its type token type_ids[b, i] (DR)
      mask_type               <mask>, only tokens whose type is target_type (DMST)
      replace_type_specified  target_type, only tokens of that type (DRST)."""
    shape, dev = ids.shape, ids.device
    eligible = ~protected
    if op in ("mask_type", "replace_type_specified"):
        eligible = eligible & type_ids.eq(target_type)
    selected = eligible & (torch.rand(shape, generator=generator, device=dev) < p)
    replaced = selected & (torch.rand(shape, generator=generator, device=dev) < replace_prob)
    out = ids.clone()
    if op in ("mask", "mask_type"):
        out[replaced] = mask_id
        if op == "mask" and vocab_size:  # official 80/10/10: 0.5 of the remaining 20% become random tokens
            rand = selected & ~replaced & (torch.rand(shape, generator=generator, device=dev) < 0.5)
            out[rand] = torch.randint(vocab_size, shape, generator=generator, device=dev)[rand]
    elif op == "replace_type":
        out[replaced] = type_ids[replaced]
    elif op == "replace_type_specified":
        out[replaced] = target_type
    else:
        raise ValueError(f"unknown SoDa operator {op}")
    return out


class Queue(nn.Module):
    """Ring buffer of K past embeddings, stored (d, K) as in MoCo; initialised with normalised Gaussian noise."""

    def __init__(self, dim, size, generator=None):
        super().__init__()
        self.register_buffer("tensor", F.normalize(torch.randn(dim, size, generator=generator), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):  # keys (B, d): the global batch, gathered
        size = self.tensor.shape[1]
        assert size % keys.shape[0] == 0, "queue size must be a multiple of the global batch"
        cols = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # no host sync
        self.tensor.index_copy_(1, cols, keys.T.to(self.tensor.dtype))
        self.ptr.add_(keys.shape[0]).remainder_(size)


def moco_logits(anchor, pos, queue, t, scale=1.0, offset=0):
    """[anchor . posT (in-batch: the positive and B-1 negatives) | anchor . queue] / t * scale.
    anchor (B, d), pos (B', d), queue (d, K) -> logits (B, B'+K), labels (B,) = offset + arange(B)."""
    logits = torch.cat([anchor @ pos.T, anchor @ queue], dim=1) / t * scale
    return logits, offset + torch.arange(anchor.shape[0], device=anchor.device)


def cocosoda_loss(c, n, c_k, n_k, queues, t=0.07, scale=20.0, intra=False):
    """Multimodal contrastive loss: one cross-entropy over all rows (equal weights) of
    inter-modal  c->n (Q_nl), c->n_k (Q_masked_nl), n->c (Q_code), n->c_k (Q_masked_code)
    intra-modal  c->c_k (Q_masked_code), n->n_k (Q_masked_nl)   [intra=True].
    c, n: online code/query embeddings of this process (B, d); c_k, n_k: momentum embeddings of the augmented
    inputs; queues: name -> (d, K). Positives and in-batch negatives are gathered across processes, so the loss
    equals that of one process holding the whole global batch."""
    c, n, c_k, n_k = c.float(), n.float(), c_k.float(), n_k.float()
    offset = common.get_rank() * c.shape[0]
    c_all, n_all = common.all_gather_with_grad(c), common.all_gather_with_grad(n)  # online: gradient on both sides
    ck_all, nk_all = common.concat_all_gather(c_k.detach()), common.concat_all_gather(n_k.detach())  # keys
    terms = [(c, n_all, "nl"), (c, nk_all, "masked_nl"), (n, c_all, "code"), (n, ck_all, "masked_code")]
    if intra:
        terms += [(c, ck_all, "masked_code"), (n, nk_all, "masked_nl")]
    logits, labels = zip(*(moco_logits(a, p, queues[q].float(), t, scale, offset) for a, p, q in terms))
    return F.cross_entropy(torch.cat(logits), torch.cat(labels))


def finetune_loss(n, c, scale=20.0):
    """Fine-tuning stage (official model_type 'base'): CE(scale * n . c_allT, diagonal), no queue, no momentum."""
    n, c = n.float(), c.float()
    empty = n.new_zeros(n.shape[1], 0)
    logits, labels = moco_logits(n, common.all_gather_with_grad(c), empty, 1.0, scale, common.get_rank() * n.shape[0])
    return F.cross_entropy(logits, labels)


# --- Evaluation ---
def _ranks(scores, gold):
    """Rank of each query's gold candidate: 1 + number of candidates scoring strictly higher. (Nq,)"""
    return 1 + (scores > scores.gather(1, gold[:, None])).sum(1)


def mrr(scores, gold, topk=1000):
    """Mean reciprocal rank; a gold candidate outside the top `topk` counts 0 (official run.py)."""
    r = _ranks(scores, gold).float()
    return torch.where(r <= topk, 1 / r, torch.zeros_like(r)).mean().item()


def recall_at_k(scores, gold, k):
    return (_ranks(scores, gold) <= k).float().mean().item()


@torch.no_grad()
def evaluate(encoder, pool, batch_size, device, amp):
    """Embed queries and candidates with the online encoder (eval mode), score by dot product = cosine."""
    queries, codes, gold = pool
    encoder.eval()
    with common.autocast(device, amp):
        q = torch.cat([encoder.encode(x.to(device, non_blocking=True)) for x in queries.split(batch_size)])
        c = torch.cat([encoder.encode(x.to(device, non_blocking=True)) for x in codes.split(batch_size)])
    encoder.train()
    scores, gold = q.float() @ c.float().T, gold.to(device)  # (Nq, Nc)
    return {"mrr": mrr(scores, gold), "r@1": recall_at_k(scores, gold, 1), "r@5": recall_at_k(scores, gold, 5),
            "r@10": recall_at_k(scores, gold, 10)}


# --- Train ---
QUEUES = ["code", "nl", "masked_code", "masked_nl"]


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    args.amp = args.amp or common.default_amp(device)
    pretrain, global_batch = args.mode == "pretrain", args.batch_size * world
    if pretrain and (args.queue_size <= 0 or args.queue_size % global_batch):
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a positive multiple of the global batch "
                         f"{global_batch} ({args.batch_size} x {world} processes); change --queue-size or --batch-size")
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path, best_path = os.path.join(args.output_dir, "checkpoint.pt"), os.path.join(args.output_dir, "best.pt")
    ckpt = common.load_checkpoint(ckpt_path, "cocosoda") if os.path.exists(ckpt_path) else None
    if ckpt and ckpt["args"]["mode"] != args.mode:
        raise SystemExit(f"error: {ckpt_path} is from --mode {ckpt['args']['mode']}; choose another --output-dir")

    train, pools = load_data(args)
    common.seed_everything(args.seed)  # identical initial weights on every rank
    tok, model = build_encoder(args, train)
    model.to(device)
    momentum_model = common.momentum_copy(model) if pretrain else None  # stays in train mode (dropout), official
    dim = model.backbone.config.hidden_size
    g = torch.Generator().manual_seed(3047)  # official queue seed
    queues = nn.ModuleDict({k: Queue(dim, args.queue_size, g) for k in QUEUES}).to(device) if pretrain else None
    common.seed_everything(args.seed + rank)
    pools = {k: (torch.stack([align_types(tok, w, None, args.nl_len)[0] for w in qs]),
                 torch.stack([align_types(tok, w, None, args.code_len)[0] for w in codes]), gold)
             for k, (qs, codes, gold) in pools.items()}

    ds = CodeSearchDataset(train, tok, args)
    sampler = StepSampler(len(ds), args.batch_size, seed=args.seed)
    # Own generator: creating the iterator then leaves the global RNG (dropout) alone -> exact resume.
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0, generator=torch.Generator())
    spe = sampler.steps_per_epoch
    total = args.pretrain_steps if pretrain else args.epochs * spe
    stop = total if args.max_steps is None else min(total, args.max_steps)
    no_decay = lambda name: name.endswith("bias") or "LayerNorm" in name  # noqa: E731 (official grouping)
    groups = [{"params": [p for k, p in model.named_parameters() if not no_decay(k)], "weight_decay": args.weight_decay},
              {"params": [p for k, p in model.named_parameters() if no_decay(k)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, eps=1e-8, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, best, mrr_init = 0, -1.0, None
    if ckpt:
        common.load_state(model, ckpt["model"], ckpt_path)
        if pretrain:
            common.load_state(momentum_model, ckpt["momentum_model"], ckpt_path)
            common.load_state(queues, ckpt["queues"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best, mrr_init = ckpt["step"], ckpt["best_mrr"], ckpt["mrr_init"]
        if rank < len(ckpt["rng"]):
            common.set_rng_state(ckpt["rng"][rank])
        common.print0(f"resumed from {ckpt_path} at step {step}")
    common.print0(f"{args.mode}: {len(ds)} training pairs, {spe} steps/epoch, {stop} of {total} steps, global batch "
                  f"{global_batch}, test pool {len(pools['test'][0])} queries x {len(pools['test'][1])} candidates")

    def run_eval(split):
        return evaluate(model, pools[split], args.batch_size, device, args.amp)

    def save(epoch):
        rng = common.gather_objects(common.rng_state())  # collective: every rank calls it
        if common.is_main():
            state = {"method": "cocosoda", "args": vars(args), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "rng": rng, "best_mrr": best,
                     "mrr_init": mrr_init}
            if pretrain:
                state.update(momentum_model=momentum_model.state_dict(), queues=queues.state_dict())
            common.save_checkpoint(ckpt_path, state)

    if args.tiny and ckpt is None and not args.eval_only:
        mrr_init = run_eval("test")["mrr"]
        common.print0(f"random-init encoder: test MRR {mrr_init:.4f}")
    dmodel = DistributedDataParallel(model) if world > 1 else model  # only the online encoder
    dmodel = torch.compile(dmodel) if args.compile else dmodel
    bar = tqdm(total=stop, initial=step, disable=rank != 0 or args.eval_only, desc=args.mode)
    t0, seen = time.time(), 0
    for epoch in range(step // spe, math.ceil(total / spe)):
        if step >= stop or args.eval_only:
            break
        sampler.set_epoch(epoch, step - epoch * spe)
        for batch in loader:
            lr = args.lr * (1 - step / total)  # linear decay, no warmup (official)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = [x.to(device, non_blocking=True) for x in batch]
            with common.autocast(device, args.amp):
                if pretrain:
                    code, code_k, nl, nl_k = batch
                    c, n = dmodel(code, nl)
                    with torch.no_grad():
                        common.ema_update_(momentum_model, model, args.momentum)  # before the keys, as official
                        c_k, n_k = momentum_model(code_k, nl_k)
                    loss = cocosoda_loss(c, n, c_k, n_k, {k: q.tensor for k, q in queues.items()},
                                         args.temperature, args.scale, args.intra)
                else:
                    c, n = dmodel(*batch)
                    loss = finetune_loss(n, c, args.scale)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            if pretrain:  # official: the online embeddings fill the code/nl queues, the momentum ones the masked
                for k, x in zip(QUEUES, (c, n, c_k, n_k)):
                    queues[k].enqueue(common.concat_all_gather(x.detach().float()))
            step, seen = step + 1, seen + global_batch
            bar.update(1)
            validate = args.eval_steps > 0 and step % args.eval_steps == 0 or step % spe == 0
            save_now = validate or step == stop
            if step % args.log_every == 0 or save_now:  # the only host syncs; NaN stops before any save
                value = common.all_reduce_sum(loss.detach().clone()).item() / world
                if not math.isfinite(value):
                    raise SystemExit(f"error: loss is {value} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                bar.set_postfix(loss=f"{value:.4f}")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": value, "lr": lr,
                                                   "samples_per_s": seen / (time.time() - t0)})
                t0, seen = time.time(), 0
            if validate and "valid" in pools:  # model selection on valid MRR, as the official runs
                v = run_eval("valid")["mrr"]
                common.log_jsonl(args.output_dir, {"step": step, "valid_mrr": v})
                if v > best:
                    best = v
                    if common.is_main():
                        common.save_checkpoint(best_path, {"method": "cocosoda", "model": model.state_dict()})
            if save_now:
                save(epoch)
            if step >= stop:
                break
    bar.close()

    if os.path.exists(best_path):  # test the best validated weights
        common.load_state(model, common.load_checkpoint(best_path, "cocosoda")["model"], best_path)
    metrics = run_eval("test")
    if mrr_init is not None:
        metrics["mrr_init"] = mrr_init
    common.print0(f"{'stdlib' if args.data == 'synthetic' else args.lang} test: " +
                  "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"step": step, "eval": "test", **metrics})
    if common.is_main() and not args.eval_only:  # the encoder alone, loadable by transformers (+ --model-name)
        path = os.path.join(args.output_dir, "encoder")
        os.makedirs(path, exist_ok=True)
        model.backbone.save_pretrained(path)
        tok.save_pretrained(path)
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
