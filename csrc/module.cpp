// The Python extension module freeadv_fast._C.
//
// Importing it loads this library, whose static initialisers register the
// freeadv_fast::perturb op with torch (csrc/ops.cpp). The module itself only
// reports how it was built; plain pybind11 (not torch/extension.h) keeps this
// translation unit quick to compile.
#include <pybind11/pybind11.h>

#include <string>

// setup.py passes the architectures as a bare token (75_80_90): quotes would
// not survive the build's shell.
#define FREEADV_STR2(x) #x
#define FREEADV_STR(x) FREEADV_STR2(x)
#ifdef FREEADV_CUDA_ARCHS
#define FREEADV_CUDA_ARCHS_STRING FREEADV_STR(FREEADV_CUDA_ARCHS)
#else
#define FREEADV_CUDA_ARCHS_STRING ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "freeadv_fast compiled kernels (ops are registered under torch.ops.freeadv_fast)";
#ifdef FREEADV_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(FREEADV_CUDA_ARCHS_STRING);
}
