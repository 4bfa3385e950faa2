// CUDA launcher of ddrl::scale_rows: out[i, j] = float(src[i, j]) * scale_i, stored in out_dtype.
// The whole backward pass of the fused ops: one read and one write per element.
#include <cuda_runtime.h>

#include "ddrl/launch_params.h"
#include "row_reduce.cuh"

namespace ddrl {
namespace {

using cuda::kThreads;

// Same tiling as the row reductions: one block per (row, chunk), so the row (and its scale) is
// per block and no per-element division is needed. A vector holds N elements, N set by the
// narrower type, so each access is one or two 16-byte words.
template <typename S, typename O, bool VEC>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(const S* __restrict__ src, O* __restrict__ out, RowCoef scale, int64_t rows,
                      int64_t cols) {
  constexpr int N = 16 / (sizeof(S) < sizeof(O) ? sizeof(S) : sizeof(O));
  constexpr int U = VEC ? cuda::kUnrollVec : cuda::kUnrollScalar;
  const int64_t nch = num_chunks(cols);
  const int64_t items = rows * nch;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / nch;
    const int64_t start = (item % nch) * kChunk;
    const int count = int(min(kChunk, cols - start));
    const int64_t base = row * cols + start;
    const float k = cuda::coef_at(scale, row);
    const int nvec = (count + N - 1) / N;

    for (int tile = 0; tile < nvec; tile += kThreads * U) {
      cuda::Vec<S, N> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = tile + u * kThreads + threadIdx.x;
        if (v < nvec) cuda::load_vec<VEC>(x[u], src + base, v * N, count);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = tile + u * kThreads + threadIdx.x;
        if (v >= nvec) continue;
        cuda::Vec<O, N> y;
#pragma unroll
        for (int e = 0; e < N; ++e) y.v[e] = cuda::from_float<O>(cuda::to_float(x[u].v[e]) * k);
        cuda::store_vec<VEC>(out + base, y, v * N, count);
      }
    }
  }
}

template <typename S, typename O>
cudaError_t launch(const ScaleRowsParams& p, cudaStream_t stream) {
  const S* src = static_cast<const S*>(p.src);
  O* out = static_cast<O*>(p.out);
  const int64_t nch = num_chunks(p.cols);
  if (nch == 0) return cudaSuccess;
  const bool vec = (p.cols * int64_t(sizeof(S))) % 16 == 0 &&
                   (p.cols * int64_t(sizeof(O))) % 16 == 0 && cuda::aligned16(src) &&
                   cuda::aligned16(out);
  const unsigned grid = cuda::grid_for(p.rows * nch);
  if (vec) scale_rows_kernel<S, O, true><<<grid, kThreads, 0, stream>>>(src, out, p.scale, p.rows, p.cols);
  else scale_rows_kernel<S, O, false><<<grid, kThreads, 0, stream>>>(src, out, p.scale, p.rows, p.cols);
  return cudaGetLastError();
}

}  // namespace

int launch_scale_rows(const ScaleRowsParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  return cuda::dispatch_dtype(p.src_dtype, [&](auto src_tag) {
    return cuda::dispatch_dtype(p.out_dtype, [&](auto out_tag) {
      return launch<typename decltype(src_tag)::type, typename decltype(out_tag)::type>(p, s);
    });
  });
}

}  // namespace ddrl
