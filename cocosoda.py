"""CoCoSoDa: Effective Contrastive Learning for Code Search.
Ensheng Shi, Yanlin Wang, Wenchao Gu, Lun Du, Hongyu Zhang, Shi Han, Dongmei Zhang, Hongbin Sun. ICSE 2023.
arXiv:2204.03293. Official code: github.com/DeepSoftwareAnalytics/CoCoSoDa (read, not copied).

One shared Transformer encoder (UniXcoder, a RoBERTa) embeds code and queries by mean pooling. Pre-training
(--mode pretrain) adds a momentum copy that embeds soft-augmented inputs (SoDa: tokens dynamically masked or
replaced by their syntactic type), four queues of past embeddings as extra negatives, and the multimodal
contrastive loss: InfoNCE over [in-batch | queue] logits for code->query, code->augmented query, query->code,
query->augmented code (inter-modal) and, with --intra, code->augmented code and query->augmented query
(intra-modal). Fine-tuning (--mode finetune) is plain in-batch InfoNCE on one language. Metric: MRR.

Where (the paper's sections "Soft data augmentation", "Momentum mechanism", "Multimodal contrastive learning"):
soft_augment + soda_op = SoDa (DM, DR, DRST, DMST); Encoder + mean_pool = the code/query encoder;
common.ema_update_ = momentum encoder; Queue = the four queues; moco_logits + cocosoda_loss = the multimodal
contrastive loss; finetune_loss = fine-tuning; rank_sums + evaluate = MRR, R@k (top-1000 rule of run.py).
--soda-mode official (default, with --intra off: run_cocosoda.sh) does what the released code does: the type
names are special tokens of the tokenizer, DM masks 1 step in 4, DR and DRST leave the input unchanged (its
batch has no type ids), DMST masks the chosen type name where the tokenizer split it out of the code text.
--soda-mode paper applies the four operators to lexical token types (token_types: keyword lists per language
and lexical rules, a stand-in for tree-sitter leaf types).

Launch (paper: global batch 128, 100k pre-training steps on the six CodeSearchNet languages):
  python cocosoda.py --tiny                                    # CPU smoke: stdlib functions, random-init encoder
  python cocosoda.py --data dataset --lang python              # one GPU, pre-train from microsoft/unixcoder-base
  torchrun --nproc_per_node=8 cocosoda.py --data dataset --batch-size 16
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 cocosoda.py \
      --data dataset --batch-size 8
  torchrun --nproc_per_node=8 cocosoda.py --mode finetune --data dataset --lang ruby --batch-size 16 \
      --model-name runs/cocosoda/encoder --output-dir runs/cocosoda_ruby
  python cocosoda.py --mode finetune --data dataset --lang python --max-steps 0 \
      --model-name DeepSoftwareAnalytics/CoCoSoDa            # zero-shot MRR of the released checkpoint
Real data: CodeSearchNet as written by the official dataset/get_data.sh + preprocess.py, i.e.
<data>/<lang>/{train,valid,test,codebase}.jsonl with code_tokens, docstring_tokens, url per line.
"""
import argparse
import array
import ast
import bisect
import collections
import json
import keyword
import math
import os
import random
import re
import sys
import sysconfig
import time
import tokenize
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, RobertaConfig, RobertaModel

import common

