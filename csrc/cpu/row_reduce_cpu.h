// The CPU walk over row tensors: fixed chunks, fixed lanes, fixed fold order (see
// ddrl/row_math.h). Parallel over (row, chunk) pairs, so one long row uses every core and many
// short rows do too, while a row's sum never depends on the thread count or the batch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ddrl/row_math.h"

// The storage dtypes of the row ops (row_inputs.h admits exactly these): float32, bfloat16, float16.
#define DDRL_DISPATCH_ROW_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace ddrl::cpu {

// Inside a chunk the lanes are walked by the vector kernels (row_kernels.h): lane l accumulates
// positions l mod kLanes in order, then the lanes fold pairwise, on every CPU capability.

// chunk_fn(row, begin, count) -> fp32 partial of that chunk; row_fn(row, row_sum) finishes a
// row. Partials are summed in chunk order.
template <typename ChunkFn, typename RowFn>
void reduce_rows(int64_t rows, int64_t cols, ChunkFn&& chunk_fn, RowFn&& row_fn) {
  const int64_t nch = num_chunks(cols);
  std::vector<float> partials(static_cast<size_t>(rows * nch));
  if (nch > 0) {
    // At least ~one chunk of elements per task so short rows do not drown in task overhead.
    const int64_t grain = std::max<int64_t>(1, kChunk / std::min<int64_t>(cols, kChunk));
    at::parallel_for(0, rows * nch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / nch;
        const int64_t start = (item % nch) * kChunk;
        partials[item] = chunk_fn(row, start, std::min<int64_t>(kChunk, cols - start));
      }
    });
  }
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float s = 0.f;
      for (int64_t c = 0; c < nch; ++c) s += partials[row * nch + c];
      row_fn(row, s);
    }
  });
}

inline float coef_at(const float* p, int64_t stride, int64_t row) { return p[row * stride]; }

}  // namespace ddrl::cpu
