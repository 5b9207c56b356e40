// CPU-only builds: an op called on a CUDA tensor raises an error that says how to get the CUDA kernels, instead
// of the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace {

void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              " was called on a CUDA tensor, but this swiftlora was built without CUDA kernels (CPU-only build: torch "
              "was a CPU build or no nvcc was found). Reinstall with a CUDA build of torch and the CUDA toolkit: "
              "CUDA_HOME=/usr/local/cuda SWIFTLORA_CUDA_ARCHS=<e.g. 90a> pip install --no-build-isolation "
              "--force-reinstall swiftlora");
}

}  // namespace

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
#define SWIFTLORA_REGISTER_MISSING(name) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  SWIFTLORA_FOR_EACH_OP(SWIFTLORA_REGISTER_MISSING)
#undef SWIFTLORA_REGISTER_MISSING
}
