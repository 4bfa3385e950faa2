// The bodies of the per-capability row kernels (see row_kernels.h). Included once by each
// row_kernels_<cap>.cpp after it has set CPU_CAPABILITY / CPU_CAPABILITY_<cap> (and the matching
// `#pragma GCC target`), the way ATen builds its own kernels once per capability: everything here
// lives in the inline namespace CPU_CAPABILITY, so the copies never collide. No static data here
// (ATen's note "Do not compile initializers with AVX").
#pragma once

#ifndef CPU_CAPABILITY
#error "row_kernels_impl.h: define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including it"
#endif

// GCC contracts a * b + c into an FMA in C++ whenever the ISA has one (-ffp-contract=fast is its
// C++ default); the scalar reference order has no FMA, so neither may any capability.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "ddrl/row_math.h"
#include "row_kernels.h"

namespace ddrl::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();
// Each step of the main loops covers two float vectors (one vector of a 16-bit dtype).
constexpr int kStep = 2 * kW;
// A step spans whole rounds of the kLanes lanes (8- and 16-float vectors: one and two rounds).
static_assert(kLanes % kW == 0 && kStep % kLanes == 0, "the lane layout must tile the vector width");
constexpr int kAccs = kLanes / kW;
// The accumulator (group of kW lanes) that the second vector of a step feeds.
constexpr int kSecondAcc = (kW % kLanes) / kW;

template <typename T>
inline void load2(const T* p, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vec::loadu(p);
    hi = Vec::loadu(p + kW);
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + kW);
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// The shared walk of a chunk: elem(j0, lo, hi) computes the residuals of elements [j0, j0 + kStep)
// (writing them where asked), scalar(j) one residual of the tail. Lane l sums positions
// l mod kLanes in order; the lanes then fold pairwise (row_math.h's order).
template <typename VecFn, typename ScalarFn>
inline float sum_squares(int64_t n, VecFn&& elem, ScalarFn&& scalar) {
  Vec acc[kAccs];
  for (int a = 0; a < kAccs; ++a) acc[a] = Vec(0.f);
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec lo, hi;
    elem(j, lo, hi);
    acc[0] = acc[0] + lo * lo;
    acc[kSecondAcc] = acc[kSecondAcc] + hi * hi;
  }
  float lanes[kLanes];
  for (int a = 0; a < kAccs; ++a) acc[a].store(lanes + a * kW);
  // j is a multiple of kLanes here, so element j + t belongs to lane t mod kLanes.
  for (int64_t t = 0; j + t < n; ++t) {
    const float r = scalar(j + t);
    lanes[t % kLanes] += r * r;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

template <typename T, bool kGrad>
float diffusion_chunk_impl(const T* p, const T* d, const T* e, T* g, float a, float b, float gs,
                           int64_t n) {
  const Vec va(a), vb(b), vgs(gs);
  return sum_squares(
      n,
      [&](int64_t j, Vec& lo, Vec& hi) {
        Vec p0, p1, d0, d1, e0, e1;
        load2(p + j, p0, p1);
        load2(d + j, d0, d1);
        load2(e + j, e0, e1);
        lo = diffusion_residual(p0, d0, e0, va, vb);
        hi = diffusion_residual(p1, d1, e1, va, vb);
        if constexpr (kGrad) store2(g + j, lo * vgs, hi * vgs);
      },
      [&](int64_t j) {
        const float r = diffusion_residual(float(p[j]), float(d[j]), float(e[j]), a, b);
        if constexpr (kGrad) g[j] = T(r * gs);
        return r;
      });
}

template <typename T>
float diffusion_chunk(const T* p, const T* d, const T* e, T* g, float a, float b, float gs,
                      int64_t n) {
  return g ? diffusion_chunk_impl<T, true>(p, d, e, g, a, b, gs, n)
           : diffusion_chunk_impl<T, false>(p, d, e, g, a, b, gs, n);
}

template <typename T, bool kGrad, bool kOffset>
float step_chunk_impl(const T* xn, const T* x, const T* mo, const T* off, T* g, float a, float b,
                      float gs, int64_t n) {
  const Vec va(a), vb(b), vgs(gs), zero(0.f);
  return sum_squares(
      n,
      [&](int64_t j, Vec& lo, Vec& hi) {
        Vec n0, n1, x0, x1, m0, m1, o0 = zero, o1 = zero;
        load2(xn + j, n0, n1);
        load2(x + j, x0, x1);
        load2(mo + j, m0, m1);
        if constexpr (kOffset) load2(off + j, o0, o1);
        lo = step_delta(n0, x0, m0, o0, va, vb);
        hi = step_delta(n1, x1, m1, o1, va, vb);
        if constexpr (kGrad) store2(g + j, lo * vgs, hi * vgs);
      },
      [&](int64_t j) {
        const float o = kOffset ? float(off[j]) : 0.f;
        const float dlt = step_delta(float(xn[j]), float(x[j]), float(mo[j]), o, a, b);
        if constexpr (kGrad) g[j] = T(dlt * gs);
        return dlt;
      });
}

template <typename T>
float step_chunk(const T* xn, const T* x, const T* mo, const T* off, T* g, float a, float b,
                 float gs, int64_t n) {
  if (g) {
    return off ? step_chunk_impl<T, true, true>(xn, x, mo, off, g, a, b, gs, n)
               : step_chunk_impl<T, true, false>(xn, x, mo, off, g, a, b, gs, n);
  }
  return off ? step_chunk_impl<T, false, true>(xn, x, mo, off, g, a, b, gs, n)
             : step_chunk_impl<T, false, false>(xn, x, mo, off, g, a, b, gs, n);
}

template <typename S, typename D>
void scale_span(const S* src, D* dst, float k, int64_t n) {
  const Vec vk(k);
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    Vec lo, hi;
    load2(src + j, lo, hi);
    store2(dst + j, lo * vk, hi * vk);
  }
  for (; j < n; ++j) dst[j] = D(float(src[j]) * k);
}

template <typename T>
constexpr DtypeKernels<T> dtype_kernels() {
  return {&diffusion_chunk<T>, &step_chunk<T>, &scale_span<T, float>,
          &scale_span<T, c10::BFloat16>, &scale_span<T, c10::Half>};
}

}  // namespace CPU_CAPABILITY
}  // namespace ddrl::cpu

// Defines ddrl::cpu::row_kernels_<name>() in the including translation unit.
#define DDRL_DEFINE_ROW_KERNELS(name, label)                                                     \
  namespace ddrl::cpu {                                                                          \
  const RowKernels& row_kernels_##name() {                                                       \
    static const RowKernels table{label, dtype_kernels<float>(), dtype_kernels<c10::BFloat16>(), \
                                  dtype_kernels<c10::Half>()};                                   \
    return table;                                                                                \
  }                                                                                              \
  }
