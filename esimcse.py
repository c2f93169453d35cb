"""ESimCSE: Enhanced Sample Building Method for Contrastive Learning of Unsupervised Sentence Embedding.
Xing Wu, Chaochen Gao, Liangjun Zang, Jizhong Han, Zhongyuan Wang, Songlin Hu. COLING 2022. arXiv 2109.04380.
Official code: github.com/caskcsg/sentemb (folder ESimCSE/).

Unsupervised SimCSE (dropout noise as the only augmentation, in-batch negatives) with two changes:
(1) word repetition (Sec. 3.1): the positive view repeats a few random subwords, so that a positive pair no longer
    has the same length and the model cannot use length to find it;
(2) momentum contrast (Sec. 3.2): a queue of sentence embeddings from a momentum (EMA, 0.995) encoder, computed
    on the un-repeated view with dropout off, adds negatives to the in-batch ones. As in the official code the
    momentum encoder starts from a random initialisation, not from the pretrained weights (--momentum-init copy).
Sentence embedding: last-layer [CLS]; a Linear+Tanh MLP on top is used during training only.

Where the paper is implemented:
  word_repetition / repeat_at / word_level_repetition  Sec. 3.1 (dup_len rule of the official code; --paper-formula)
  EmbeddingQueue, train_step                          Sec. 3.2 (queue of momentum embeddings, EMA update)
  esimcse_loss                                        the loss of Sec. 3.2: SimCSE's InfoNCE, queue negatives added
  spearman / eval_sts                                 the SimCSE/SentEval protocol of the experiments: STS12-16
                                                      "all", STS-B and SICK-R test, selection on STS-B dev

Launch:
  python esimcse.py --tiny                               # CPU smoke run: small BERT from scratch, built-in data
  python esimcse.py --data wiki1m_for_simcse.txt --stsb-path SentEval/data/downstream/STS/STSBenchmark \
      --sts-dir SentEval/data/downstream/STS --sick-path SentEval/data/downstream/SICK/SICK_test_annotated.txt
  torchrun --nproc_per_node=8 esimcse.py --batch-size 8 --data ... (global batch 64 as in the paper)
  torchrun --nnodes=2 --node_rank=0|1 --master_addr=HOST --master_port=29500 --nproc_per_node=8 esimcse.py \
      --batch-size 4 --data ...
"""
import argparse
import functools
import math
import os
import random
import re
import sys
import tempfile
import time
import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer

import common

# --- Arguments ---
TINY = dict(model="scratch", lr=2e-3, workers=0, log_every=10, eval_steps=40)