# --- Arguments ---
LANGS = ["ruby", "javascript", "go", "python", "java", "php"]
TINY = dict(batch_size=32, lr=1e-3, workers=0, log_every=10, from_scratch=True, hidden_size=64, num_layers=2,
            num_heads=4, code_len=64, nl_len=32, queue_size=128, momentum=0.99, pretrain_steps=150, epochs=1)


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="CoCoSoDa: momentum contrast with soft data augmentation for code search")
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
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
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
    m.add_argument("--lang-alpha", type=float, default=0.7,
                   help="each pre-training batch comes from one language i, drawn with prob. prop. to (n_i/N)^alpha")
    m.add_argument("--pretrain-steps", type=int, default=100000, help="pre-training optimizer steps (official)")
    m.add_argument("--code-len", type=int, default=256, help="code length in tokens")
    m.add_argument("--nl-len", type=int, default=128, help="query length in tokens")
    m.add_argument("--queue-size", type=int, default=1024, help="K, length of each of the four queues")
    m.add_argument("--momentum", type=float, default=0.999, help="m of the momentum encoder")
    m.add_argument("--temperature", type=float, default=0.07, help="tau of the pre-training loss (moco_t)")
    m.add_argument("--scale", type=float, default=20.0, help="logit multiplier of the official loop (20/tau in "
                   "pre-training, 20 = 1/0.05 in fine-tuning)")
    m.add_argument("--mlm-prob", type=float, default=0.1, help="SoDa rate: probability a token is selected")
    m.add_argument("--soda-mode", choices=["official", "paper"], default="official",
                   help="official (default, as run_cocosoda.sh): what the released code does (see the docstring); "
                   "paper: DM, DR, DRST, DMST in turn on lexical token types")
    m.add_argument("--intra", action="store_true",
                   help="add the intra-modal terms (the paper's full loss; off in run_cocosoda.sh, the default)")
    m.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    m.add_argument("--eval-steps", type=int, default=1000, help="pre-training: validation MRR + checkpoint every N "
                   "steps (official); fine-tuning validates at epoch ends (official)")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}  # flags given on the command line win over the preset
    if "model_name" in given:  # a --model-name given with --tiny is used as given
        given.add("from_scratch")
    for k, v in TINY.items() if args.tiny else ():
        if k not in given:
            setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check that depends on the flags and the world size only (no files)."""
    global_batch = args.batch_size * world
    if args.batch_size <= 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be positive")
    # The official enqueue asserts K % B == 0 (whole global batches) and does not trim: neither do we.
    if args.mode == "pretrain" and (args.queue_size <= 0 or args.queue_size % global_batch):
        raise SystemExit(f"error: --queue-size {args.queue_size} is not a positive multiple of the global batch "
                         f"{global_batch} ({args.batch_size} x {world} processes); change --queue-size or --batch-size")
    if not 0 <= args.mlm_prob <= 1:
        raise SystemExit(f"error: --mlm-prob {args.mlm_prob} is not a probability")
    if args.mode == "finetune" and args.intra:
        raise SystemExit("error: --intra is a pre-training term; fine-tuning has no momentum encoder")
    return args


# --- Data ---
TYPES = ["keyword", "identifier", "number", "string", "separator", "operator", "comment", "other"]  # --soda-mode paper
# The official tree-sitter leaf types (run.py), added as special tokens of the tokenizer as the official
# create_model does; the released DMST masks the one it draws where it occurs in the code text.
OFFICIAL_TYPES = sorted(set(
    "keyword identifier separators operator \" integer comment none escape_sequence "  # python
    "type_identifier decimal_integer_literal void_type string_literal decimal_floating_point_literal boolean_type "
    "null_literal hex_integer_literal character_literal "  # java
    "int_literal field_identifier package_identifier raw_string_literal rune_literal label_name float_literal "  # go
    "property_identifier number string_fragment regex_pattern shorthand_property_identifier_pattern "
    "shorthand_property_identifier regex_flags statement_identifier "  # javascript
    "text php_tag name string ERROR boolean namespace class extends "  # php
    "simple_symbol constant instance_variable string_content hash_key_symbol global_variable heredoc_beginning "
    "heredoc_content heredoc_end class_variable".split()))  # ruby
_C_LIKE = ("break case catch class const continue default do else extends finally for if instanceof new return "
           "switch throw try while true false null")  # keywords of java, javascript and php
KEYWORDS = {"python": set(keyword.kwlist) | {"self"}, **{lang: set(words.split()) for lang, words in {
    "go": "break case chan const continue default defer else fallthrough for func go goto if import interface map "
          "package range return select struct switch type var nil true false",
    "java": _C_LIKE + " abstract assert boolean byte char double enum final float goto implements import int "
            "interface long native package private protected public short static super synchronized this throws "
            "transient void volatile",
    "javascript": _C_LIKE + " async await debugger delete export function import in let super this typeof var void "
                  "with yield undefined",
    "php": _C_LIKE + " abstract and array as callable clone declare echo elseif empty final fn foreach function "
           "global goto implements include interface isset list match namespace or print private protected public "
           "require require_once static trait unset use var xor yield",
    "ruby": "alias and begin break case class def defined? do else elsif end ensure false for if in module next "
            "nil not or redo rescue retry return self super then true undef unless until when while yield"}.items()}}
SEPARATORS = set("()[]{},:;.") | {"->", "...", "=>", "::"}
_NUMBER = re.compile(f"(?:{tokenize.Number})[lLfFdDuUn]*")
_IDENT = re.compile(r"[$@]{0,2}[^\W\d]\w*[?!]?")  # php $x, ruby @x @@x x? x!
_STRING, _COMMENT = re.compile(tokenize.StringPrefix + "['\"`]"), re.compile(r"#|//|/\*")


def token_types(code_tokens, lang="python"):
    """Lexical type of each CodeSearchNet code token: the language's keywords, then lexical rules shared by the
    six languages. Our stand-in for the official tree-sitter leaf types (which need a compiled grammar)."""
    kw, out = KEYWORDS.get(lang, KEYWORDS["python"]), []
    for t in code_tokens:
        if t in kw:
            out.append("keyword")
        elif _IDENT.fullmatch(t):
            out.append("identifier")
        elif _NUMBER.fullmatch(t):
            out.append("number")
        elif _STRING.match(t):
            out.append("string")
        elif _COMMENT.match(t):
            out.append("comment")
        elif t in SEPARATORS:
            out.append("separator")
        elif re.fullmatch(r"[^\w\s]+", t):
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


class Jsonl:
    """A CodeSearchNet jsonl file, read line by line each time it is iterated (no corpus is held as Python lists):
    {key: value} per line, token fields given as strings split on whitespace; one-line errors name file and line."""

    def __init__(self, path, keys):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found; --data needs CodeSearchNet jsonl files <lang>/"
                             "{train,valid,test,codebase}.jsonl (see dataset/preprocess.py of the official code)")
        if not os.path.getsize(path):
            raise SystemExit(f"error: {path} is empty; give a CodeSearchNet jsonl file with one example per line")
        self.path, self.keys = path, keys

    def __iter__(self):
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    js = json.loads(line)
                except json.JSONDecodeError:
                    raise SystemExit(f"error: {self.path} line {n} is not valid JSON; fix or remove that line") from None
                missing = [k for k in self.keys if k not in js]
                if missing:
                    raise SystemExit(f"error: {self.path} line {n} has no '{missing[0]}' field; each line needs "
                                     f"{', '.join(self.keys)}")
                yield {k: js[k].split() if k.endswith("_tokens") and isinstance(js[k], str) else js[k] for k in self.keys}


def load_data(args):
    """-> ([(language, training examples)], {"test": pool, "valid": pool (CodeSearchNet only)}), a pool = (query
    examples, candidate examples, gold (Nq,)): lists for the built-in corpus, files read when iterated for real data
    (`tokenise` then holds them as token ids)."""
    if args.data == "synthetic":
        train, test = stdlib_corpus()
        return [("python", train)], {"test": (test, test, torch.arange(len(test)))}
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: --data {args.data} is not a directory; give a CodeSearchNet folder with "
                         "<lang>/train.jsonl, test.jsonl, codebase.jsonl, or --data synthetic")
    langs = args.pretrain_langs if args.mode == "pretrain" else [args.lang]
    parts = [(lang, Jsonl(os.path.join(args.data, lang, "train.jsonl"), ("code_tokens", "docstring_tokens")))
             for lang in langs]
    pools = {"test": read_pool(args.data, args.lang, "test")}
    if os.path.isfile(os.path.join(args.data, args.lang, "valid.jsonl")):
        pools["valid"] = read_pool(args.data, args.lang, "valid")
    return parts, pools


def read_pool(root, lang, split):
    """Retrieval pool of the official evaluation: queries from <split>.jsonl, candidates codebase.jsonl, gold
    candidate of each query = the one with its url. -> (queries, codes, gold (Nq,))."""
    queries = Jsonl(os.path.join(root, lang, f"{split}.jsonl"), ("docstring_tokens", "url"))
    codes = Jsonl(os.path.join(root, lang, "codebase.jsonl"), ("code_tokens", "url"))
    where = {c["url"]: i for i, c in enumerate(codes)}
    lost = next((q["url"] for q in queries if q["url"] not in where), None)
    if lost is not None:
        raise SystemExit(f"error: url {lost} of {lang}/{split}.jsonl is not in {lang}/codebase.jsonl; the "
                         "codebase must hold the code of every query")
    return queries, codes, torch.tensor([where[q["url"]] for q in queries])


def tokenise(tok, parts, pools, args):
    """-> ([(language, code Corpus, query Corpus)], {split: (query Corpus, code Corpus, gold)}): code types only for
    --soda-mode paper pre-training, one codebase Corpus for the test and valid pools."""
    paper = args.mode == "pretrain" and args.soda_mode == "paper"
    parts = [(lang, Corpus(tok, (e["code_tokens"] for e in part), args.code_len, lang if paper else None),
              Corpus(tok, (e["docstring_tokens"] for e in part), args.nl_len)) for lang, part in parts]
    codes = Corpus(tok, (e["code_tokens"] for e in pools["test"][1]), args.code_len)
    return parts, {k: (Corpus(tok, (e["docstring_tokens"] for e in q), args.nl_len), codes, gold)
                   for k, (q, _, gold) in pools.items()}


class LanguageSampler(torch.utils.data.Sampler):
    """Official pre-training: each step draws one language i with prob. (n_i/N)^alpha (renormalised) and takes
    the next global batch of that language's reshuffled, cycled, drop_last loader. Fine-tuning: one language,
    so steps run through epochs. The global batch of a step depends on (seed, step) only and is split into
    contiguous per-rank slices, so one process with batch world*B sees what world processes see together.
    Yields (index into the concatenated languages, sample seed, step); start = the step to resume at."""

    def __init__(self, sizes, batch_size, total, seed, alpha=1.0, rank=None, world=None):
        self.rank = common.get_rank() if rank is None else rank
        world = common.get_world_size() if world is None else world
        self.sizes, self.batch_size, self.total, self.seed, self.start = sizes, batch_size, total, seed, 0
        self.gb, self.offsets = batch_size * world, [sum(sizes[:i]) for i in range(len(sizes))]
        self.steps_per_epoch = [n // self.gb for n in sizes]  # per language
        if min(self.steps_per_epoch) == 0:
            raise SystemExit(f"error: a language has {min(sizes)} training pairs, fewer than one global batch of "
                             f"{batch_size} x {world} processes; lower --batch-size")
        q = torch.tensor([n / sum(sizes) for n in sizes], dtype=torch.float64) ** alpha
        g = torch.Generator().manual_seed(seed)
        self.lang = torch.multinomial(q / q.sum(), max(total, 1), replacement=True, generator=g)  # (total,)
        onehot = F.one_hot(self.lang, len(sizes))
        self.count = (onehot.cumsum(0) - onehot).gather(1, self.lang[:, None])[:, 0]  # earlier batches of that language

    def __len__(self):
        return max(0, self.total - self.start) * self.batch_size

    def __iter__(self):
        orders = {}  # language -> (epoch, permutation)
        for step in range(self.start, self.total):
            lang, k = int(self.lang[step]), int(self.count[step])
            epoch, j = divmod(k, self.steps_per_epoch[lang])
            if orders.get(lang, (None,))[0] != epoch:
                g = torch.Generator().manual_seed((self.seed * 1000003 + lang) * 1000003 + epoch)
                orders[lang] = (epoch, torch.randperm(self.sizes[lang], generator=g))
            lo, first = j * self.gb + self.rank * self.batch_size, self.rank * self.batch_size
            for pos, i in enumerate(orders[lang][1][lo:lo + self.batch_size].tolist(), first):  # pos in global batch
                yield self.offsets[lang] + i, (self.seed * 1000003 + step) * 1000003 + pos, step


class WordTokenizer:
    """Offline tokenizer for --from-scratch: lower-cased word pieces (identifiers split at _ and camelCase, so
    `getValue` and "get the value" share pieces), vocabulary = pieces seen twice in the training data. Ids of
    <s>, <pad>, </s> are 0, 1, 2 as in RoBERTa/UniXcoder. The type tokens are special tokens; a piece equal to an
    official type name (`name`, `string`, `"`...) becomes that token, as the BPE tokenizer splits it out."""
    FILE = "word_vocab.json"
    SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<encoder-only>", *(f"<{t}>" for t in TYPES), *OFFICIAL_TYPES]
    PIECE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[^\W\d_]+|[^\w\s]")

    def __init__(self, vocab):
        self.vocab, self.index = vocab, {w: i for i, w in enumerate(vocab)}
        self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id, self.enc_id = range(6)
        self.type_ids = {t: self.index[f"<{t}>"] for t in TYPES}  # --soda-mode paper
        self.name_ids = {t: self.index[t] for t in OFFICIAL_TYPES}  # official type names
        self.special_ids, self.vocab_size = list(range(len(self.SPECIALS))), len(vocab)

    @classmethod
    def build(cls, examples, min_count=2):
        counts = collections.Counter(p.lower() for e in examples for w in e["code_tokens"] + e["docstring_tokens"]
                                     for p in cls.PIECE.findall(w))
        words = (w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS)
        return cls(cls.SPECIALS + sorted(words, key=lambda w: (-counts[w], w)))

    def __call__(self, words, limit):
        """words -> (piece ids, index of the word each piece comes from), at most `limit` pieces."""
        ids, word_of = [], []
        for j, w in enumerate(words):
            for piece in self.PIECE.findall(w):
                ids.append(self.index.get(piece if piece in self.name_ids else piece.lower(), self.unk_id))
                word_of.append(j)
            if len(ids) >= limit:
                break
        return ids[:limit], word_of[:limit]

    def save_pretrained(self, path):
        with open(os.path.join(path, self.FILE), "w") as f:
            json.dump(self.vocab, f)


class HFTokenizer:
    """A pretrained BPE tokenizer (UniXcoder's) with the same interface. <encoder-only> is added when missing;
    for pre-training the type tokens are added as special tokens (official create_model: the type names as
    additional special tokens, embeddings resized)."""

    def __init__(self, name, add_types=True):
        self.tok = t = AutoTokenizer.from_pretrained(name)
        names, types = (OFFICIAL_TYPES, TYPES) if add_types else ([], [])
        new = ["<encoder-only>"] + names + [f"<{k}>" for k in types]
        t.add_tokens([w for w in new if w not in t.get_vocab()], special_tokens=True)
        self.cls_id, self.pad_id, self.sep_id = t.cls_token_id, t.pad_token_id, t.sep_token_id
        self.unk_id, self.mask_id = t.unk_token_id, t.mask_token_id
        self.enc_id = t.convert_tokens_to_ids("<encoder-only>")
        self.type_ids = {k: t.convert_tokens_to_ids(f"<{k}>") for k in types}
        self.name_ids = {k: t.convert_tokens_to_ids(k) for k in names}
        # Every special id: the named ones, <encoder-only> and the type tokens (what the official DM protects).
        self.special_ids = sorted({*t.all_special_ids, self.enc_id, *self.type_ids.values(), *self.name_ids.values()})
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


class Corpus:
    """Token ids of many sequences in one flat array + offsets (sequence i = ids[ends[i]:ends[i + 1]], <= max_len - 4):
    2 bytes a token (4 past 65,536 ids), one buffer the data workers share. With lang: each piece's type token too."""

    def __init__(self, tok, sequences, max_len, lang=None):
        kind = "H" if tok.vocab_size <= 1 << 16 else "i"
        self.ids, self.types, self.ends = array.array(kind), array.array(kind), array.array("q", [0])
        self.specials, self.max_len, self.lang = (tok.cls_id, tok.enc_id, tok.sep_id, tok.pad_id), max_len, lang
        for words in sequences:
            ids, word_of = tok(words, max_len - 4)
            self.ids.extend(ids)
            if lang:
                kinds = token_types(words, lang)
                self.types.extend(tok.type_ids[kinds[j]] for j in word_of)
            self.ends.append(len(self.ids))

    def __len__(self):
        return len(self.ends) - 1

    def __getitem__(self, i):
        """UniXcoder input [<s>, <encoder-only>, </s>, pieces, </s>, <pad>...] (max_len,), its type ids or None."""
        (a, b), (cls, enc, sep, pad) = self.ends[i:i + 2], self.specials
        tail = [sep] + [pad] * (self.max_len - 4 - (b - a))
        ids = torch.tensor([cls, enc, sep, *self.ids[a:b], *tail])
        return ids, torch.tensor([cls, enc, sep, *self.types[a:b], *tail]) if self.lang else None


class CodeSearchDataset(torch.utils.data.Dataset):
    """(code, query) ids; when pre-training, also the soft-augmented views the momentum encoder embeds (the
    operator of a sample depends on its step, its random draws on its sample seed: exact resume, any world)."""

    def __init__(self, parts, tok, args):  # parts: [(language, code Corpus, query Corpus)]
        self.parts, self.tok, self.args = parts, tok, args
        self.starts = [0] + torch.tensor([len(codes) for _, codes, _ in parts]).cumsum(0).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, key):
        i, sample_seed, step = key
        k = bisect.bisect_right(self.starts, i) - 1
        (_, codes, nls), a, tok = self.parts[k], self.args, self.tok
        (code, types), (nl, _) = codes[i - self.starts[k]], nls[i - self.starts[k]]
        if a.mode != "pretrain":
            return code, nl
        op, target = soda_op(step, a.soda_mode)
        code_k, nl_k = code, nl  # no operator: the key differs only by dropout and momentum weights
        with common.seeded(sample_seed):
            if op == "mask_type" and types is None:  # released DMST: the ids are the type table, the name a token
                code_k = soft_augment(code, code, a.mlm_prob, op, tok.mask_id, prefix_mask(code),
                                      target_type=tok.name_ids[target])
            elif op is not None:
                code_k = soft_augment(code, types, a.mlm_prob, op, tok.mask_id, protected_mask(code, tok),
                                      vocab_size=tok.vocab_size, target_type=tok.type_ids.get(target))
            if op == "mask":  # official: the query is augmented on DM steps only
                nl_k = soft_augment(nl, None, a.mlm_prob, op, tok.mask_id, protected_mask(nl, tok),
                                    vocab_size=tok.vocab_size)
        return code, code_k, nl, nl_k


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

    def encode(self, ids):  # (B, L) -> (B, d), fp32
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
            tok = HFTokenizer(args.model_name, add_types=args.mode == "pretrain")
        backbone = RobertaModel.from_pretrained(args.model_name, add_pooling_layer=False, **drop)  # in eval mode
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
    """SoDa operator and target type name for 0-based optimizer step `step`. The official loop counts from 1:
    DM if count % 4 == 0, DR if 1, DRST if 2, DMST if 3, the target drawn after random.seed(count) (from a list
    in set order there, sorted here). 'official': DR and DRST are dropped (the released batch has no type ids,
    its replacement table is the input itself), DMST draws among the official type names."""
    count = step + 1
    op = SODA_CYCLE[count % 4]
    if mode == "official":
        if op in ("replace_type", "replace_type_specified"):
            return None, None
        return op, random.Random(count).choice(OFFICIAL_TYPES) if op == "mask_type" else None
    specified = op in ("replace_type_specified", "mask_type")
    return op, random.Random(count).choice(TYPES[:6]) if specified else None  # types present in code


