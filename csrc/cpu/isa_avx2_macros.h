// The ISA macros that `#pragma GCC target("avx2,fma,f16c")` (or a superset) enables but does not
// define; the vector headers (sleef.h, ATen's vec headers) test them. Included right after the
// pragma, before any other include, by the per-capability row kernel files. No include guard on
// purpose: every macro is guarded itself.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
