// Full-size buffers of the CPU row ops (the residual stored in forward, each gradient written in
// backward) come from a small cache of freed blocks instead of a fresh allocation per call: a
// fresh large allocation is fresh pages, and faulting them in cost as much as the op's own
// arithmetic (about 10 ms per 32 MiB on a 2-core VM). Same values, same dtype and layout; only
// where the memory comes from differs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace ddrl::cpu {

// Blocks of at least this many bytes go through the cache; smaller ones use ATen's allocator.
constexpr size_t kCachedBufferMinBytes = size_t(1) << 20;
// At most this many bytes of freed blocks are kept (least recently freed dropped first).
constexpr size_t kCachedBufferMaxBytes = size_t(512) << 20;

// at::empty(sizes, dtype) on CPU (contiguous, uninitialised), large ones from the cache.
at::Tensor empty_row_buffer(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace ddrl::cpu