def prefix_mask(ids):
    """The 3 prefix tokens: official SoDa augments ids[:, 3:] only."""
    return torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape) < 3


def protected_mask(ids, tok):
    """Positions DM and DR never change: the prefix and every special token id (official mask_tokens:
    get_special_tokens_mask + pads): <s> </s> <pad> <unk> <mask> <encoder-only> and the type tokens."""
    return prefix_mask(ids) | torch.isin(ids, torch.tensor(tok.special_ids, device=ids.device))


def soft_augment(ids, type_ids, p, op, mask_id, protected, generator=None, vocab_size=None, target_type=None,
                 replace_prob=0.8):
    """Soft data augmentation on ids of any shape; returns a new tensor, protected positions never change.
    Each eligible token is selected with probability p, then replaced with probability replace_prob by:
      mask                    <mask> (DM; of the others, half get a random token when vocab_size is given)
      replace_type            its type token type_ids[i] (DR)
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


QUEUES = ["code", "nl", "masked_code", "masked_nl"]


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
    equals that of one process holding the whole global batch. Call it outside autocast: at scale/t = 286 a
    bf16 logit is off by up to ~1."""
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


def step_loss(train_model, momentum_model, queues, batch, args):
    """The loss of one training step on this process's batch -> (loss, embeddings to enqueue or None). The
    encoders run under autocast, the loss in fp32 outside it. train_model: the DDP/compiled online encoder."""
    device = batch[0].device
    if momentum_model is None:
        with common.autocast(device, args.amp):
            c, n = train_model(*batch)
        return finetune_loss(n, c, args.scale), None
    code, code_k, nl, nl_k = batch
    with common.autocast(device, args.amp):
        c, n = train_model(code, nl)
        with torch.no_grad():
            common.ema_update_(momentum_model, common.unwrap(train_model), args.momentum)  # before the keys (official)
            c_k, n_k = momentum_model(code_k, nl_k)
    loss = cocosoda_loss(c, n, c_k, n_k, {k: q.tensor for k, q in queues.items()}, args.temperature, args.scale,
                         args.intra)
    return loss, (c, n, c_k, n_k)