def get_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (built-in corpus [inferred]) or a text file with one sentence per line\n"
                        "(wiki1m format)")
    p.add_argument("--output-dir", default="runs/esimcse")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="per process; the paper's global batch is 64")
    p.add_argument("--lr", type=float, default=3e-5,
                   help="bert-base 3e-5; bert-large, roberta-base, roberta-large 1e-5; linear decay, no warmup")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="default bf16 on CUDA, none on CPU (the official runs used fp16)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the online model (after DDP); BACKEND e.g. aot_eager for a quick CPU check")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    m = p.add_argument_group("method")
    m.add_argument("--model", default="bert-base-uncased",
                   help="BERT/RoBERTa name or local path for from_pretrained, or 'scratch': a 2-layer BERT from\n"
                        "scratch with a WordPiece vocabulary built from the training text [inferred]")
    m.add_argument("--max-seq-length", type=int, default=32, help="training truncation length (official run.sh)")
    m.add_argument("--dropout", type=float, default=0.1,
                   help="hidden and attention dropout: the noise of SimCSE (0.15 for roberta-large)")
    m.add_argument("--dup-rate", type=float, default=0.32,
                   help="dup_rate in Sec. 3.1 (bert 0.32, roberta-base 0.30, roberta-large 0.28)")
    m.add_argument("--dup-type", choices=["bpe", "word"], default="bpe",
                   help="repeat subwords after tokenisation (official) or whitespace words (Sec. 5.2 ablation)")
    m.add_argument("--paper-formula", action="store_true",
                   help="dup_len ~ U[0, max(2, int(dup_rate*N))] as written in Sec. 3.1 instead of the code's rule")
    m.add_argument("--queue-size", type=int, default=160,
                   help="|Q| in Sec. 3.2 (official neg_size: 160 = 2.5 x batch; 128 for roberta-large); 0 = SimCSE")
    m.add_argument("--momentum", type=float, default=0.995, help="lambda, the EMA coefficient of Sec. 3.2")
    m.add_argument("--momentum-init", choices=["random", "copy"], default="random",
                   help="start of the momentum encoder: 'random' (official code: its weights are not in the\n"
                        "pretrained checkpoint and stay randomly initialised) or 'copy' of the online encoder")
    m.add_argument("--temp", type=float, default=0.05, help="tau, the temperature of the InfoNCE loss (Sec. 3)")
    m.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm (HF Trainer default of the runs)")
    m.add_argument("--eval-steps", type=int, default=125,
                   help="evaluate on STS-B dev every N steps and at the last step; the best\n"
                        "model is kept, tested and exported; 0 = no dev selection, the last model is")
    m.add_argument("--stsb-path", help="SentEval STSBenchmark folder with sts-dev.csv and sts-test.csv")
    m.add_argument("--sts-dir", help="SentEval STS folder holding STS12-en-test ... STS16-en-test")
    m.add_argument("--sick-path", help="SentEval SICK_test_annotated.txt")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in (sys.argv[1:] if argv is None else argv)
             if str(s).split("=")[0] in a.option_strings}  # flags given on the command line win over the preset
    for k, v in TINY.items() if args.tiny else ():
        if k not in given:
            setattr(args, k, v)
    return args


def check_args(args, world):
    """Every check that depends on the flags and the number of processes only (no file system)."""
    if args.queue_size < 0:
        raise SystemExit(f"error: --queue-size {args.queue_size} is negative; use 0 (SimCSE) or a positive size")
    for name in ("batch_size", "max_seq_length"):
        if getattr(args, name) < (2 if name == "max_seq_length" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)} is too small")
    if args.eval_steps < 0:
        raise SystemExit(f"error: --eval-steps {args.eval_steps} is negative; use 0 to skip dev selection")
    if not 0 <= args.momentum <= 1 or args.temp <= 0 or not 0 <= args.dup_rate < 1:
        raise SystemExit("error: need 0 <= --momentum <= 1, --temp > 0 and 0 <= --dup-rate < 1")
    if args.paper_formula and args.dup_type == "word":
        raise SystemExit("error: --paper-formula changes the subword rule (--dup-type bpe); the word rule of the "
                         "official code already has its max(2, .) floor")
    # the queue keeps the last |Q| rows (official), so it needs no divisibility by the global batch
    common.print0(f"global batch {args.batch_size * world} ({world} x {args.batch_size}), queue {args.queue_size} = "
                  f"{args.queue_size / (args.batch_size * world):.2f} x global batch (paper: 64, 160 = 2.5 x)")


# --- Data ---
# Built-in corpus [inferred]: a sentence fills four slots (who, does what, to what, where); the phrases of a slot
# vary from 1 to 8 words. A test pair sharing k of the 4 slots has gold similarity 5k/4 by construction, and each test
# sentence repeats 0-3 random words (a disfluency), so surface length varies independently of meaning. An encoder
# that averages tokens (what a random transformer does) weighs a slot by its length and is misled by repeated
# words; ESimCSE should weigh slots by what tells sentences apart and ignore repetition (Sec. 3.1's point).
SLOTS = (
    ["he", "she", "a man", "the woman", "an old farmer", "the little girl", "a young man in a red shirt",
     "the tall doctor with glasses", "a child", "the chef", "a police officer on a horse", "my neighbour"],
    ["is cutting", "cuts", "is slowly washing", "paints", "is carrying", "eats", "is trying hard to sell",
     "fixes", "is holding", "throws", "is cleaning up", "draws"],
    ["it", "an onion", "a big red car", "the bicycle", "a chair made of wood", "bread", "a small box of toys",
     "the window", "an apple", "the old boat with a broken sail", "fish", "the front door of the house"],
    ["inside", "on the beach", "at the park", "in the garden behind the house", "outside", "at school",
     "in a small room on the first floor", "near the river", "at the market", "in the forest", "upstairs",
     "at the train station in the city"],
)
SYNTH_TRAIN, SYNTH_TRAIN_TINY, SYNTH_DEV, SYNTH_TEST = 20000, 7680, 500, 1000


