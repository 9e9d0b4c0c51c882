// C++ test of the compiled ops, built by CMakeLists.txt against libtorch (no Python involved).
// Checks that every schema of the xloss library has a CPU kernel, and calls each op once on a small input
// through the dispatcher, as a C++ user of the library would.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

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
                        const at::Tensor&, bool, bool, bool)>();
  {
    auto q = torch::randn({2, 3, 8}), d = torch::randn({4, 5, 8});
    auto q_w = torch::ones({2, 3}), q_valid = torch::ones({2, 3}, torch::kBool);
    auto d_valid = torch::ones({4, 5}, torch::kBool);
    auto out = maxsim.call(q, d, q_w, q_valid, d_valid, false, false, true);
    auto expected = torch::einsum("qtd,cvd->qctv", {q, d}).amax(-1).sum(-1);  // ColBERT sum of maxima
    check(std::get<0>(out).sizes() == expected.sizes() && torch::allclose(std::get<0>(out), expected, 1e-5, 1e-5),
          "maxsim_q2d equals einsum + max + sum");
    check(throws([&] { maxsim.call(q, torch::randn({4, 5, 7}), q_w, q_valid, d_valid, false, false, false); }),
          "maxsim_q2d rejects a feature-dimension mismatch");
    check(throws([&] { maxsim.call(q, d, q_w, q_valid, torch::ones({4, 6}, torch::kBool), false, false, false); }),
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
    check(throws([&] { banzhaf.call(sim, p, v, text_mask, video_mask, 0, 1, std::nullopt, "hbi"); }),
          "banzhaf_interaction rejects num_samples < 1");
    check(throws([&] { banzhaf.call(sim, p, v, text_mask, video_mask, 4, 1, std::nullopt, "shapley"); }),
          "banzhaf_interaction rejects an unknown mode");
  }
  return failures == 0 ? 0 : 1;
}
