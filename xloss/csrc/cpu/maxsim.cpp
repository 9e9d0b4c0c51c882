// xloss::maxsim_q2d, CPU: query→document late-interaction (ColBERT MaxSim) scores with a register-blocked
// micro-kernel, never a similarity tile in memory.
//
// For a query a and a document b, S_ab = Σ_t q_w[a,t] · max_v <q_at, d_bv>.  The query's tokens are packed
// once, transposed and zero-padded to the vector width W: qT[chunk][k][lane] (token chunk·W + lane, feature
// k).  The micro-kernel keeps MQ chunks × NR document tokens of accumulators in registers; for every feature k
// it loads MQ query vectors and broadcasts NR document scalars d[v, k] (documents stay in their natural
// [Ld, D] layout).  After the D loop, each accumulator holds <q_t, d_v> for W query tokens at once, so the max
// over document tokens is a vertical max (and a compare + blend for the arg-max): no horizontal reduction,
// no similarity buffer.
//
// Masks (d_valid): per document, `end` = 1 + the last valid token and `dense` = every token before `end` is
// valid (a prefix mask, the ragged case).  Only tokens < end are touched, so a padded batch of ragged
// documents costs its valid tokens only.  exclude mode: invalid tokens never win (skipped); zero mode
// (PyLate): an invalid token scores exactly 0 and competes, at its own index; only the first invalid one can
// win (ties go to the lowest index), so for a prefix mask one 0-candidate at index `end` is enough.  Invalid
// query tokens get max 0 and index -1 (see the padding contract below).  A query token with no candidate at
// all (exclude mode, no valid document token) gets max 0 and index -1.
//
// No packed-documents API: a padded batch with a prefix mask already costs only its valid tokens (the padding
// is never read), so packing would save memory, not time.
//
// Ties: the update is a strict `>` in increasing token order, so the lowest index wins (torch.max).  NaN and
// inf propagate exactly as torch.max does them: a NaN similarity wins over everything and keeps its place (the
// first NaN's index), and a max over valid tokens that are all -inf is -inf (with AUX, at the first of them).
// Whether a token has any candidate at all is known from the masks, never from the value.
//
// Padding contract: a masked-out query token is never computed into anything: value 0, index -1, and nothing
// added to the score (not 0·max: its max may be NaN or inf when a valid document token is non-finite).
// Aligned pairs (pairs=True): query a // group against document a, Nd = Nq·group (group=1: Nq == Nd; more:
// the grouped layout, each query against its own `group` documents, the queries packed once, never repeated).
// Accumulation: fp32 for fp32/bf16/fp16 inputs (half documents are converted per document into a
// thread-local buffer), fp64 for fp64.  Outputs, as cpu.maxsim_fwd's q2d part: scores [Nq, Nd] (or [N] for
// aligned pairs), and with need_aux the arg-max indices (int16, int32 beyond 32767 document tokens) and the
// maxima, [Nq, Nd, Lq] (or [N, Lq]); otherwise empty tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;  // AVX2 (two SSE registers per vector elsewhere: still correct)
#endif
constexpr int kMQ = 2;  // query chunks per register block
constexpr int kNR = 6;  // document tokens per register block: 12 accumulators + 2 query vectors + 1 broadcast

template <typename A>
struct Vec {
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(A));
  typedef A V __attribute__((vector_size(kVecBytes)));
  typedef decltype(V{} > V{}) M;  // the comparison mask: integer lanes of sizeof(A) bytes
};

// Everything of one query against one document that the kernel needs.
template <typename A>
struct Job {
  const A* qT;       // packed query [nchunk][D][W]
  int64_t nchunk;
  const A* doc;      // document rows [Ld, D] in the accumulation dtype
  const bool* dval;  // document mask [Ld]
  int64_t end;       // 1 + last valid token (0: none)
  bool dense;        // all tokens < end valid
  bool found;        // some token is a candidate (a valid one; any one in zero mode)
  int64_t ld;        // document length (padded)
  int64_t dim;
  bool zero_mode;
};

