// sm_90a attention kernel of ddrl::fp8_attention on the pre-quantised tensors (CuTe, wgmma).
//
// What it is: one warpgroup (128 threads) per 64 query rows; key tiles of 128 in a 2-stage
// cp.async double buffer; S = Q K^T by int8 wgmma (IGMMA, int32 exact); the online softmax of the
// scheme in registers (ddrl/fp8_attention_math.h: same formulas and tile order as the CPU
// emulation); P written as e4m3 to shared memory; P V^T tile by fp8 wgmma (QGMMA) into a fresh
// accumulator, added to the fp32 output in registers (outside the tensor-core accumulator).
// What it is not (yet): no TMA, no producer/consumer warp specialisation, no intra-warpgroup
// overlap of softmax and MMA, P goes through shared memory instead of registers (RS wgmma), and
// P uses the bit-exact software e4m3 rounding. It is a correct-by-construction baseline for the
// fast kernel, not the fast kernel. It has been compiled, never run, on this machine (no GPU).
//
// CUDA/CUTLASS headers only (no torch).
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "ddrl/fp8_attention_math.h"
#include "ddrl/fp8_attention_params.h"
#include "../row_reduce.cuh"

namespace ddrl {
namespace {

using namespace cute;
using fp8 = cutlass::float_e4m3_t;

constexpr int kBM = 64;                  // query rows per CTA (one warpgroup)
constexpr int kBN = fp8attn::kKeyTile;   // keys per online-softmax step
constexpr int kThreads = 128;
constexpr int kStages = 2;

template <int D>
struct Sm90Traits {
  using AtomQK = std::conditional_t<D == 128, GMMA::Layout_K_SW128_Atom<int8_t>, GMMA::Layout_K_SW64_Atom<int8_t>>;
  using Atom8 = GMMA::Layout_K_SW128_Atom<fp8>;  // 128 keys of e4m3 = 128 bytes
  using LayoutQ = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBM>, Int<D>>{}));
  using LayoutK = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBN>, Int<D>, Int<kStages>>{}));
  using LayoutP = decltype(tile_to_shape(Atom8{}, Shape<Int<kBM>, Int<kBN>>{}));
  using LayoutV = decltype(tile_to_shape(Atom8{}, Shape<Int<D>, Int<kBN>, Int<kStages>>{}));
  using Mma0 = decltype(make_tiled_mma(SM90_64x128x32_S32S8S8_SS_TN{}));
  using Mma1 = decltype(make_tiled_mma(std::conditional_t<D == 128, SM90_64x128x32_F32E4M3E4M3_SS_TN<>,
                                                          SM90_64x64x32_F32E4M3E4M3_SS_TN<>>{}));
  // 16-byte cp.async: a row of Q/K is D bytes (D/16 threads), a row of V^T is 128 bytes.
  using CopyQK = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, int8_t>{},
      Layout<Shape<Int<kThreads / (D / 16)>, Int<D / 16>>, Stride<Int<D / 16>, _1>>{}, Layout<Shape<_1, _16>>{}));
  using CopyV = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, fp8>{},
                                         Layout<Shape<_16, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _16>>{}));

  struct Smem {
    alignas(1024) int8_t q[cosize_v<LayoutQ>];
    alignas(1024) int8_t k[cosize_v<LayoutK>];
    alignas(1024) fp8 v[cosize_v<LayoutV>];
    alignas(1024) fp8 p[cosize_v<LayoutP>];
    float k_scale[kStages][kBN];
  };
  static constexpr int kSmemBytes = int(sizeof(Smem)) + 1024;  // + room to align the base
};

// acc = A B^T over the whole K extent of the tiles, into a zeroed accumulator.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_fresh(Mma& mma, const TA& tA, const TB& tB, TC& tC) {
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(tC);
}