def enqueue_all(queues, keys):
    """Official: the online embeddings fill the code/nl queues, the momentum ones the masked queues; the
    global batch of each (gathered), after the step."""
    for k, x in zip(QUEUES, keys):
        queues[k].enqueue(common.concat_all_gather(x.detach().float()))


# --- Evaluation ---
def rank_sums(scores, gold, topk=1000):
    """Sums over the queries of a block of scores (Nq, Nc): reciprocal rank of the gold candidate (rank = 1 + number
    of candidates scoring strictly higher; 0 outside the top `topk`, official run.py) and hits at 1, 5, 10. (4,)"""
    r = 1 + (scores > scores.gather(1, gold[:, None])).sum(1)
    return torch.stack([torch.where(r <= topk, 1 / r.double(), 0.0).sum(), *((r <= k).sum().double() for k in (1, 5, 10))])


@torch.no_grad()
def evaluate(encoder, pool, batch_size, device, amp, chunk=1024):
    """MRR, R@1/5/10 of the online encoder in eval mode (training switches back), score = dot product = cosine. Each
    process embeds a shard of the candidates and of the queries; the candidate embeddings are gathered once in fp32
    (Nc x d, 135 MB for Python's 43,827 x 768: less than a block of scores, and no exchange per query block), and it
    scores its queries `chunk` at a time (not Nq x Nc, 2.6 GB for Python); reciprocal ranks and hits are summed."""
    queries, codes, gold = pool
    encoder.eval()

    def embed(corpus):  # this process's contiguous rows, the last repeated to ceil(n / world) (all_gather), fp32
        n, rank, per = len(corpus), common.get_rank(), math.ceil(len(corpus) / common.get_world_size())
        rows, out = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)], []
        for s in range(0, len(rows), batch_size):
            ids = torch.stack([corpus[i][0] for i in rows[s:s + batch_size]]).to(device, non_blocking=True)
            with common.autocast(device, amp):
                out.append(encoder.encode(ids).float())
        return torch.cat(out), rows[:max(0, min(per, n - rank * per))]  # embeddings, own rows
    c = common.concat_all_gather(embed(codes)[0])[:len(codes)]  # (Nc, d) on every process
    q, rows = embed(queries)
    gold, sums = gold[rows].to(device), torch.zeros(4, dtype=torch.float64, device=device)
    for s in range(0, len(rows), chunk):
        sums += rank_sums(q[s:min(s + chunk, len(rows))] @ c.T, gold[s:s + chunk])
    return dict(zip(("mrr", "r@1", "r@5", "r@10"), (common.all_reduce_sum(sums) / len(queries)).tolist()))


