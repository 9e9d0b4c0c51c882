// xloss::banzhaf_interaction on CUDA (SPEC.md §6): a straightforward mirror of cpu/banzhaf.cpp, one launch for
// the whole batch, one thread per (b, i, j) looping over its samples (so the mean needs no atomics and is
// deterministic).  Same coalition bits (banzhaf.h), same combination of the four coalition values; what
// differs is only how the pieces are found: the row and column maxima by a plain scan of the coalition (no
// sorted orders) and the softmax weights always with per-coalition exps.  It compiles in CI
// (tools/check_cuda_compiles.py) but no GPU was at hand when it was written: it is tested only where a GPU is.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../banzhaf.h"

namespace xloss {
namespace {

using banzhaf::max_;
using banzhaf::with_zero;

constexpr int kThreads = 128;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }

template <typename acc_t>
__global__ void banzhaf_kernel(const acc_t* __restrict__ L, const acc_t* __restrict__ P, const acc_t* __restrict__ Q,
                               const bool* __restrict__ TM, const bool* __restrict__ VM,
                               const uint8_t* __restrict__ coal, uint8_t* __restrict__ ws, int64_t B, int64_t T,
                               int64_t V, int64_t S, banzhaf::Key key, bool hbi, acc_t* __restrict__ out) {
  const int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (flat >= B * T * V) return;
  const int64_t b = flat / (T * V), i = (flat / V) % T, j = flat % V;
  if (!TM[b * T + i] || !VM[b * V + j]) {
    out[flat] = acc_t(0);
    return;
  }
  const int64_t E = T + V, W = (E + 31) / 32;
  const acc_t ninf = static_cast<acc_t>(-INFINITY);
  const acc_t* Lb = L + b * T * V;
  const acc_t* Pb = P + b * T;
  const acc_t* Qb = Q + b * V;
  const bool* TMb = TM + b * T;
  const bool* VMb = VM + b * V;
  uint8_t* inA = ws + flat * E;  // this thread's membership flags: words, then frames
  uint8_t* inC = inA + T;
  const acc_t Lij = Lb[i * V + j];
  acc_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t idx = flat * S + s;
    uint32_t w = 0;
    int32_t nA = 0, nC = 0;
    for (int64_t e = 0; e < E; ++e) {
      bool bit;
      if (coal) {
        bit = coal[idx * E + e] != 0;
      } else {
        if ((e & 31) == 0) w = banzhaf::word(key, static_cast<uint64_t>(idx * W + (e >> 5)));
        bit = (w >> (e & 31)) & 1U;
      }
      if (e < T) {
        inA[e] = bit && TMb[e] && e != i;
        nA += inA[e];
      } else {
        inC[e - T] = bit && VMb[e - T] && e - T != j;
        nC += inC[e - T];
      }
    }
    const bool zr1 = nC + 1 < V, zc1 = nA + 1 < T;
    // Softmax pieces over A (and A ∪ {i}), C (and C ∪ {j}), as cpu/banzhaf.cpp's Side.
    acc_t mA = ninf, mC = ninf;
    for (int64_t t = 0; t < T; ++t)
      if (inA[t]) mA = max_(mA, Pb[t]);
    for (int64_t v = 0; v < V; ++v)
      if (inC[v]) mC = max_(mC, Qb[v]);
    acc_t ZA = 0, ZC = 0;
    for (int64_t t = 0; t < T; ++t)
      if (inA[t]) ZA += dexp(Pb[t] - mA);
    for (int64_t v = 0; v < V; ++v)
      if (inC[v]) ZC += dexp(Qb[v] - mC);
    const acc_t mAi = max_(mA, Pb[i]), mCj = max_(mC, Qb[j]);
    const acc_t sT = nA ? dexp(mA - mAi) : acc_t(0), eI = dexp(Pb[i] - mAi);
    const acc_t sV = nC ? dexp(mC - mCj) : acc_t(0), eJ = dexp(Qb[j] - mCj);
    // HBI's second softmax: the largest coalition weight is 1 / Z.
    const acc_t hT = max_(Pb[i], nA ? acc_t(1) / ZA : ninf), hV = max_(Qb[j], nC ? acc_t(1) / ZC : ninf);
    acc_t SA = 0, SAj = 0, SC = 0, SCi = 0, hnT = 0, hdT = 0, hnV = 0, hdV = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!inA[t]) continue;
      acc_t m = ninf;
      for (int64_t v = 0; v < V; ++v)
        if (inC[v]) m = max_(m, Lb[t * V + v]);
      const acc_t ew = dexp(Pb[t] - mA), r = max_(m, acc_t(0));
      SA += ew * r;
      SAj += ew * with_zero(max_(m, Lb[t * V + j]), zr1);
      const acc_t e2 = dexp(ew / ZA - hT);
      hnT += e2 * r;
      hdT += e2;
    }
    for (int64_t v = 0; v < V; ++v) {
      if (!inC[v]) continue;
      acc_t m = ninf;
      for (int64_t t = 0; t < T; ++t)
        if (inA[t]) m = max_(m, Lb[t * V + v]);
      const acc_t ew = dexp(Qb[v] - mC), c = max_(m, acc_t(0));
      SC += ew * c;
      SCi += ew * with_zero(max_(m, Lb[i * V + v]), zc1);
      const acc_t e2 = dexp(ew / ZC - hV);
      hnV += e2 * c;
      hdV += e2;
    }
    acc_t MRi = ninf, MCj = ninf;
    for (int64_t v = 0; v < V; ++v)
      if (inC[v]) MRi = max_(MRi, Lb[i * V + v]);
    for (int64_t t = 0; t < T; ++t)
      if (inA[t]) MCj = max_(MCj, Lb[t * V + j]);
    const acc_t tA = nA ? SA / ZA : acc_t(0), tAj = nA ? SAj / ZA : acc_t(0);
    const acc_t vC = nC ? SC / ZC : acc_t(0), vCi = nC ? SCi / ZC : acc_t(0);
    const acc_t f_ts = acc_t(0.5) * (tA + vC);
    const acc_t f_is = acc_t(0.5) * ((sT * SA + eI * max_(MRi, acc_t(0))) / (sT * ZA + eI) + vCi);
    const acc_t f_js = acc_t(0.5) * (tAj + (sV * SC + eJ * max_(MCj, acc_t(0))) / (sV * ZC + eJ));
    acc_t f_ij;
    if (hbi) {
      const acc_t ri = V > 1 ? max_(Lij, acc_t(0)) : Lij, cj = T > 1 ? max_(Lij, acc_t(0)) : Lij;
      const acc_t e2i = dexp(Pb[i] - hT), e2j = dexp(Qb[j] - hV);
      f_ij = acc_t(0.5) * ((hnT + e2i * ri) / (hdT + e2i) + (hnV + e2j * cj) / (hdV + e2j));
    } else {
      const acc_t ri = with_zero(max_(MRi, Lij), zr1), cj = with_zero(max_(MCj, Lij), zc1);
      f_ij = acc_t(0.5) * ((sT * SAj + eI * ri) / (sT * ZA + eI) + (sV * SCi + eJ * cj) / (sV * ZC + eJ));
    }
    total += f_ij - f_is - f_js + f_ts;
  }
  out[flat] = total / static_cast<acc_t>(S);
}

