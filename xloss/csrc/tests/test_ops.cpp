// C++ test of the compiled ops, built by CMakeLists.txt against libtorch (no Python involved).
// Checks that every schema of the xloss library has a CPU kernel, and calls each op once on a small input
// through the dispatcher, as a C++ user of the library would.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <string>

namespace {
int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}
}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  int count = 0;
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind("xloss::", 0) != 0) continue;
    ++count;
    auto op = dispatcher.findOp(name);
    check(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU),
          name.name + " has a CPU kernel");
  }
  check(count > 0, "the xloss library registered " + std::to_string(count) + " op(s)");

  // Each op on a small input, called through the dispatcher as a C++ user would.  The values are checked
  // against the Python references in tests/ (test_maxsim_op.py, test_banzhaf.py); here against plain ATen where
  // that is short, plus the promise that bad input throws c10::Error instead of crashing.
  auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  torch::manual_seed(0);

  auto maxsim = dispatcher.findSchemaOrThrow("xloss::maxsim_q2d", "")
                    .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, bool, bool, bool, int64_t)>();
  {
    auto q = torch::randn({2, 3, 8}), d = torch::randn({4, 5, 8});
    auto q_w = torch::ones({2, 3}), q_valid = torch::ones({2, 3}, torch::kBool);
    auto d_valid = torch::ones({4, 5}, torch::kBool);
    auto out = maxsim.call(q, d, q_w, q_valid, d_valid, false, false, true, 1);
    auto expected = torch::einsum("qtd,cvd->qctv", {q, d}).amax(-1).sum(-1);  // ColBERT sum of maxima
    check(std::get<0>(out).sizes() == expected.sizes() && torch::allclose(std::get<0>(out), expected, 1e-5, 1e-5),
          "maxsim_q2d equals einsum + max + sum");
    // NaN propagates as in torch.max (issue 15): a NaN in a valid document token is the max, at its index,
    // and garbage in a masked-out query token changes nothing.
    auto d_nan = d.clone(), q_pad = q.clone(), q_mask = q_valid.clone();
    d_nan.index_put_({1, 2, 0}, std::nan(""));
    q_pad.index_put_({0, 2}, std::nan(""));
    q_mask.index_put_({0, 2}, false);
    auto nan_out = maxsim.call(q_pad, d_nan, q_w * q_mask, q_mask, d_valid, false, false, true, 1);
    auto s_nan = std::get<0>(nan_out), idx_nan = std::get<1>(nan_out), val_nan = std::get<2>(nan_out);
    check(torch::isnan(s_nan.index({torch::indexing::Slice(), 1})).all().item<bool>() &&
              torch::isfinite(s_nan.index({torch::indexing::Slice(), 0})).all().item<bool>(),
          "maxsim_q2d: a NaN document token makes exactly that document's scores NaN");
    check((idx_nan.index({1, 1, 0}) == 2).item<bool>() && torch::isnan(val_nan.index({1, 1, 0})).item<bool>(),
          "maxsim_q2d: the NaN wins the max at its own index");
    check((idx_nan.index({0, 0, 2}) == -1).item<bool>() && (val_nan.index({0, 0, 2}) == 0).item<bool>(),
          "maxsim_q2d: a masked-out query token is value 0, index -1, whatever it holds");
    check(throws([&] { maxsim.call(q, torch::randn({4, 5, 7}), q_w, q_valid, d_valid, false, false, false, 1); }),
          "maxsim_q2d rejects a feature-dimension mismatch");
    check(throws([&] { maxsim.call(q, d, q_w, q_valid, torch::ones({4, 6}, torch::kBool), false, false, false, 1); }),
          "maxsim_q2d rejects a d_valid of the wrong shape");
  }

  auto banzhaf = dispatcher.findSchemaOrThrow("xloss::banzhaf_interaction", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&,
                                       c10::string_view)>();
  {
    auto sim = torch::randn({2, 4, 3});
    auto p = torch::softmax(torch::randn({2, 4}), -1), v = torch::softmax(torch::randn({2, 3}), -1);
    auto text_mask = torch::ones({2, 4}, torch::kBool), video_mask = torch::ones({2, 3}, torch::kBool);
    text_mask.index_put_({1, 3}, false);
    auto a = banzhaf.call(sim, p, v, text_mask, video_mask, 8, 1234, std::nullopt, "hbi");
    auto b = banzhaf.call(sim, p, v, text_mask, video_mask, 8, 1234, std::nullopt, "hbi");
    check(a.sizes() == sim.sizes() && torch::isfinite(a).all().item<bool>(), "banzhaf_interaction: [B, T, V], finite");
    check(torch::equal(a, b), "banzhaf_interaction: the same seed gives the same values");
    check(a.index({1, 3}).abs().max().item<float>() == 0.f, "banzhaf_interaction: zero outside the masks");
    // NaN propagates (issue 15): the entry (i, j) takes part in f(S ∪ {i, j}) of every sample; NaN in padding
    // (row 3 of batch 1 is masked out) changes nothing.
    auto sim_nan = sim.clone();
    sim_nan.index_put_({0, 1, 2}, std::nan(""));
    sim_nan.index_put_({1, 3}, std::nan(""));
    auto c = banzhaf.call(sim_nan, p, v, text_mask, video_mask, 8, 1234, std::nullopt, "hbi");
    check(torch::isnan(c.index({0, 1, 2})).item<bool>(), "banzhaf_interaction: a NaN similarity is not hidden");
    check(torch::equal(c.index({1}), a.index({1})), "banzhaf_interaction: NaN in padding changes nothing");
    check(throws([&] { banzhaf.call(sim, p, v, text_mask, video_mask, 0, 1, std::nullopt, "hbi"); }),
          "banzhaf_interaction rejects num_samples < 1");
    check(throws([&] { banzhaf.call(sim, p, v, text_mask, video_mask, 4, 1, std::nullopt, "shapley"); }),
          "banzhaf_interaction rejects an unknown mode");
  }
  return failures == 0 ? 0 : 1;
}
