// The one TORCH_LIBRARY of xloss: every compiled op's schema is declared here, once.  Implementations
// register per device with TORCH_LIBRARY_IMPL(xloss, CPU, m) in cpu/*.cpp and TORCH_LIBRARY_IMPL(xloss, CUDA, m)
// in cuda/*.cu; fake (meta) kernels and autograd are registered from Python (xloss/_ext.py callers), the
// extension-cpp way.
#include <torch/library.h>

#ifdef XLOSS_PY_MODULE
// Built ahead of time by setup.py as the Python module xloss._C: importing it loads the library and so runs
// the registrations below.  The JIT build (xloss/_ext.py) loads a plain shared library instead.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(xloss, m) {
  // Schemas, one line per op (keep this list in step with the ops in cpu/ and cuda/).
  // Banzhaf interaction of HBI (SPEC.md §6; cpu/banzhaf.cpp, cuda/banzhaf.cu, Python in xloss/banzhaf/):
  // sim [B, T, V], weights [B, T] / [B, V] (sim's dtype), bool masks [B, T] / [B, V], coalitions None (bits
  // from seed) or bool/uint8 [B, T, V, num_samples, T + V]; mode "hbi" | "textbook" -> [B, T, V].
  // Late interaction, query→document MaxSim (SPEC.md §3; cpu/maxsim.cpp, Python in xloss/late_interaction/cpu.py):
  // q [Nq, Lq, D], d [Nd, Ld, D] (fp32/bf16/fp16/fp64), q_w [Nq, Lq] (fp32, fp64 for fp64), bool q_valid /
  // d_valid, pairs (query a // group against document a) -> (scores [Nq, Nd] or [Nd] for pairs, arg-max
  // int16/int32 [.., Lq], maxima [.., Lq]; empty unless need_aux).
  m.def("maxsim_q2d(Tensor q, Tensor d, Tensor q_w, Tensor q_valid, Tensor d_valid, bool zero_mode, bool pairs, bool need_aux, int group=1) -> (Tensor, Tensor, Tensor)");
  m.def("banzhaf_interaction(Tensor sim, Tensor text_weight, Tensor video_weight, Tensor text_mask, Tensor video_mask, int num_samples, int seed, Tensor? coalitions, str mode) -> Tensor");
}
