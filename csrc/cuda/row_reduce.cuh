// The CUDA walk over row tensors, shared by the row kernels (see ddrl/row_math.h).
//
// Stage 1 (row_chunks_kernel): one block per (row, chunk of kChunk elements). Each thread reads
//   16-byte vectors of every input, issuing all loads of a tile before any math so that
//   kUnroll * inputs loads are in flight, writes the gradient in the same pass and accumulates
//   residual^2 in fp32. A fixed warp-shuffle + shared-memory tree turns the block's 256 sums
//   into the chunk's partial.
// Stage 2 (finalize_rows_kernel): one warp per row sums its partials (lane-strided, then a
//   shuffle tree) and applies the row formula. Rows of a single chunk skip it: stage 1 applies
//   the row formula directly, which gives the same bits (x + 0 == x).
//
// Batch invariance: a row's result depends only on its values and `cols`. Thread t of a chunk
// always takes vectors t, t + 256, t + 512, ... and their elements in order, whether they are
// read by 16-byte loads (VEC) or one by one (unaligned inputs), and whatever the unroll depth:
// the two paths add in the same order, so they give the same bits.
//
// No torch headers here: this compiles in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ddrl/launch_params.h"

namespace ddrl::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnrollVec = 4;     // vectors per input per thread in flight (16-byte path)
constexpr int kUnrollScalar = 2;  // vectors per input per thread in flight (element path)
constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit; kernels loop over the rest

// ---- element conversions (explicit intrinsics: torch builds with __CUDA_NO_*_CONVERSIONS__) ----
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return x;
}

// ---- N elements of T moved as whole 16-byte words ---------------------------------------------
template <typename T, int N>
struct alignas(16) Vec {
  static_assert((N * sizeof(T)) % 16 == 0, "a Vec is a whole number of 16-byte words");
  static constexpr int kWords = int(N * sizeof(T) / 16);
  T v[N];
};

// Elements [i, i + N) of p: one 16-byte load per word when VEC, else element loads of the ones
// below `count` (the others are never used).
template <bool VEC, typename T, int N>
__device__ __forceinline__ void load_vec(Vec<T, N>& d, const T* __restrict__ p, int i, int count) {
  if constexpr (VEC) {
    const uint4* src = reinterpret_cast<const uint4*>(p + i);
    uint4* dst = reinterpret_cast<uint4*>(d.v);
#pragma unroll
    for (int w = 0; w < Vec<T, N>::kWords; ++w) dst[w] = src[w];
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (i + e < count) d.v[e] = p[i + e];
    }
  }
}

template <bool VEC, typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, N>& s, int i, int count) {
  if constexpr (VEC) {
    const uint4* src = reinterpret_cast<const uint4*>(s.v);
    uint4* dst = reinterpret_cast<uint4*>(p + i);
    // __stwb: a plain (write-back) store, but always one 16-byte st.global.v4; a plain
    // assignment from the register array is split into 4-byte stores by the compiler.
#pragma unroll
    for (int w = 0; w < Vec<T, N>::kWords; ++w) __stwb(dst + w, src[w]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (i + e < count) p[i + e] = s.v[e];
    }
  }
}

__device__ __forceinline__ float coef_at(RowCoef c, int64_t row) { return c.ptr[row * c.stride]; }

// ---- fixed-order reductions --------------------------------------------------------------------
// Butterfly: every lane ends with the same sum (IEEE addition is commutative).
__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  return s;
}

// Sum over the block, valid in thread 0. Ends with a barrier so the scratch can be reused.
__device__ __forceinline__ float block_sum(float s) {
  __shared__ float warp_totals[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  s = warp_sum(s);
  if (lane == 0) warp_totals[warp] = s;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) total = warp_sum(lane < kWarps ? warp_totals[lane] : 0.f);
  __syncthreads();
  return total;
}

// ---- stage 1: one block per (row, chunk) -------------------------------------------------------
// Op (one per row kernel) provides:
//   kInputs;  row(i) -> per-row object with residual(const float (&)[kInputs]) and grad_scale;
//   finish(i, sum_sq) writing the row's result.
template <typename T, int kInputs>
struct RowArgs {
  const T* in[kInputs];  // [rows, cols] each
  T* grad;               // [rows, cols] or nullptr
  float* partials;       // [rows, num_chunks(cols)]
  int64_t rows;
  int64_t cols;
};

