// Stub of a header that only CUDA builds of PyTorch generate.  It lets nvcc compile xloss's .cu files against
// the headers of a CPU build of torch (CI checks that CUDA code compiles on machines without a GPU).  A CUDA
// build of torch ships the real file, which comes first on the include path.
#pragma once