def synthetic_sentence(slots):
    return " ".join(SLOTS[i][v] for i, v in enumerate(slots)) + " ."


def synthetic_sentences(n, seed):
    rng = random.Random(seed)
    return [synthetic_sentence([rng.randrange(len(s)) for s in SLOTS]) for _ in range(n)]


def synthetic_pairs(n, seed, max_repeats=3):
    """n sentence pairs sharing k ~ U{0..4} slots, gold = 5k/4 (0-5 like STS); 0-3 words repeated per sentence."""
    rng, s1, s2, gold = random.Random(seed), [], [], []

    def disfluent(slots):
        words = synthetic_sentence(slots).split(" ")
        return " ".join(repeat_at(words, rng.sample(range(len(words) - 1), rng.randint(0, max_repeats))))

    for _ in range(n):
        a = [rng.randrange(len(s)) for s in SLOTS]
        k = rng.randrange(len(SLOTS) + 1)
        shared = set(rng.sample(range(len(SLOTS)), k))
        b = [a[i] if i in shared else rng.choice([v for v in range(len(SLOTS[i])) if v != a[i]])
             for i in range(len(SLOTS))]
        s1.append(disfluent(a))
        s2.append(disfluent(b))
        gold.append(5.0 * k / len(SLOTS))
    return s1, s2, gold


def read_sentences(path):
    """wiki1m format: one sentence per line, UTF-8; blank lines are skipped."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --data {path} does not exist; pass a text file with one sentence per line "
                         "(e.g. wiki1m_for_simcse.txt) or 'synthetic'")
    if os.path.isdir(path):
        raise SystemExit(f"error: --data {path} is a folder; pass the text file itself (one sentence per line)")
    sentences = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise SystemExit(f"error: {path} line {i} is not UTF-8 text; convert the file to UTF-8") from None
            if line:
                sentences.append(line)
    if not sentences:
        raise SystemExit(f"error: {path} holds no sentences; expected one sentence per line")
    return sentences


class SentenceDataset(torch.utils.data.Dataset):
    """Item = (view 0: the sentence's ids, view 1: the same ids after word repetition)."""

    def __init__(self, sentences, tokenizer, args):
        self.sentences, self.tok, self.args = sentences, tokenizer, args

    def __len__(self):
        return len(self.sentences)

    def _ids(self, s):
        return self.tok(s, truncation=True, max_length=self.args.max_seq_length)["input_ids"]

    def __getitem__(self, key):
        index, sample_seed = key
        s, a = self.sentences[index], self.args
        with common.seeded(sample_seed):  # augmentation depends on (seed, epoch, index) only
            ids = self._ids(s)
            if a.dup_type == "word":
                return ids, self._ids(word_level_repetition(s, a.dup_rate, random))
            return ids, word_repetition(ids, a.dup_rate, random, paper_formula=a.paper_formula)


def collate(batch, pad_id):
    """[(ids0, ids1)] -> input_ids, attention_mask, both (B, 2, L), the two views padded to a common L."""
    L = max(len(v) for pair in batch for v in pair)
    ids = torch.full((len(batch), 2, L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), 2, L), dtype=torch.long)
    for i, pair in enumerate(batch):
        for j, v in enumerate(pair):
            ids[i, j, :len(v)] = torch.tensor(v)
            mask[i, j, :len(v)] = 1
    return ids, mask


