// xloss::banzhaf_interaction on the CPU (SPEC.md §6; HBI, Jin et al. CVPR 2023): Monte-Carlo Banzhaf
// interaction I[b, i, j] between word i and frame j, every (b, i, j, sample) in one call, parallel over
// (b, i, j) with at::parallel_for (OpenMP), per-thread scratch allocated once per chunk.
//
// Per sample, with A = sampled words (valid, != i) and C = sampled frames (valid, != j), the four values
// f(A ∪ {i}, C ∪ {j}) ("hbi": only the entry (i, j) added, re-softmaxed weights), f(A ∪ {i}, C), f(A, C ∪ {j})
// and f(A, C) share their pieces:
//   * MR[t] = max_{v in C} L[t, v] for t in A ∪ {i} and MC[v] = max_{t in A} L[t, v] for v in C ∪ {j}: each
//     found by walking the row's (column's) valid entries in descending order (sorted once per batch row, NaN
//     first: a NaN in the coalition is its max, as in the reference) until the first member of the coalition:
//     about two steps on average instead of |C| (|A|);
//   * each value is then O(|A| + |C|): weighted sums of those maxima, with the zero of the masked grid added to
//     a max exactly when the coalition misses part of the padded row or column (see with_zero).
// Softmax weights over a coalition use exp(p - max_valid p) precomputed once per batch row when the valid p
// span less than kFastRange (so no coalition's normaliser can underflow), and per-coalition exps otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../banzhaf.h"

namespace xloss {
namespace {

using banzhaf::max_;
using banzhaf::with_zero;

template <typename acc_t>
struct FastRange;
template <>
struct FastRange<float> {
  static constexpr float value = 60.f;  // exp(-60) ~ 1e-26: far from float's underflow at ~1e-38
};
template <>
struct FastRange<double> {
  static constexpr double value = 600.;  // exp(-600) ~ 1e-261: far from double's ~1e-308
};

// Per batch row: valid positions, descending orders of rows and columns, shifted exps of the weights.
template <typename acc_t>
struct Prep {
  int64_t B, T, V;
  std::vector<int32_t> vt, vv;          // [B, T], [B, V]: the valid positions first
  std::vector<int32_t> nvt, nvv;        // [B]
  std::vector<int32_t> row_ord;         // [B, T, V]: valid columns of row t, by L[t, .] descending
  std::vector<int32_t> col_ord;         // [B, V, T]: valid rows of column v, by L[., v] descending
  std::vector<acc_t> ep, eq;            // [B, T], [B, V]: exp(p - max valid p), exp(q - max valid q)
  std::vector<uint8_t> fast_t, fast_v;  // [B]: the precomputed exps may be used
};

template <typename acc_t>
void prepare(Prep<acc_t>& pr, const acc_t* L, const acc_t* P, const acc_t* Q, const bool* TM, const bool* VM) {
  const int64_t B = pr.B, T = pr.T, V = pr.V;
  pr.vt.assign(B * T, 0);
  pr.vv.assign(B * V, 0);
  pr.nvt.assign(B, 0);
  pr.nvv.assign(B, 0);
  pr.row_ord.assign(B * T * V, 0);
  pr.col_ord.assign(B * V * T, 0);
  pr.ep.assign(B * T, acc_t(0));
  pr.eq.assign(B * V, acc_t(0));
  pr.fast_t.assign(B, 0);
  pr.fast_v.assign(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* Lb = L + b * T * V;
      int32_t* vt = pr.vt.data() + b * T;
      int32_t* vv = pr.vv.data() + b * V;
      int32_t nt = 0, nv = 0;
      for (int64_t t = 0; t < T; ++t)
        if (TM[b * T + t]) vt[nt++] = static_cast<int32_t>(t);
      for (int64_t v = 0; v < V; ++v)
        if (VM[b * V + v]) vv[nv++] = static_cast<int32_t>(v);
      pr.nvt[b] = nt;
      pr.nvv[b] = nv;
      for (int32_t k = 0; k < nt; ++k) {
        const int64_t t = vt[k];
        int32_t* o = pr.row_ord.data() + (b * T + t) * V;
        std::copy(vv, vv + nv, o);
        std::stable_sort(o, o + nv,
                         [&](int32_t x, int32_t y) { return banzhaf::before(Lb[t * V + x], Lb[t * V + y]); });
      }
      for (int32_t k = 0; k < nv; ++k) {
        const int64_t v = vv[k];
        int32_t* o = pr.col_ord.data() + (b * V + v) * T;
        std::copy(vt, vt + nt, o);
        std::stable_sort(o, o + nt,
                         [&](int32_t x, int32_t y) { return banzhaf::before(Lb[x * V + v], Lb[y * V + v]); });
      }
      auto shifted = [](const acc_t* w, const int32_t* idx, int32_t n, acc_t* e) -> bool {
        if (n == 0) return true;
        acc_t hi = -std::numeric_limits<acc_t>::infinity(), lo = std::numeric_limits<acc_t>::infinity();
        for (int32_t k = 0; k < n; ++k) {
          hi = max_(hi, w[idx[k]]);
          lo = std::min(lo, w[idx[k]]);
        }
        for (int32_t k = 0; k < n; ++k) e[idx[k]] = std::exp(w[idx[k]] - hi);
        return std::isfinite(hi) && std::isfinite(lo) && hi - lo <= FastRange<acc_t>::value;
      };
      pr.fast_t[b] = shifted(P + b * T, vt, nt, pr.ep.data() + b * T);
      pr.fast_v[b] = shifted(Q + b * V, vv, nv, pr.eq.data() + b * V);
    }
  });
}

