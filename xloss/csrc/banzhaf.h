// Shared by cpu/banzhaf.cpp and cuda/banzhaf.cu (xloss::banzhaf_interaction, SPEC.md §6): the counter-based
// coalition bits and the combination of one sample's four coalition values.  Keeping both in one header is what
// makes the CPU and CUDA ops draw the same coalitions for the same seed (and xloss/banzhaf/cpu.py re-implements
// exactly these integer steps with torch ops).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define XLOSS_HD __host__ __device__ __forceinline__
#else
#define XLOSS_HD inline
#endif

namespace xloss {
namespace banzhaf {

// lowbias32 (C. Wellons' hash-prospector): a 32-bit bijective mixer with a very low bias.
XLOSS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Key {
  uint32_t k1, k2;
};

// The two 32-bit keys of a 64-bit seed.
XLOSS_HD Key make_key(int64_t seed) {
  const uint64_t u = static_cast<uint64_t>(seed);
  Key key;
  key.k1 = mix32(static_cast<uint32_t>(u) ^ 0x9e3779b9U);
  key.k2 = mix32(static_cast<uint32_t>(u >> 32) ^ key.k1 ^ 0x85ebca6bU);
  return key;
}

// 32 coalition bits: word w of sample (b, i, j, s) is counter n = (((b*T + i)*V + j)*S + s)*W + w, with
// W = ceil((T + V) / 32) words per sample; element e (words 0..T-1, then frames T..T+V-1) is bit e % 32 of
// word e / 32 (1 = in the coalition, before the pair (i, j) and padded positions are taken out).
XLOSS_HD uint32_t word(Key key, uint64_t n) {
  return mix32(mix32(static_cast<uint32_t>(n) ^ key.k1) ^ static_cast<uint32_t>(n >> 32) ^ key.k2);
}

// The max of two values with NaN propagating from either side (as torch's max/amax, and the reference): the
// plain `a > b ? a : b` would drop a NaN in `a`.
template <typename T>
XLOSS_HD T max_(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// A strict weak order for sorting by value, largest first, with NaN before everything (a NaN is the max of any
// set that holds it).  A bare `>` is no strict weak order once NaN is there (std::sort's precondition).
template <typename T>
XLOSS_HD bool before(T x, T y) {
  return (x != x) ? (y == y) : x > y;
}

// The value of a max over a row (or column) of the masked grid: the entries of the coalition, plus a 0 when
// the coalition does not cover the whole padded row (the masked grid holds zeros there).
template <typename T>
XLOSS_HD T with_zero(T m, bool zero) {
  return zero ? max_(m, T(0)) : m;
}

}  // namespace banzhaf
}  // namespace xloss

// ------------------------------------------------------------------------------------------------------------
// Host-side argument checks shared by the CPU and CUDA ops (a direct torch.ops call must never read out of
// bounds, whatever it is given).
// ------------------------------------------------------------------------------------------------------------
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace xloss {
namespace banzhaf {

inline void check_args(const at::Tensor& sim, const at::Tensor& text_weight, const at::Tensor& video_weight,
                       const at::Tensor& text_mask, const at::Tensor& video_mask, int64_t num_samples,
                       const c10::optional<at::Tensor>& coalitions, c10::string_view mode) {
  TORCH_CHECK(sim.dim() == 3, "banzhaf_interaction: sim must be 3-D [B, T, V], got ", sim.sizes());
  TORCH_CHECK(sim.numel() > 0, "banzhaf_interaction: sim must not be empty, got ", sim.sizes());
  TORCH_CHECK(at::isFloatingType(sim.scalar_type()), "banzhaf_interaction: sim must be floating point, got ",
              sim.scalar_type());
  const int64_t B = sim.size(0), T = sim.size(1), V = sim.size(2);
  TORCH_CHECK(text_weight.dim() == 2 && text_weight.size(0) == B && text_weight.size(1) == T,
              "banzhaf_interaction: text_weight must have shape [B, T] = [", B, ", ", T, "], got ",
              text_weight.sizes());
  TORCH_CHECK(video_weight.dim() == 2 && video_weight.size(0) == B && video_weight.size(1) == V,
              "banzhaf_interaction: video_weight must have shape [B, V] = [", B, ", ", V, "], got ",
              video_weight.sizes());
  TORCH_CHECK(text_weight.scalar_type() == sim.scalar_type() && video_weight.scalar_type() == sim.scalar_type(),
              "banzhaf_interaction: text_weight and video_weight must have sim's dtype ", sim.scalar_type(),
              ", got ", text_weight.scalar_type(), " and ", video_weight.scalar_type());
  TORCH_CHECK(text_mask.dim() == 2 && text_mask.size(0) == B && text_mask.size(1) == T,
              "banzhaf_interaction: text_mask must have shape [B, T] = [", B, ", ", T, "], got ", text_mask.sizes());
  TORCH_CHECK(video_mask.dim() == 2 && video_mask.size(0) == B && video_mask.size(1) == V,
              "banzhaf_interaction: video_mask must have shape [B, V] = [", B, ", ", V, "], got ",
              video_mask.sizes());
  TORCH_CHECK(text_mask.scalar_type() == at::kBool && video_mask.scalar_type() == at::kBool,
              "banzhaf_interaction: text_mask and video_mask must be bool tensors, got ", text_mask.scalar_type(),
              " and ", video_mask.scalar_type());
  TORCH_CHECK(num_samples >= 1, "banzhaf_interaction: num_samples must be >= 1, got ", num_samples);
  TORCH_CHECK(mode == "hbi" || mode == "textbook", "banzhaf_interaction: mode must be 'hbi' or 'textbook', got '",
              std::string(mode), "'");
  for (const at::Tensor* t : {&text_weight, &video_weight, &text_mask, &video_mask}) {
    TORCH_CHECK(t->device() == sim.device(), "banzhaf_interaction: every tensor must be on sim's device ",
                sim.device(), ", got one on ", t->device());
  }
  if (coalitions.has_value()) {
    const at::Tensor& c = *coalitions;
    TORCH_CHECK(c.scalar_type() == at::kBool || c.scalar_type() == at::kByte,
                "banzhaf_interaction: coalitions must be a bool or uint8 tensor, got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 5 && c.size(0) == B && c.size(1) == T && c.size(2) == V && c.size(3) == num_samples &&
                    c.size(4) == T + V,
                "banzhaf_interaction: coalitions must have shape [B, T, V, num_samples, T + V] = [", B, ", ", T,
                ", ", V, ", ", num_samples, ", ", T + V, "], got ", c.sizes());
    TORCH_CHECK(c.device() == sim.device(), "banzhaf_interaction: coalitions must be on sim's device ",
                sim.device(), ", got ", c.device());
  }
}

}  // namespace banzhaf
}  // namespace xloss