# --- Model ---
def scratch_tokenizer(sentences, max_words=30000):
    """A BertTokenizer (nothing downloaded): the most frequent words plus every character and '##'+character, so
    that WordPiece can spell any word it has seen the characters of."""
    words, chars = {}, set()
    for s in sentences:
        s = "".join(c for c in unicodedata.normalize("NFD", s.lower()) if unicodedata.category(c) != "Mn")
        for w in re.findall(r"\w+|[^\w\s]", s):
            words[w] = words.get(w, 0) + 1
            chars.update(w)
    top = sorted(words, key=lambda w: (-words[w], w))[:max_words]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(set(top) | chars) + sorted(f"##{c}" for c in chars)
    with tempfile.TemporaryDirectory() as d:  # per process: no race between ranks
        path = os.path.join(d, "vocab.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizer(path)


def build_encoder(args, sentences):
    """Online encoder and tokenizer. The MLP of SimCSE/ESimCSE (Linear(h, h) + Tanh on [CLS], training only) is
    the encoder's pooler layer: same shape, re-initialised (not BERT's NSP pooler), so that the export is a complete
    BertModel/RobertaModel. The sentence embedding is last_hidden_state[:, 0] (cls_before_pooler)."""
    if args.model == "scratch":
        tokenizer = scratch_tokenizer(sentences)
        # initializer_range 0.1, not BERT's 0.02 [inferred]: at 0.02 the [CLS] output of a random small model is
        # almost only its own embedding, dropout noise outweighs the sentence, and training collapses to a constant
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512, initializer_range=0.1, hidden_dropout_prob=args.dropout,
                            attention_probs_dropout_prob=args.dropout)
        encoder = BertModel(config)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            encoder = AutoModel.from_pretrained(args.model, hidden_dropout_prob=args.dropout,
                                                attention_probs_dropout_prob=args.dropout)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load --model {args.model} ({type(e).__name__}); pass a local path "
                             "to a downloaded BERT/RoBERTa, or --model scratch to train a small BERT from scratch"
                             ) from None
    if getattr(encoder, "pooler", None) is None:
        raise SystemExit(f"error: --model {args.model} is not a BERT/RoBERTa encoder with a [CLS] pooler")
    dense = encoder.pooler.dense
    torch.nn.init.normal_(dense.weight, std=encoder.config.initializer_range)
    torch.nn.init.zeros_(dense.bias)
    return encoder, tokenizer


# --- Method ---
def repeat_at(ids, positions):
    """Emit the token at each chosen position twice, adjacently."""
    positions = set(positions)
    out = []
    for i, t in enumerate(ids):
        out.extend([t, t] if i in positions else [t])
    return out


def word_repetition(ids, dup_rate, rng, max_dup=10, paper_formula=False):
    """Sec. 3.1 on subword ids that start and end with special tokens ([CLS] ... [SEP]; <s> ... </s>).
    Official rule (L = len(ids)): no repetition if int(dup_rate*L) == 0, else n ~ randrange(min(10, int(dup_rate*L)))
    distinct positions uniformly from 1..L-2. paper_formula: n ~ randint(0, max(2, int(dup_rate*L))), at most L-2.
    rng: a random.Random or the random module (seeded per sample by the caller)."""
    L = len(ids)
    if paper_formula:
        n = min(rng.randint(0, max(2, int(dup_rate * L))), max(0, L - 2))
    elif int(dup_rate * L) == 0:
        return list(ids)
    else:
        n = rng.randrange(min(max_dup, int(dup_rate * L)))
    return repeat_at(ids, rng.sample(range(1, L - 1), n))


def word_level_repetition(sentence, dup_rate, rng):
    """--dup-type word (Sec. 5.2): repeat whitespace words; the last word is never chosen (official code)."""
    words = sentence.split(" ")
    n = rng.randrange(min(10, len(words), max(2, int(dup_rate * len(words)))))
    return " ".join(repeat_at(words, rng.sample(range(len(words) - 1), n)))


