// The row kernels built for ATen's AVX512 capability (row_kernels_impl.h), like ATen's own
// per-capability kernel builds. The target pragma (and the ISA macros it implies) come before
// every include so the vector headers see the ISA; this file includes only the vector headers, and
// it runs only when at::get_cpu_capability() says AVX512 (row_kernels_default.cpp chooses).
// Like ATen's AVX512 kernels, the header inline functions compiled here carry the ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC's target pragma does not define the ISA macros the headers test (sleef.h, ATen's vec
// headers), so they are set to what the pragma enables.
#include "isa_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "row_kernels_impl.h"
DDRL_DEFINE_ROW_KERNELS(avx512, "AVX512")
#else
#include "row_kernels.h"
namespace ddrl::cpu {
const RowKernels& row_kernels_avx512() { return row_kernels_default(); }  // not built for this compiler/ISA
}  // namespace ddrl::cpu
#endif