// Accumulators of MQ query chunks × NR document tokens starting at `drow`, over all features.
template <typename A, int MQ, int NR>
inline void dot_block(const A* qp, int64_t dim, const A* drow, typename Vec<A>::V (&acc)[MQ][NR]) {
  using V = typename Vec<A>::V;
  constexpr int W = Vec<A>::W;
  for (int m = 0; m < MQ; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = V{};
  const int64_t cstride = dim * W;
  for (int64_t k = 0; k < dim; ++k) {
    V qv[MQ];
    for (int m = 0; m < MQ; ++m) std::memcpy(&qv[m], qp + m * cstride + k * W, sizeof(V));
    for (int j = 0; j < NR; ++j) {
      // Broadcast.  s - 0 (not s + 0, which is no identity for -0.0) folds to a plain vbroadcastss.
      const V b = drow[j * dim + k] - V{};
      for (int m = 0; m < MQ; ++m) acc[m][j] += qv[m] * b;
    }
  }
}

// Running max (and arg-max) update with candidate `cand` at token index v, visited in increasing v.
template <typename A, bool AUX>
inline void update(typename Vec<A>::V& best, typename Vec<A>::M& arg, typename Vec<A>::V cand, int64_t v) {
  using M = typename Vec<A>::M;
  using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;  // the lanes of M
  // Strictly greater (ties keep the lower index), or the first NaN (torch.max propagates it).
  M take = (cand > best) | ((cand != cand) & (best == best));
  if (AUX) {
    take |= arg == (M{} - 1);  // the first candidate always counts: an all -inf max sits at its first token
    arg = take ? (M{} + static_cast<I>(v)) : arg;
  }
  best = take ? cand : best;
}

// One group of MQ query chunks (starting at chunk c0) against the whole document: best/arg per lane.
template <typename A, int MQ, bool AUX>
void group(const Job<A>& job, int64_t c0, typename Vec<A>::V (&best)[MQ], typename Vec<A>::M (&arg)[MQ]) {
  using V = typename Vec<A>::V;
  using M = typename Vec<A>::M;
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int m = 0; m < MQ; ++m) {
    best[m] = V{} + ninf;
    arg[m] = M{} - 1;
  }
  const A* qp = job.qT + c0 * job.dim * Vec<A>::W;
  const V zero = V{};
  int64_t v0 = 0;
  auto consume = [&](auto& acc, int nr) {
    for (int j = 0; j < nr; ++j) {
      const int64_t v = v0 + j;
      if (!job.dense && !job.dval[v]) {
        if (!job.zero_mode) continue;  // exclude: never wins
        for (int m = 0; m < MQ; ++m) update<A, AUX>(best[m], arg[m], zero, v);  // zero: scores 0
        continue;
      }
      for (int m = 0; m < MQ; ++m) update<A, AUX>(best[m], arg[m], acc[m][j], v);
    }
  };
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(A));  // elements per cache line
  for (; v0 + kNR <= job.end; v0 += kNR) {
    // Prefetch the next block's rows: the kernel reads kNR rows a scalar at a time, too slow a stream per row
    // for the hardware prefetcher to hide DRAM latency on a document's first pass (measured single-threaded,
    // 1000 documents of 300 tokens streaming from memory: 37 → 62 GFLOP/s; ~80 when they sit in cache).
    const int64_t next = std::min(job.end, v0 + 2 * kNR);
    for (const A* p = job.doc + (v0 + kNR) * job.dim; p < job.doc + next * job.dim; p += kLine)
      __builtin_prefetch(p, 0, 3);
    V acc[MQ][kNR];
    dot_block<A, MQ, kNR>(qp, job.dim, job.doc + v0 * job.dim, acc);
    consume(acc, kNR);
  }
  for (; v0 < job.end; ++v0) {
    V acc[MQ][1];
    dot_block<A, MQ, 1>(qp, job.dim, job.doc + v0 * job.dim, acc);
    consume(acc, 1);
  }
  if (job.zero_mode && job.end < job.ld) {
    // Tokens from `end` on are all invalid and score 0: the first of them is the only one that can win.
    for (int m = 0; m < MQ; ++m) update<A, AUX>(best[m], arg[m], zero, job.end);
  }
}

// One query (lq tokens, mask qv) against one document: writes the score, and the maxima/indices when AUX.
template <typename A, bool AUX, typename I>
void pair_scores(const Job<A>& job, int64_t lq, const bool* qv, const A* qw, A* score, A* val, I* idx) {
  using V = typename Vec<A>::V;
  using M = typename Vec<A>::M;
  constexpr int W = Vec<A>::W;
  A total = 0;
  auto emit = [&](int64_t c0, int nm, V* best, M* arg) {
    for (int m = 0; m < nm; ++m) {
      for (int l = 0; l < W; ++l) {
        const int64_t t = (c0 + m) * W + l;
        if (t >= lq) break;
        // A masked-out query token, or no candidate at all: 0, no gradient, nothing added to the score.
        const bool none = !qv[t] || !job.found;
        const A b = none ? A(0) : best[m][l];
        if (!none) total += qw[t] * b;
        if (AUX) {
          val[t] = b;
          idx[t] = none ? static_cast<I>(-1) : static_cast<I>(arg[m][l]);
        }
      }
    }
  };
  int64_t c0 = 0;
  for (; c0 + kMQ <= job.nchunk; c0 += kMQ) {
    V best[kMQ];
    M arg[kMQ];
    group<A, kMQ, AUX>(job, c0, best, arg);
    emit(c0, kMQ, best, arg);
  }
  for (; c0 < job.nchunk; ++c0) {
    V best[1];
    M arg[1];
    group<A, 1, AUX>(job, c0, best, arg);
    emit(c0, 1, best, arg);
  }
  *score = total;
}