// Softmax pieces of one side (words or frames) for a coalition X and its extension X ∪ {k}:
// weights ew[x] / Z over X, and (s·ew[x], ek) / (s·Z + ek) over X ∪ {k}.
template <typename acc_t>
struct Side {
  acc_t Z;   // Σ_{x in X} ew[x]
  acc_t s;   // rescale of ew for X ∪ {k}
  acc_t ek;  // weight numerator of k in X ∪ {k}
};

template <typename acc_t>
Side<acc_t> side_weights(const acc_t* w, const acc_t* e_pre, bool fast, const int32_t* list, int32_t n, int64_t k,
                         acc_t* ew) {
  Side<acc_t> sd;
  if (fast) {
    acc_t Z = 0;
    for (int32_t a = 0; a < n; ++a) {
      ew[list[a]] = e_pre[list[a]];
      Z += e_pre[list[a]];
    }
    sd.Z = Z;
    sd.s = acc_t(1);
    sd.ek = e_pre[k];
    return sd;
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int32_t a = 0; a < n; ++a) m = max_(m, w[list[a]]);
  acc_t Z = 0;
  for (int32_t a = 0; a < n; ++a) {
    const acc_t e = std::exp(w[list[a]] - m);
    ew[list[a]] = e;
    Z += e;
  }
  const acc_t m2 = max_(m, w[k]);
  sd.Z = Z;
  sd.s = n > 0 ? std::exp(m - m2) : acc_t(0);
  sd.ek = std::exp(w[k] - m2);
  return sd;
}

// HBI's f(S ∪ {i, j}) weights: softmax over X ∪ {k} of (ew[x] / Z for x in X, raw w[k] at k); returns
// (Σ_x e'_x r[x] + e'_k rk) / (Σ_x e'_x + e'_k).
template <typename acc_t>
acc_t hbi_side(const acc_t* ew, acc_t Z, const int32_t* list, int32_t n, const acc_t* r, acc_t wk, acc_t rk) {
  acc_t m = wk;
  for (int32_t a = 0; a < n; ++a) m = max_(m, ew[list[a]] / Z);
  acc_t num = 0, den = 0;
  for (int32_t a = 0; a < n; ++a) {
    const acc_t e = std::exp(ew[list[a]] / Z - m);
    num += e * r[list[a]];
    den += e;
  }
  const acc_t e = std::exp(wk - m);
  return (num + e * rk) / (den + e);
}

