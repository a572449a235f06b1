// The one symbol a capability library exports: its table of entry points, which
// csrc/cpu/load_kernels.cpp looks up after loading the library. Nothing here runs when the
// library loads (no static initializer in a file compiled for a capability, pytorch#37577).
#include <c10/macros/Export.h>

#include "blas_network.h"
#include "entry_points.h"

#define HANDGRAD_NAME_OF(capability) #capability
#define HANDGRAD_STRINGIZE(capability) HANDGRAD_NAME_OF(capability)

extern "C" C10_EXPORT const handgrad::cpu::Kernels* handgrad_cpu_kernels() {
  namespace k = handgrad::cpu::CPU_CAPABILITY;
  static const handgrad::cpu::Kernels table{
      handgrad::cpu::kKernelsVersion,
      HANDGRAD_STRINGIZE(CPU_CAPABILITY),
      k::micro_kernel_description(),
      &k::fused_forward,
      &k::fused_backward,
      &k::fused_double_backward,
      &k::forward_path,
      &k::blas_backward_pays,
      &k::runs_as_layers,
      &k::second_order_blas_pays,
      &k::activation_kernel,
      &k::activation_backward_kernel,
      &k::bias_activation_backward_kernel,
  };
  return &table;
}