template <typename T, bool VEC, bool GRAD, typename Op>
__global__ void __launch_bounds__(kThreads)
    row_chunks_kernel(const RowArgs<T, Op::kInputs> a, const Op op) {
  constexpr int N = 16 / sizeof(T);  // elements per vector
  constexpr int K = Op::kInputs;
  constexpr int U = VEC ? kUnrollVec : kUnrollScalar;
  const int64_t nch = num_chunks(a.cols);
  const int64_t items = a.rows * nch;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / nch;
    const int64_t start = (item % nch) * kChunk;
    const int count = int(min(kChunk, a.cols - start));
    const int64_t base = row * a.cols + start;  // 64-bit: rows * cols may exceed 2^31
    const auto r = op.row(row);
    const int nvec = (count + N - 1) / N;  // VEC: count is a multiple of N
    float acc = 0.f;

    for (int tile = 0; tile < nvec; tile += kThreads * U) {
      // Load: every input vector of the tile, before any math.
      Vec<T, N> x[U][K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = tile + u * kThreads + threadIdx.x;
        if (v < nvec) {
#pragma unroll
          for (int k = 0; k < K; ++k) load_vec<VEC>(x[u][k], a.in[k] + base, v * N, count);
        }
      }
      // Compute: residual, gradient store, fp32 sum of squares, in element order.
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = tile + u * kThreads + threadIdx.x;
        if (v >= nvec) continue;
        Vec<T, N> g;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (!VEC && v * N + e >= count) continue;
          float in[K];
#pragma unroll
          for (int k = 0; k < K; ++k) in[k] = to_float(x[u][k].v[e]);
          const float res = r.residual(in);
          if constexpr (GRAD) g.v[e] = from_float<T>(res * r.grad_scale);
          acc = fmaf(res, res, acc);
        }
        if constexpr (GRAD) store_vec<VEC>(a.grad + base, g, v * N, count);
      }
    }

    const float chunk_sum = block_sum(acc);
    if (threadIdx.x == 0) {
      if (nch == 1) op.finish(row, chunk_sum);
      else a.partials[item] = chunk_sum;
    }
  }
}

// ---- stage 2: one warp per row -----------------------------------------------------------------
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    finalize_rows_kernel(const float* __restrict__ partials, int64_t rows, int64_t nch, const Op op) {
  const int lane = threadIdx.x % 32;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += stride) {
    float s = 0.f;
    for (int64_t c = lane; c < nch; c += 32) s += partials[row * nch + c];
    s = warp_sum(s);
    if (lane == 0) op.finish(row, s);
  }
}

// ---- host side ---------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the element type of `d`.
template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned grid_for(int64_t blocks) {
  return unsigned(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// Both stages of a row reduction on `stream`. The 16-byte path needs every pointer aligned and
// rows a whole number of 16-byte words, so that every row (and chunk) starts aligned.
template <typename T, typename Op>
cudaError_t launch_row_reduction(const RowArgs<T, Op::kInputs>& a, const Op& op,
                                 cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const int64_t nch = num_chunks(a.cols);
  if (nch > 0) {
    bool vec = (a.cols * int64_t(sizeof(T))) % 16 == 0 && (a.grad == nullptr || aligned16(a.grad));
    for (const T* p : a.in) vec = vec && aligned16(p);
    const unsigned grid = grid_for(a.rows * nch);
    if (vec && a.grad) row_chunks_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a, op);
    else if (vec) row_chunks_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a, op);
    else if (a.grad) row_chunks_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a, op);
    else row_chunks_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a, op);
  }
  if (nch != 1) {  // several chunks: sum the partials; no columns: the row formula of 0 columns
    const unsigned grid = grid_for((a.rows + kWarps - 1) / kWarps);
    finalize_rows_kernel<<<grid, kThreads, 0, stream>>>(a.partials, a.rows, nch, op);
  }
  return cudaGetLastError();
}

}  // namespace ddrl::cuda
