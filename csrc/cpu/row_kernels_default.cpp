// The row kernels for ATen's DEFAULT capability (row_kernels_impl.h on the portable
// at::vec::Vectorized, no ISA beyond the build's baseline), and the choice of table.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "row_kernels_impl.h"

#include <ATen/Version.h>

#include <string>

DDRL_DEFINE_ROW_KERNELS(default, "DEFAULT")

namespace ddrl::cpu {

const RowKernels& row_kernels() {
  static const RowKernels& table = [] () -> const RowKernels& {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return row_kernels_avx512();
    if (cap == "AVX2") return row_kernels_avx2();
    return row_kernels_default();
  }();
  return table;
}

}  // namespace ddrl::cpu