template <typename acc_t>
void banzhaf_cpu_kernel(const acc_t* L, const acc_t* P, const acc_t* Q, const bool* TM, const bool* VM,
                        const uint8_t* coal, int64_t B, int64_t T, int64_t V, int64_t S, int64_t seed, bool hbi,
                        acc_t* out) {
  Prep<acc_t> pr;
  pr.B = B;
  pr.T = T;
  pr.V = V;
  prepare(pr, L, P, Q, TM, VM);
  const banzhaf::Key key = banzhaf::make_key(seed);
  const int64_t E = T + V, W = (E + 31) / 32;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 256 / S);

  at::parallel_for(0, B * T * V, grain, [&](int64_t begin, int64_t end) {
    // Scratch of this chunk: no allocation per coalition.
    std::vector<uint8_t> inA(T, 0), inC(V, 0);
    std::vector<int32_t> listA(T), listC(V);
    std::vector<acc_t> MR(T), MC(V), ewA(T), ewC(V), rA(T), cC(V);
    std::vector<uint32_t> words(W);
    for (int64_t flat = begin; flat < end; ++flat) {
      const int64_t b = flat / (T * V), i = (flat / V) % T, j = flat % V;
      if (!TM[b * T + i] || !VM[b * V + j]) {
        out[flat] = 0;
        continue;
      }
      const acc_t* Lb = L + b * T * V;
      const acc_t* Pb = P + b * T;
      const acc_t* Qb = Q + b * V;
      const int32_t* vt = pr.vt.data() + b * T;
      const int32_t* vv = pr.vv.data() + b * V;
      const int32_t nvt = pr.nvt[b], nvv = pr.nvv[b];
      const acc_t Lij = Lb[i * V + j];
      auto row_max = [&](int64_t t) -> acc_t {  // max_{v in C} L[t, v], -inf for an empty C
        const int32_t* o = pr.row_ord.data() + (b * T + t) * V;
        for (int32_t k = 0; k < nvv; ++k)
          if (inC[o[k]]) return Lb[t * V + o[k]];
        return ninf;
      };
      auto col_max = [&](int64_t v) -> acc_t {  // max_{t in A} L[t, v]
        const int32_t* o = pr.col_ord.data() + (b * V + v) * T;
        for (int32_t k = 0; k < nvt; ++k)
          if (inA[o[k]]) return Lb[o[k] * V + v];
        return ninf;
      };
      acc_t total = 0;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t idx = flat * S + s;
        const uint8_t* cbits = coal ? coal + idx * E : nullptr;
        if (!coal)
          for (int64_t w = 0; w < W; ++w) words[w] = banzhaf::word(key, static_cast<uint64_t>(idx * W + w));
        auto bit = [&](int64_t e) -> bool { return cbits ? cbits[e] != 0 : ((words[e >> 5] >> (e & 31)) & 1U); };
        int32_t nA = 0, nC = 0;
        for (int32_t k = 0; k < nvt; ++k) {
          const int32_t t = vt[k];
          const bool in = t != i && bit(t);
          inA[t] = in;
          if (in) listA[nA++] = t;
        }
        for (int32_t k = 0; k < nvv; ++k) {
          const int32_t v = vv[k];
          const bool in = v != j && bit(T + v);
          inC[v] = in;
          if (in) listC[nC++] = v;
        }
        // Zeros of the masked grid: a row over C ∪ {j} (column over A ∪ {i}) misses one iff it is not full.
        const bool zr1 = nC + 1 < V, zc1 = nA + 1 < T;
        const Side<acc_t> st = side_weights(Pb, pr.ep.data() + b * T, pr.fast_t[b], listA.data(), nA, i, ewA.data());
        const Side<acc_t> sv = side_weights(Qb, pr.eq.data() + b * V, pr.fast_v[b], listC.data(), nC, j, ewC.data());
        acc_t SA = 0, SAj = 0, SC = 0, SCi = 0;
        for (int32_t a = 0; a < nA; ++a) {
          const int32_t t = listA[a];
          const acc_t m = row_max(t);
          rA[t] = max_(m, acc_t(0));  // j is not in C: the row always has a zero
          SA += ewA[t] * rA[t];
          SAj += ewA[t] * with_zero(max_(m, Lb[t * V + j]), zr1);
        }
        for (int32_t c = 0; c < nC; ++c) {
          const int32_t v = listC[c];
          const acc_t m = col_max(v);
          cC[v] = max_(m, acc_t(0));  // i is not in A: the column always has a zero
          SC += ewC[v] * cC[v];
          SCi += ewC[v] * with_zero(max_(m, Lb[i * V + v]), zc1);
        }
        const acc_t MRi = row_max(i), MCj = col_max(j);
        const acc_t tA = nA ? SA / st.Z : acc_t(0), tAj = nA ? SAj / st.Z : acc_t(0);
        const acc_t vC = nC ? SC / sv.Z : acc_t(0), vCi = nC ? SCi / sv.Z : acc_t(0);
        const acc_t f_ts = acc_t(0.5) * (tA + vC);                                                   // f(A, C)
        const acc_t f_is = acc_t(0.5) * ((st.s * SA + st.ek * max_(MRi, acc_t(0))) / (st.s * st.Z + st.ek) + vCi);
        const acc_t f_js = acc_t(0.5) * (tAj + (sv.s * SC + sv.ek * max_(MCj, acc_t(0))) / (sv.s * sv.Z + sv.ek));
        acc_t f_ij;
        if (hbi) {
          // Only the entry (i, j) is added: row i and column j hold L[i, j] and zeros.
          const acc_t ri = V > 1 ? max_(Lij, acc_t(0)) : Lij, cj = T > 1 ? max_(Lij, acc_t(0)) : Lij;
          f_ij = acc_t(0.5) * (hbi_side(ewA.data(), st.Z, listA.data(), nA, rA.data(), Pb[i], ri) +
                               hbi_side(ewC.data(), sv.Z, listC.data(), nC, cC.data(), Qb[j], cj));
        } else {
          const acc_t ri = with_zero(max_(MRi, Lij), zr1), cj = with_zero(max_(MCj, Lij), zc1);
          f_ij = acc_t(0.5) * ((st.s * SAj + st.ek * ri) / (st.s * st.Z + st.ek) +
                               (sv.s * SCi + sv.ek * cj) / (sv.s * sv.Z + sv.ek));
        }
        total += f_ij - f_is - f_js + f_ts;
      }
      out[flat] = total / static_cast<acc_t>(S);
    }
  });
}