class EmbeddingQueue:
    """FIFO of the last `maxlen` momentum embeddings (Sec. 3.2; official pre_z1): concatenate, keep the last rows.
    The update is `enqueue`, called by train_step after the loss. Identical on every process (gathered keys)."""

    def __init__(self, maxlen, device="cpu"):
        self.maxlen, self.device, self.buf = maxlen, device, None

    def enqueue(self, x):  # x: (b, d)
        x = x.detach().float()
        self.buf = (x if self.buf is None else torch.cat([self.buf, x]))[-self.maxlen:] if self.maxlen else None

    def get(self):  # (n, d), n <= maxlen, oldest first; None while empty
        return self.buf

    def reset(self):
        self.buf = None

    def __len__(self):
        return 0 if self.buf is None else len(self.buf)

    def state_dict(self):
        return {"maxlen": self.maxlen, "buf": None if self.buf is None else self.buf.cpu()}

    def load_state_dict(self, state):
        if state["maxlen"] != self.maxlen:
            raise ValueError(f"checkpoint queue size {state['maxlen']} != --queue-size {self.maxlen}")
        self.buf = None if state["buf"] is None else state["buf"].to(self.device)


def esimcse_loss(z1, z2, queue=None, temp=0.05, offset=0):
    """One-directional InfoNCE of Sec. 3.2 (official: no reverse direction). z1: (B, d) anchors (original view);
    z2: (B', d) positives of the whole global batch (repeated view), row offset+i is the positive of z1[i];
    queue: (Q, d) momentum embeddings or None. Logits (B, B' + Q) = cos / temp, in fp32 even inside autocast:
    at 1/temp = 20 a bf16 matmul would err by ~0.1 in a logit."""
    with torch.autocast(z1.device.type, enabled=False):
        keys = z2.float() if queue is None or len(queue) == 0 else torch.cat([z2.float(), queue.float()])
        logits = F.normalize(z1.float(), dim=-1) @ F.normalize(keys, dim=-1).T / temp  # (B, B' + Q)
        labels = torch.arange(len(z1), device=z1.device) + offset
        return F.cross_entropy(logits, labels)


def train_step(train_model, encoder, momentum, queue, opt, scaler, ids, mask, args, rank, device):
    """One optimiser step of Sec. 3.2 on this process's (B, 2, L) batch; returns the (detached) loss.
    train_model is `encoder` behind DDP / torch.compile; the momentum encoder and the queue stay outside it."""
    B, _, L = ids.shape
    common.ema_update_(momentum, encoder, args.momentum)  # Sec. 3.2; before the keys, as the official code
    with torch.no_grad(), common.autocast(device, args.amp):
        # keys: momentum [CLS] of the un-repeated view through the online MLP, dropout off
        keys = encoder.pooler(momentum(input_ids=ids[:, 0], attention_mask=mask[:, 0]).last_hidden_state)
    flat_ids, flat_mask = ids.view(2 * B, L), mask.view(2 * B, L)
    if args.compile:  # the length changes every batch: one graph with a symbolic length, not one per length
        torch._dynamo.maybe_mark_dynamic(flat_ids, 1)
        torch._dynamo.maybe_mark_dynamic(flat_mask, 1)
    with common.autocast(device, args.amp):
        z = train_model(input_ids=flat_ids, attention_mask=flat_mask).pooler_output
    z = z.view(B, 2, -1)  # (B, 2, d): both views are rows of one batch -> independent dropout masks
    z2 = common.all_gather_with_grad(z[:, 1])  # (world*B, d) positives and in-batch negatives
    loss = esimcse_loss(z[:, 0], z2, queue.get(), args.temp, offset=rank * B)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # DDP averages over processes = the gradient of the global-batch mean
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), args.clip_grad)
    scaler.step(opt)
    scaler.update()
    queue.enqueue(common.concat_all_gather(keys))  # after the loss: a batch never meets its own keys
    return loss.detach()