# --- Train ---
def no_decay(name):
    return name.endswith("bias") or "LayerNorm" in name  # official grouping


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    args.amp = args.amp or common.default_amp(device)
    pretrain, global_batch = args.mode == "pretrain", args.batch_size * world
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path, best_path = os.path.join(args.output_dir, "checkpoint.pt"), os.path.join(args.output_dir, "best.pt")

    parts, pools = load_data(args)
    common.seed_everything(args.seed)  # identical initial weights on every rank
    tok, model = build_encoder(args, (e for _, part in parts for e in part))  # --from-scratch: reads the files
    model.to(device)
    momentum_model = common.momentum_copy(model) if pretrain else None
    g = torch.Generator().manual_seed(3047)  # official queue seed
    dim = model.backbone.config.hidden_size
    queues = nn.ModuleDict({k: Queue(dim, args.queue_size, g) for k in QUEUES}).to(device) if pretrain else None
    common.seed_everything(args.seed + rank)
    parts, pools = tokenise(tok, parts, pools, args)

    ds = CodeSearchDataset(parts, tok, args)
    sizes = [len(codes) for _, codes, _ in parts]
    spe = sizes[0] // global_batch  # fine-tuning: steps per epoch of its one language
    total = args.pretrain_steps if pretrain else args.epochs * spe
    stop = total if args.max_steps is None else min(total, args.max_steps)
    sampler = LanguageSampler(sizes, args.batch_size, total, args.seed, args.lang_alpha)
    # Own generator: creating the iterator then leaves the global RNG (dropout) alone -> exact resume.
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0, generator=torch.Generator())
    groups = [{"params": [p for k, p in model.named_parameters() if not no_decay(k)], "weight_decay": args.weight_decay},
              {"params": [p for k, p in model.named_parameters() if no_decay(k)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, eps=1e-8, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, best, mrr_init = 0, -1.0, None
    ckpt = common.load_checkpoint(ckpt_path, "cocosoda", resume=not args.eval_only)  # after the models: RNG
    if ckpt:
        if ckpt.get("mode") != args.mode:
            raise SystemExit(f"error: {ckpt_path} is from --mode {ckpt.get('mode')}; choose another --output-dir")
        restore = dict(model=model, momentum_model=momentum_model, queues=queues) if pretrain else dict(model=model)
        common.restore(ckpt, ckpt_path, **restore, **({} if args.eval_only else dict(optimizer=opt, scaler=scaler)))
        step, best, mrr_init = ckpt["step"], ckpt["best_mrr"], ckpt["mrr_init"]
        common.print0(f"resumed from {ckpt_path} at step {step}")
    common.print0(f"{args.mode}: {len(ds)} training pairs in {len(parts)} language(s), {stop} of {total} steps, global "
                  f"batch {global_batch}, test pool {len(pools['test'][0])} queries x {len(pools['test'][1])} candidates")

    def run_eval(split):
        return evaluate(model, pools[split], args.batch_size, device, args.amp)

    def save():  # collective
        state = {"mode": args.mode, "args": vars(args), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), "best_mrr": best, "mrr_init": mrr_init}
        if pretrain:
            state.update(momentum_model=momentum_model.state_dict(), queues=queues.state_dict())
        common.save_checkpoint(ckpt_path, "cocosoda", step, state, finite=[model])

    if args.tiny and ckpt is None and not args.eval_only:
        mrr_init = run_eval("test")["mrr"]
        common.print0(f"encoder before training: test MRR {mrr_init:.4f}")
    train_model = common.distribute(model, device, args.compile)  # only the online encoder in DDP
    bar = tqdm(total=stop, initial=step, disable=rank != 0 or args.eval_only, desc=args.mode)
    t0, seen = time.time(), 0
    sampler.start = step
    for batch in ([] if args.eval_only or step >= stop else loader):
        # from_pretrained and evaluate() leave eval mode: train with dropout, momentum encoder too (official, every step)
        model.train()
        if pretrain:
            momentum_model.train()
        lr = args.lr * (1 - step / total)  # linear decay, no warmup (official)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [x.to(device, non_blocking=True) for x in batch]
        loss, keys = step_loss(train_model, momentum_model, queues, batch, args)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        if pretrain:
            enqueue_all(queues, keys)
        step, seen = step + 1, seen + global_batch
        bar.update(1)
        # Official: pre-training validates every save_steps (1000), fine-tuning at each epoch's end.
        validate = step % args.eval_steps == 0 if pretrain and args.eval_steps > 0 else not pretrain and step % spe == 0
        save_now = validate or step == stop
        if step % args.log_every == 0 or save_now:  # the only host syncs; NaN stops before any save
            value = common.all_reduce_sum(loss.detach().clone()).item() / world
            if not math.isfinite(value):
                raise SystemExit(f"error: loss is {value} at step {step}; the last good checkpoint in "
                                 f"{args.output_dir} is untouched; lower --lr or use --amp none")
            bar.set_postfix(loss=f"{value:.4f}")
            common.log_jsonl(args.output_dir, {"step": step, "epoch": 0 if pretrain else (step - 1) // spe,
                                               "loss": value, "lr": lr, "samples_per_s": seen / (time.time() - t0)})
            t0, seen = time.time(), 0
        if validate and "valid" in pools:  # model selection on valid MRR, as the official runs
            v = run_eval("valid")["mrr"]
            common.log_jsonl(args.output_dir, {"step": step, "valid_mrr": v})
            if v > best:
                best = v
                common.save_checkpoint(best_path, "cocosoda", step, {"model": model.state_dict()}, finite=[model])
        if save_now:
            save()
        if step >= stop:
            break
    bar.close()

    if os.path.exists(best_path):  # test the best validated weights
        common.restore(common.read_checkpoint(best_path, "cocosoda"), best_path, model=model)
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