template <typename T, typename A, typename I>
void run(const at::Tensor& q, const at::Tensor& d, const at::Tensor& q_w, const at::Tensor& q_valid,
         const at::Tensor& d_valid, bool zero_mode, bool pairs, int64_t group, bool need_aux, at::Tensor& scores,
         at::Tensor& val, at::Tensor& idx) {
  constexpr int W = Vec<A>::W;
  const int64_t nq = q.size(0), lq = q.size(1), dim = q.size(2);
  const int64_t nd = d.size(0), ld = d.size(1);
  const int64_t nchunk = (lq + W - 1) / W;
  const T* qp = q.data_ptr<T>();
  const T* dp = d.data_ptr<T>();
  const bool* qv = q_valid.data_ptr<bool>();
  const bool* dv = d_valid.data_ptr<bool>();
  const A* qwp = q_w.data_ptr<A>();
  A* sp = scores.data_ptr<A>();
  A* vp = need_aux ? val.data_ptr<A>() : nullptr;
  I* ip = need_aux ? idx.data_ptr<I>() : nullptr;

  // Document extents, once: 1 + last valid token, and whether the valid tokens form a prefix.
  std::vector<int64_t> end(nd);
  std::vector<char> dense(nd);
  at::parallel_for(0, nd, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* m = dv + b * ld;
      int64_t e = ld, count = 0;
      while (e > 0 && !m[e - 1]) --e;
      for (int64_t v = 0; v < e; ++v) count += m[v];
      end[b] = e;
      dense[b] = count == e;
    }
  });

  // Packed queries qT[a][chunk][k][lane], zero-padded; masked-out tokens stay zeros (their lanes are settled in
  // emit, whatever they compute).
  const int64_t qstride = nchunk * dim * W;
  std::vector<A> packed(static_cast<size_t>(nq * qstride), A(0));
  at::parallel_for(0, nq, 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      A* out = packed.data() + a * qstride;
      for (int64_t t = 0; t < lq; ++t) {
        if (!qv[a * lq + t]) continue;  // never read: its entries are settled in emit
        const T* row = qp + (a * lq + t) * dim;
        A* col = out + (t / W) * dim * W + (t % W);
        for (int64_t k = 0; k < dim; ++k) col[k * W] = static_cast<A>(row[k]);
      }
    }
  });

  constexpr bool kConvert = !std::is_same<T, A>::value;
  // Work items: (document, block of queries), document-major so that a thread reuses a document from cache.
  const int64_t qblock = pairs ? 1 : std::max<int64_t>(1, std::min<int64_t>(nq, 16));
  const int64_t nqb = pairs ? 1 : (nq + qblock - 1) / qblock;
  const int64_t items = pairs ? nd : nd * nqb;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<A> buf(kConvert ? static_cast<size_t>(ld * dim) : 0);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = pairs ? it : it / nqb;
      const int64_t a0 = pairs ? it / group : (it % nqb) * qblock;  // pairs: query it/group meets document it
      const int64_t a1 = pairs ? a0 + 1 : std::min(nq, a0 + qblock);
      const T* drow = dp + b * ld * dim;
      const A* doc;
      if constexpr (kConvert) {
        const int64_t n = end[b] * dim;  // only the tokens the kernel reads
        for (int64_t x = 0; x < n; ++x) buf[x] = static_cast<A>(drow[x]);
        doc = buf.data();
      } else {
        doc = drow;
      }
      const bool found = zero_mode ? ld > 0 : end[b] > 0;
      Job<A> job{nullptr, nchunk, doc, dv + b * ld, end[b], static_cast<bool>(dense[b]), found, ld, dim,
                 zero_mode};
      for (int64_t a = a0; a < a1; ++a) {
        job.qT = packed.data() + a * qstride;
        const int64_t o = pairs ? b : a * nd + b;  // output row
        const bool* qva = qv + a * lq;
        if (need_aux) {
          pair_scores<A, true, I>(job, lq, qva, qwp + a * lq, sp + o, vp + o * lq, ip + o * lq);
        } else {
          pair_scores<A, false, I>(job, lq, qva, qwp + a * lq, sp + o, nullptr, nullptr);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> maxsim_q2d(const at::Tensor& q, const at::Tensor& d,
                                                          const at::Tensor& q_w, const at::Tensor& q_valid,
                                                          const at::Tensor& d_valid, bool zero_mode, bool pairs,
                                                          bool need_aux, int64_t group) {
  TORCH_CHECK(q.device().is_cpu() && d.device().is_cpu() && q_w.device().is_cpu() && q_valid.device().is_cpu() &&
                  d_valid.device().is_cpu(),
              "xloss::maxsim_q2d: q, d, q_w, q_valid and d_valid must be CPU tensors");
  TORCH_CHECK(q.dim() == 3, "xloss::maxsim_q2d: q must be [Nq, Lq, D], got ", q.sizes());
  TORCH_CHECK(d.dim() == 3, "xloss::maxsim_q2d: d must be [Nd, Ld, D], got ", d.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "xloss::maxsim_q2d: q must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(d.scalar_type() == st, "xloss::maxsim_q2d: d must have q's dtype ", st, ", got ", d.scalar_type());
  TORCH_CHECK(q.size(2) == d.size(2), "xloss::maxsim_q2d: q and d must have the same feature dimension D, got q ",
              q.sizes(), " and d ", d.sizes());
  const int64_t nq = q.size(0), lq = q.size(1), nd = d.size(0), ld = d.size(1);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(q_w.scalar_type() == acc, "xloss::maxsim_q2d: q_w must have the accumulation dtype ", acc, ", got ",
              q_w.scalar_type());
  TORCH_CHECK(q_w.dim() == 2 && q_w.size(0) == nq && q_w.size(1) == lq,
              "xloss::maxsim_q2d: q_w must be [Nq, Lq] = [", nq, ", ", lq, "], got ", q_w.sizes());
  TORCH_CHECK(q_valid.scalar_type() == at::kBool && q_valid.dim() == 2 && q_valid.size(0) == nq &&
                  q_valid.size(1) == lq,
              "xloss::maxsim_q2d: q_valid must be a bool [Nq, Lq] = [", nq, ", ", lq, "] tensor, got ",
              q_valid.scalar_type(), " ", q_valid.sizes());
  TORCH_CHECK(d_valid.scalar_type() == at::kBool && d_valid.dim() == 2 && d_valid.size(0) == nd &&
                  d_valid.size(1) == ld,
              "xloss::maxsim_q2d: d_valid must be a bool [Nd, Ld] = [", nd, ", ", ld, "] tensor, got ",
              d_valid.scalar_type(), " ", d_valid.sizes());
  TORCH_CHECK(group >= 1, "xloss::maxsim_q2d: group must be at least 1, got ", group);
  TORCH_CHECK(!pairs || group != 1 || nq == nd, "xloss::maxsim_q2d: pairs=True needs as many queries as "
              "documents, got q ", q.sizes(), " and d ", d.sizes());
  TORCH_CHECK(!pairs || nq * group == nd, "xloss::maxsim_q2d: pairs=True with group=", group, " needs ", group,
              " documents per query, got q ", q.sizes(), " and d ", d.sizes());

  const auto qc = q.contiguous(), dc = d.contiguous(), qwc = q_w.contiguous();
  const auto qvc = q_valid.contiguous(), dvc = d_valid.contiguous();
  const auto opts = q.options().dtype(acc);
  const bool wide = ld > 32767;  // index dtype of cpu.index_dtype
  at::Tensor scores = pairs ? at::empty({nd}, opts) : at::empty({nq, nd}, opts);
  at::Tensor val, idx;
  if (need_aux) {
    auto shape = pairs ? std::vector<int64_t>{nd, lq} : std::vector<int64_t>{nq, nd, lq};
    val = at::empty(shape, opts);
    idx = at::empty(shape, q.options().dtype(wide ? at::kInt : at::kShort));
  } else {
    val = at::empty({0}, opts);
    idx = at::empty({0}, q.options().dtype(wide ? at::kInt : at::kShort));
  }
  if (scores.numel() == 0) return {scores, idx, val};

#define XLOSS_MAXSIM_RUN(T, A)                                                                               \
  do {                                                                                                     \
    if (wide)                                                                                              \
      run<T, A, int32_t>(qc, dc, qwc, qvc, dvc, zero_mode, pairs, group, need_aux, scores, val, idx);       \
    else                                                                                                   \
      run<T, A, int16_t>(qc, dc, qwc, qvc, dvc, zero_mode, pairs, group, need_aux, scores, val, idx);       \
  } while (0)
  switch (st) {
    case at::kFloat: XLOSS_MAXSIM_RUN(float, float); break;
    case at::kDouble: XLOSS_MAXSIM_RUN(double, double); break;
    case at::kBFloat16: XLOSS_MAXSIM_RUN(at::BFloat16, float); break;
    default: XLOSS_MAXSIM_RUN(at::Half, float); break;
  }
#undef XLOSS_MAXSIM_RUN
  return {scores, idx, val};
}

}  // namespace

TORCH_LIBRARY_IMPL(xloss, CPU, m) { m.impl("maxsim_q2d", &maxsim_q2d); }