at::Tensor banzhaf_interaction_cpu(const at::Tensor& sim, const at::Tensor& text_weight, const at::Tensor& video_weight,
                                   const at::Tensor& text_mask, const at::Tensor& video_mask, int64_t num_samples,
                                   int64_t seed, const c10::optional<at::Tensor>& coalitions, c10::string_view mode) {
  banzhaf::check_args(sim, text_weight, video_weight, text_mask, video_mask, num_samples, coalitions, mode);
  TORCH_CHECK(sim.device().is_cpu(), "banzhaf_interaction (CPU): sim must be a CPU tensor, got ", sim.device());
  const int64_t B = sim.size(0), T = sim.size(1), V = sim.size(2);
  // fp64 computes in fp64; every other floating dtype in fp32.
  const at::ScalarType acc = sim.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor L = sim.to(acc).contiguous(), P = text_weight.to(acc).contiguous(),
                   Q = video_weight.to(acc).contiguous();
  const at::Tensor TM = text_mask.contiguous(), VM = video_mask.contiguous();
  at::Tensor C;
  if (coalitions.has_value()) C = coalitions->to(at::kByte).contiguous();
  at::Tensor out = at::empty({B, T, V}, L.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "banzhaf_interaction_cpu", [&] {
    banzhaf_cpu_kernel<scalar_t>(L.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(),
                                 TM.data_ptr<bool>(), VM.data_ptr<bool>(), C.defined() ? C.data_ptr<uint8_t>() : nullptr,
                                 B, T, V, num_samples, seed, mode == "hbi", out.data_ptr<scalar_t>());
  });
  return out.to(sim.scalar_type());
}

}  // namespace
}  // namespace xloss

TORCH_LIBRARY_IMPL(xloss, CPU, m) {
  m.impl("banzhaf_interaction", &xloss::banzhaf_interaction_cpu);
}