// Sum / max over the 4 threads of a quad: they hold the same two accumulator rows.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int D, typename OutT>
__global__ void __launch_bounds__(kThreads, 1) fp8_attention_sm90_kernel(Fp8AttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Sm90Traits<D>;
  extern __shared__ char smem_raw[];
  auto& smem = *reinterpret_cast<typename T::Smem*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x;
  const int64_t m_blocks = p.sq_pad / kBM;
  const int64_t bh = blockIdx.x / m_blocks, m_block = blockIdx.x % m_blocks;
  const int64_t m0 = m_block * kBM;
  const int n_tiles = int((p.sk + kBN - 1) / kBN);

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename T::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k), typename T::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v), typename T::LayoutV{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p), typename T::LayoutP{});

  Tensor gQ = make_tensor(make_gmem_ptr(p.q8 + (bh * p.sq_pad + m0) * D), Shape<Int<kBM>, Int<D>>{},
                          Stride<Int<D>, _1>{});
  Tensor mK = make_tensor(make_gmem_ptr(p.k8 + bh * p.sk_pad * D), make_shape(p.sk_pad, Int<D>{}),
                          make_stride(Int<D>{}, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBN>, Int<D>>{}, make_coord(_, 0));  // (kBN, D, tiles)
  Tensor mV = make_tensor(make_gmem_ptr(reinterpret_cast<const fp8*>(p.v8t) + bh * D * p.sk_pad),
                          make_shape(Int<D>{}, p.sk_pad), make_stride(p.sk_pad, _1{}));
  Tensor gV = local_tile(mV, Shape<Int<D>, Int<kBN>>{}, make_coord(0, _));  // (D, kBN, tiles)
  const float* k_scale = p.k_scale + bh * p.sk_pad;

  typename T::CopyQK copy_qk;
  typename T::CopyV copy_v;
  auto thr_qk = copy_qk.get_thread_slice(tid);
  auto thr_v = copy_v.get_thread_slice(tid);
  Tensor tQgQ = thr_qk.partition_S(gQ);
  Tensor tQsQ = thr_qk.partition_D(sQ);
  Tensor tKgK = thr_qk.partition_S(gK);  // (CPY, CPY_N, CPY_K, tiles)
  Tensor tKsK = thr_qk.partition_D(sK);  // (CPY, CPY_N, CPY_K, stages)
  Tensor tVgV = thr_v.partition_S(gV);
  Tensor tVsV = thr_v.partition_D(sV);

  auto load_tile = [&](int n, int stage) {
    copy(copy_qk, tKgK(_, _, _, n), tKsK(_, _, _, stage));
    copy(copy_v, tVgV(_, _, _, n), tVsV(_, _, _, stage));
    smem.k_scale[stage][tid] = k_scale[int64_t(n) * kBN + tid];  // kThreads == kBN
  };

  copy(copy_qk, tQgQ, tQsQ);
  load_tile(0, 0);
  cp_async_fence();

  typename T::Mma0 mma0;
  typename T::Mma1 mma1;
  auto thr0 = mma0.get_thread_slice(tid);
  auto thr1 = mma1.get_thread_slice(tid);
  Tensor tSrQ = thr0.make_fragment_A(thr0.partition_A(sQ));  // descriptors (MMA, M, K)
  Tensor tSrK = thr0.make_fragment_B(thr0.partition_B(sK));  // (MMA, N, K, stages)
  Tensor tSrS = partition_fragment_C(mma0, Shape<Int<kBM>, Int<kBN>>{});  // int32
  Tensor tOrP = thr1.make_fragment_A(thr1.partition_A(sP));
  Tensor tOrV = thr1.make_fragment_B(thr1.partition_B(sV));
  Tensor tOrPV = partition_fragment_C(mma1, Shape<Int<kBM>, Int<D>>{});  // fp32, fresh per tile
  Tensor tOrO = make_fragment_like(tOrPV);
  clear(tOrO);
  Tensor tScS = thr0.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tOcO = thr1.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{}));
  Tensor tSsP = thr0.partition_C(sP);  // P written through the S accumulator's layout

  // Each thread holds two rows of the 64 (a warp's 16 rows, lane / 4 and lane / 4 + 8).
  const int row0 = get<0>(tScS(0));
  auto row_slot = [&](int r) { return r == row0 ? 0 : 1; };
  float qs[2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  CUTLASS_PRAGMA_UNROLL
  for (int s = 0; s < 2; ++s) qs[s] = p.q_scale[bh * p.sq_pad + m0 + row0 + 8 * s];

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1;
    if (n + 1 < n_tiles) {
      load_tile(n + 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    cutlass::arch::fence_view_async_shared();
    __syncthreads();

    gemm_fresh(mma0, tSrQ, tSrK(_, _, _, stage), tSrS);

    // Online softmax of the scheme, base 2, masked beyond the last key.
    const int64_t key0 = int64_t(n) * kBN;
    float t[size(tSrS)];
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int slot = row_slot(get<0>(tScS(i)));
      const int col = get<1>(tScS(i));
      t[i] = key0 + col < p.sk ? fp8attn::logit(tSrS(i), qs[slot], smem.k_scale[stage][col]) : -INFINITY;
      tile_max[slot] = fmaxf(tile_max[slot], t[i]);
    }
    float m_new[2], alpha[2], rowsum[2] = {0.f, 0.f};
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < 2; ++s) {
      m_new[s] = fmaxf(m[s], quad_max(tile_max[s]));
      alpha[s] = fp8attn::rescale_factor(m[s], m_new[s]);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int slot = row_slot(get<0>(tScS(i)));
      const uint8_t b = fp8attn::quant_p(t[i], m_new[slot]);  // exp2f(-inf) = 0 -> 0 for masked keys
      rowsum[slot] += fp8attn::e4m3_to_float(b);
      tSsP(i) = fp8::bitcast(b);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < 2; ++s) {
      l[s] = l[s] * alpha[s] + quad_sum(rowsum[s]);
      m[s] = m_new[s];
    }
    cutlass::arch::fence_view_async_shared();  // P's generic-proxy stores -> wgmma (async proxy)
    __syncthreads();

    gemm_fresh(mma1, tOrP, tOrV(_, _, _, stage), tOrPV);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tOrO); ++i) {
      const int slot = row_slot(get<0>(tOcO(i)));
      tOrO(i) = tOrO(i) * alpha[slot] + tOrPV(i);
    }
    __syncthreads();  // this stage's K, V and P are read: the next iteration may overwrite them
  }

  OutT* out = static_cast<OutT*>(p.out);
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tOrO); ++i) {
    const int r = get<0>(tOcO(i)), c = get<1>(tOcO(i));
    const int64_t row = m0 + r;
    if (row < p.sq) {
      const float o = fp8attn::finalize(tOrO(i), l[row_slot(r)], p.v_scale[bh * D + c], p.v_mean[bh * D + c]);
      out[(bh * p.sq + row) * D + c] = cuda::from_float<OutT>(o);
    }
  }
#endif
}

template <int D, typename OutT>
int launch(const Fp8AttentionParams& p, cudaStream_t stream) {
  auto kernel = fp8_attention_sm90_kernel<D, OutT>;
  constexpr int smem = Sm90Traits<D>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = p.bh * (p.sq_pad / kBM);
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <int D>
int launch_out(const Fp8AttentionParams& p, cudaStream_t stream) {
  switch (p.out_dtype) {
    case DType::kFloat32: return launch<D, float>(p, stream);
    case DType::kBFloat16: return launch<D, __nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch<D, __half>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int launch_fp8_attention_sm90(const Fp8AttentionParams& p, void* stream) {
  if (p.bh == 0 || p.sq == 0) return 0;
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (major != 9 || minor != 0) return static_cast<int>(cudaErrorNotSupported);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.d == 64 ? launch_out<64>(p, s) : p.d == 128 ? launch_out<128>(p, s)
                                                      : static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ddrl