# --- Evaluation ---
def _fields(path, line, i, n):
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) < n:
        raise SystemExit(f"error: {path} line {i} has {len(cols)} TAB-separated columns, expected {n}")
    return cols


def _score(path, text, i):
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"error: {path} line {i}: gold score {text!r} is not a number") from None


STS_SUBSETS = {  # the subsets SentEval uses for the "all" setting (STS13 SMT is not distributed)
    "STS12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13": ["FNWN", "headlines", "OnWN"],
    "STS14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}


def load_sts(path, fmt):
    """SentEval formats -> (sentences1, sentences2, gold). fmt: 'stsb' (sts-*.csv: TAB-separated, gold in column 4,
    sentences in 5 and 6, extra columns ignored), 'sick' (header line, then pair_ID, A, B, relatedness, ...),
    'sts_year_dir' (STS1x-en-test: STS.input.X.txt 's1<TAB>s2' + STS.gs.X.txt, subsets concatenated = 'all')."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist; see --stsb-path, --sts-dir, --sick-path in --help")
    pairs = []  # (sentence 1, sentence 2, gold)
    if fmt in ("stsb", "sick"):
        col, skip = (4, 0) if fmt == "stsb" else (3, 1)
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if i <= skip or not line.strip():
                    continue
                c = _fields(path, line, i, 7 if fmt == "stsb" else 4)
                a, b = (c[5], c[6]) if fmt == "stsb" else (c[1], c[2])
                pairs.append((a, b, _score(path, c[col], i)))
    else:
        year = os.path.basename(os.path.normpath(path))[:5].upper()
        if year not in STS_SUBSETS:
            raise SystemExit(f"error: {path} is not an STS12-en-test ... STS16-en-test folder")
        for sub in STS_SUBSETS[year]:
            inp, gs = (os.path.join(path, f"STS.{k}.{sub}.txt") for k in ("input", "gs"))
            if not (os.path.exists(inp) and os.path.exists(gs)):
                raise SystemExit(f"error: {path} lacks STS.input.{sub}.txt or STS.gs.{sub}.txt; use SentEval's "
                                 "get_transfer_data.bash layout")
            with open(inp, encoding="utf-8") as f:
                lines = f.read().splitlines()
            with open(gs, encoding="utf-8") as f:
                scores = f.read().splitlines()
            if len(lines) != len(scores):
                raise SystemExit(f"error: {inp} has {len(lines)} lines but {gs} has {len(scores)}")
            for i, (line, g) in enumerate(zip(lines, scores), 1):
                if g.strip():  # SentEval drops pairs without a gold score
                    c = _fields(inp, line, i, 2)
                    pairs.append((c[0], c[1], _score(gs, g, i)))
    if not pairs:
        raise SystemExit(f"error: {path} holds no scored sentence pairs")
    s1, s2, gold = map(list, zip(*pairs))
    return s1, s2, gold


def eval_tasks(args):
    """(dev task for model selection, test tasks) as {name: (s1, s2, gold)}; built-in sets when no path is given."""
    if args.stsb_path:
        for split in ("dev", "test"):
            if not os.path.isfile(os.path.join(args.stsb_path, f"sts-{split}.csv")):
                raise SystemExit(f"error: --stsb-path {args.stsb_path} has no sts-{split}.csv; pass SentEval's "
                                 "STSBenchmark folder")
        dev = {"stsb_dev": load_sts(os.path.join(args.stsb_path, "sts-dev.csv"), "stsb")}
    else:
        dev = {"synthetic_dev": synthetic_pairs(SYNTH_DEV, seed=1)}
    test = {}
    if args.sts_dir:
        for year in STS_SUBSETS:
            test[year.lower()] = load_sts(os.path.join(args.sts_dir, f"{year}-en-test"), "sts_year_dir")
    if args.stsb_path:
        test["stsb"] = load_sts(os.path.join(args.stsb_path, "sts-test.csv"), "stsb")
    if args.sick_path:
        test["sickr"] = load_sts(args.sick_path, "sick")
    return dev, test or {"synthetic": synthetic_pairs(SYNTH_TEST, seed=2)}


def rank_average(x):
    """Ranks 1..n with ties given the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rho = Pearson correlation of average ranks (STS gold has many ties)."""
    rx, ry = rank_average(x), rank_average(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else 0.0


@torch.no_grad()
def encode(encoder, tokenizer, sentences, device, batch_size=128):
    """[CLS] of the last layer without the MLP (cls_before_pooler, mlp_only_train), dropout off -> (N, d).
    In fp32 without autocast, as the official evaluation (the Trainer evaluates outside its autocast). Sentences are whitespace-normalised as SentEval's batcher does; sorted by length only for speed."""
    was_training = encoder.training
    encoder.eval()
    sentences = [" ".join(s.split()) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), encoder.config.hidden_size)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        b = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=512, return_tensors="pt")
        h = encoder(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        out[idx] = h.last_hidden_state[:, 0].float().cpu()
    encoder.train(was_training)
    return out


def eval_sts(encode_fn, tasks):
    """{name: (s1, s2, gold)} -> {name: Spearman x 100 of cosine vs gold}; each STS year is one task in the 'all'
    setting (subsets concatenated by load_sts)."""
    res = {}
    for name, (s1, s2, gold) in tasks.items():
        cos = F.cosine_similarity(encode_fn(s1), encode_fn(s2), dim=-1)
        res[name] = 100 * spearman(cos.numpy(), gold)
    return res


def test_metrics(encoder, tokenizer, tasks, device):
    res = eval_sts(functools.partial(encode, encoder, tokenizer, device=device), tasks)
    return {"sts_avg": sum(res.values()) / len(res), **res}


# --- Train ---
def main(argv=None):
    args = get_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank, world, device = common.setup_distributed()
    check_args(args, world)
    args.amp = args.amp or common.default_amp(device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # a 128-wide model gains little from more threads, and loses much on shared cores
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if args.data == "synthetic":
        sentences = synthetic_sentences(SYNTH_TRAIN_TINY if args.tiny else SYNTH_TRAIN, seed=0)
    else:
        sentences = read_sentences(args.data)
    dev_tasks, test_tasks = eval_tasks(args)

    common.seed_everything(args.seed)  # identical initialisation on every rank
    encoder, tokenizer = build_encoder(args, sentences)
    encoder.to(device)
    # Sec. 3.2: the momentum encoder; its pooler is unused (keys go through the online MLP, as the official code).
    # Official BertForCL/RobertaForCL build it inside the model, and from_pretrained leaves it randomly initialised
    # (its logs: "newly initialized: ['momentum_model.embeddings...']"): --momentum-init random is that default,
    # copy is the MoCo-style start that the paper's text suggests.
    momentum = common.momentum_copy(encoder if args.momentum_init == "copy" else type(encoder)(encoder.config))
    momentum.to(device)
    queue = EmbeddingQueue(args.queue_size, device)
    common.seed_everything(args.seed + rank)

    ds = SentenceDataset(sentences, tokenizer, args)
    sampler = common.ResumableSampler(len(ds), args.batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0,
        collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed))  # else each new iterator draws from the global RNG
    # (dropout's): a run resumed mid-epoch would then draw other dropout masks than an uninterrupted one
    steps_per_epoch = sampler.steps_per_epoch
    total = args.epochs * steps_per_epoch
    lrs = args.lr * (1 - np.arange(total) / total)  # HF Trainer's linear decay, no warmup (official runs)
    opt = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    best = {"metric": -math.inf, "step": 0, "encoder": None}
    epoch, step, metric_init = 0, 0, None

    ck = common.load_checkpoint(ckpt_path, "esimcse", resume=not args.eval_only)  # after the models: RNG
    if ck is not None:
        common.restore(ck, ckpt_path, model=encoder, momentum_model=momentum, queue=queue, optimizer=opt,
                       scaler=scaler)
        epoch, step, best, metric_init = ck["epoch"], ck["step"], ck["best"], ck["metric_init"]
        common.print0(f"resumed from {ckpt_path} at step {step}")
    elif args.eval_only:
        common.print0(f"no checkpoint in {args.output_dir}: evaluating the untrained model")
    stop = total if args.max_steps is None else min(total, args.max_steps)
    if args.tiny and step == 0 and not args.eval_only:  # the random-initialisation baseline of the same run
        metric_init = test_metrics(encoder, tokenizer, test_tasks, device)["sts_avg"]

    def save():
        common.save_checkpoint(ckpt_path, "esimcse", step, {
            "args": vars(args), "model": encoder.state_dict(), "momentum_model": momentum.state_dict(),
            "queue": queue.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best": best, "metric_init": metric_init}, finite=[encoder])

    train_model = common.distribute(encoder, device, args.compile)
    common.print0(f"ESimCSE: {args.model}, {len(ds)} sentences, global batch {args.batch_size * world}, "
                  f"{total} steps, queue {args.queue_size}, device {device}, amp {args.amp}")
    bar = tqdm(total=stop, initial=step, disable=not common.is_main() or args.eval_only or step >= stop)
    t0, seen = time.time(), 0
    while not args.eval_only and step < stop:
        if step == epoch * steps_per_epoch:
            queue.reset()  # official: the queue starts empty at each epoch
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for ids, mask in loader:
            # from_pretrained returns eval mode, and evaluation switches to it: dropout is SimCSE's augmentation.
            # The momentum encoder runs in eval mode (official compute_loss calls model.eval() before it).
            encoder.train()
            momentum.eval()
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lrs[step]
            loss = train_step(train_model, encoder, momentum, queue, opt, scaler, ids, mask, args, rank, device)
            step += 1
            seen += args.batch_size * world
            bar.update()
            if step % args.log_every == 0 or step == stop or step % steps_per_epoch == 0:
                v = (common.all_reduce_sum(loss.float().clone()) / world).item()
                if not math.isfinite(v):
                    raise SystemExit(f"error: loss is {v} at step {step}; the last good checkpoint in "
                                     f"{args.output_dir} is untouched; lower --lr or use --amp none")
                rate = seen / (time.time() - t0)
                t0, seen = time.time(), 0
                bar.set_postfix(loss=f"{v:.4f}")
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "loss": v, "lr": float(lrs[step - 1]),
                                                   "queue": len(queue), "samples_per_s": rate})
            if args.eval_steps and (step % args.eval_steps == 0 or step == total):  # STS-B dev selection (official)
                dev = test_metrics(encoder, tokenizer, dev_tasks, device)["sts_avg"]
                if dev > best["metric"]:
                    best = {"metric": dev, "step": step,
                            "encoder": {k: t.detach().cpu().clone() for k, t in encoder.state_dict().items()}}
                common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "dev": dev,
                                                   "best_dev": best["metric"]})
            if step == stop:
                break
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
            save()
        elif step == stop:
            save()
    bar.close()

    if best["encoder"] is not None:
        encoder.load_state_dict(best["encoder"])
    metrics = test_metrics(encoder, tokenizer, test_tasks, device)
    if best["encoder"] is not None:
        metrics.update(best_dev=best["metric"], best_step=best["step"])
    if metric_init is not None:
        metrics["sts_avg_init"] = metric_init
    common.save_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    common.log_jsonl(args.output_dir, {"step": step, "epoch": epoch, "eval": metrics})
    if common.is_main() and not args.eval_only:
        export = os.path.join(args.output_dir, "encoder")
        encoder.save_pretrained(export)  # AutoModel.from_pretrained(export); embedding = last_hidden_state[:, 0]
        tokenizer.save_pretrained(export)
    common.print0("Spearman x100 (test):", ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if metric_init is not None:
        common.print0(f"sts_avg: untrained {metric_init:.2f} -> trained {metrics['sts_avg']:.2f}")
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