at::Tensor banzhaf_interaction_cuda(const at::Tensor& sim, const at::Tensor& text_weight,
                                    const at::Tensor& video_weight, const at::Tensor& text_mask,
                                    const at::Tensor& video_mask, int64_t num_samples, int64_t seed,
                                    const c10::optional<at::Tensor>& coalitions, c10::string_view mode) {
  banzhaf::check_args(sim, text_weight, video_weight, text_mask, video_mask, num_samples, coalitions, mode);
  TORCH_CHECK(sim.is_cuda(), "banzhaf_interaction (CUDA): sim must be a CUDA tensor, got ", sim.device());
  const c10::cuda::CUDAGuard guard(sim.device());
  const int64_t B = sim.size(0), T = sim.size(1), V = sim.size(2);
  const at::ScalarType acc = sim.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor L = sim.to(acc).contiguous(), P = text_weight.to(acc).contiguous(),
                   Q = video_weight.to(acc).contiguous();
  const at::Tensor TM = text_mask.contiguous(), VM = video_mask.contiguous();
  at::Tensor C;
  if (coalitions.has_value()) C = coalitions->to(at::kByte).contiguous();
  at::Tensor out = at::empty({B, T, V}, L.options());
  at::Tensor ws = at::empty({B * T * V * (T + V)}, sim.options().dtype(at::kByte));
  const int64_t n = B * T * V;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 2147483647LL, "banzhaf_interaction (CUDA): B*T*V = ", n, " is too large");
  const banzhaf::Key key = banzhaf::make_key(seed);
  const bool hbi = mode == "hbi";
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "banzhaf_interaction_cuda", [&] {
    banzhaf_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        L.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), TM.data_ptr<bool>(),
        VM.data_ptr<bool>(), C.defined() ? C.data_ptr<uint8_t>() : nullptr, ws.data_ptr<uint8_t>(), B, T, V,
        num_samples, key, hbi, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.to(sim.scalar_type());
}

}  // namespace
}  // namespace xloss

TORCH_LIBRARY_IMPL(xloss, CUDA, m) {
  m.impl("banzhaf_interaction", &xloss::banzhaf_interaction_cuda);
}
