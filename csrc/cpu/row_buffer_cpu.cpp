#include "row_buffer_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <deque>
#include <mutex>

namespace ddrl::cpu {
namespace {

constexpr size_t kAlign = 64;  // what ATen's CPU allocator aligns to

struct Block {
  void* ptr;
  size_t size;
};

// The freed blocks, oldest first. A block is reused only for a request of exactly its size
// (the ops ask for the same few sizes call after call), so nothing is ever split or merged.
class BufferCache {
 public:
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->size == size) {
        void* ptr = it->ptr;
        cached_ -= size;
        free_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  void give(void* ptr, size_t size) {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (size > kCachedBufferMaxBytes) {
        drop.push_back({ptr, size});
      } else {
        while (cached_ + size > kCachedBufferMaxBytes) {
          drop.push_back(free_.front());
          cached_ -= free_.front().size;
          free_.pop_front();
        }
        free_.push_back({ptr, size});
        cached_ += size;
      }
    }
    for (const Block& b : drop) std::free(b.ptr);  // outside the lock
  }

 private:
  std::mutex mutex_;
  std::deque<Block> free_;
  size_t cached_ = 0;
};

// Never destroyed: tensors may be freed during static destruction.
BufferCache& cache() {
  static BufferCache* c = new BufferCache();
  return *c;
}

void release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  cache().give(b->ptr, b->size);
  delete b;
}

size_t rounded(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct CachingCpuAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t size = rounded(n);
    void* ptr = cache().take(size);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kAlign, size);
      TORCH_CHECK(ptr != nullptr, "ddrl: out of CPU memory allocating ", size, " bytes");
    }
    return {ptr, new Block{ptr, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCpuAllocator& allocator() {
  static CachingCpuAllocator* a = new CachingCpuAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_row_buffer(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * c10::elementSize(dtype);
  if (nbytes < kCachedBufferMinBytes) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, c10::MemoryFormat::Contiguous);
}

}  // namespace ddrl::cpu
