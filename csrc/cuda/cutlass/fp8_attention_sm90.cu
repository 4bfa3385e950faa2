// sm_90a attention kernel of ddrl::fp8_attention on the pre-quantised tensors (CuTe, TMA, wgmma).
//
// What it is (per CTA: 128 query rows of one head, 384 threads = 3 warpgroups):
//  - warpgroup 0 is the producer (setmaxnreg down to 24 registers); one thread of it issues
//    TMA loads: the 128 x D INT8 Q tile once (own mbarrier), then per 128-key tile the K tile
//    (INT8, 128 x D), the V^T tile (e4m3, D x 128) and the tile's 128 K scales (cp.async.bulk,
//    512 bytes) into a 3-stage shared-memory ring guarded by cutlass::PipelineTmaAsync
//    (full barriers with transaction counts, empty barriers released by the consumers);
//  - warpgroups 1 and 2 are consumers (setmaxnreg up to 240), 64 query rows each: S = Q K^T by
//    int8 wgmma (IGMMA, int32 exact), the online softmax of the scheme in registers
//    (ddrl/fp8_attention_math.h: same formulas, same tile order as the CPU emulation; P rounded
//    to e4m3 by cvt.rn.satfinite, the rounding fp8attn::float_to_e4m3 defines), P kept in
//    registers (permuted within each quad to the wgmma A-operand layout by two shuffles per
//    32 keys and row half; checked at compile time below) and P V^T by fp8 wgmma with A from
//    registers (QGMMA, RS) into a fresh fp32 accumulator, added to the output in registers
//    (o' = o * alpha + pv, rounded like the emulation: no FMA contraction).
//  - inside a consumer warpgroup, tile n's QK^T and tile n-1's PV are issued back to back and the
//    softmax of tile n runs while the PV wgmma of tile n-1 is in flight (FA3-style intra-warpgroup
//    overlap); a stage goes back to the producer after its PV has completed.
//  - the epilogue writes O from registers, two adjacent columns per store (bf16x2 / fp16x2: 32 bits,
//    fp32: 64 bits; the accumulator layout that makes each pair adjacent is proved at compile time).
// What it is not: no inter-warpgroup ping-pong scheduling of the two consumers (named barriers),
// no TMA multicast / clusters, no persistent tile scheduler, no TMA store epilogue, no causal
// masking. It has been compiled, never run (no GPU here).
//
// Tensor maps: cute::make_tma_copy encodes them through cutlass::call_cuTensorMapEncodeTiled,
// which, without CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL (never define it for this extension),
// resolves the driver function at run time with cudaGetDriverEntryPointByVersion: the extension
// does not link libcuda and still imports on machines without a driver. The launcher checks the
// entry point and every TMA precondition first, so the encode cannot fail (CUTLASS would assert).
//
// CUDA/CUTLASS headers only (no torch).
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <mutex>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "ddrl/fp8_attention_math.h"
#include "ddrl/fp8_attention_params.h"
#include "../row_reduce.cuh"

namespace ddrl {
namespace {

using namespace cute;
using fp8 = cutlass::float_e4m3_t;

constexpr int kWgRows = 64;                    // query rows per consumer warpgroup
constexpr int kConsumers = 2;                  // consumer warpgroups
constexpr int kBM = kWgRows * kConsumers;      // query rows per CTA (sq_pad is a multiple)
constexpr int kBN = fp8attn::kKeyTile;         // keys per online-softmax step
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kStages = 3;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
// setmaxnreg moves registers within the CTA's own allocation: the threads x registers per thread that
// __launch_bounds__(kThreads, 1) grants (65536 / kThreads, rounded down to the allocation granule of 8),
// not the whole 64K file. A split beyond it makes every consumer spin in setmaxnreg.inc forever.
constexpr int kRegsPerThreadGranted = (65536 / kThreads) / 8 * 8;
static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= kThreads * kRegsPerThreadGranted,
              "the producer/consumer register split exceeds what the launch bound grants the CTA");
static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0 && kProducerRegs >= 24 && kConsumerRegs <= 256,
              "setmaxnreg takes multiples of 8 in [24, 256]");
static_assert(kBM == 128 && fp8attn::kKeyTile == 128, "the padding granule must be the CTA's row tile");

template <int D>
struct Sm90Traits {
  using AtomQK = std::conditional_t<D == 128, GMMA::Layout_K_SW128_Atom<int8_t>, GMMA::Layout_K_SW64_Atom<int8_t>>;
  using Atom8 = GMMA::Layout_K_SW128_Atom<fp8>;  // 128 keys of e4m3 = 128 bytes
  using LayoutQ = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBM>, Int<D>>{}));
  using LayoutK1 = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBN>, Int<D>>{}));  // one stage (TMA box)
  using LayoutV1 = decltype(tile_to_shape(Atom8{}, Shape<Int<D>, Int<kBN>>{}));
  using LayoutK = decltype(tile_to_shape(AtomQK{}, Shape<Int<kBN>, Int<D>, Int<kStages>>{}));
  using LayoutV = decltype(tile_to_shape(Atom8{}, Shape<Int<D>, Int<kBN>, Int<kStages>>{}));
  using WGs = Layout<Shape<Int<kConsumers>, _1, _1>>;  // consumer warpgroups stacked along M
  using OpS = SM90_64x128x32_S32S8S8_SS_TN;
  using OpO = std::conditional_t<D == 128, SM90_64x128x32_F32E4M3E4M3_RS_TN<>, SM90_64x64x32_F32E4M3E4M3_RS_TN<>>;
  using MmaS = decltype(make_tiled_mma(OpS{}, WGs{}));
  using MmaO = decltype(make_tiled_mma(OpO{}, WGs{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct Smem {
    alignas(1024) int8_t q[cosize_v<LayoutQ>];
    alignas(1024) int8_t k[cosize_v<LayoutK>];
    alignas(1024) fp8 v[cosize_v<LayoutV>];
    alignas(16) float k_scale[kStages][kBN];
    typename Pipeline::SharedStorage pipe;
    alignas(8) uint64_t q_bar;
  };
  static constexpr int kSmemBytes = int(sizeof(Smem)) + 1024;  // + room to align the base
  static constexpr uint32_t kQBytes = kBM * D;
  static constexpr uint32_t kScaleBytes = kBN * sizeof(float);
  static constexpr uint32_t kStageBytes = kBN * D + D * kBN + kScaleBytes;  // K + V^T + K scales
  static_assert(cosize_v<LayoutK1> == kBN * D && cosize_v<LayoutV1> == D * kBN, "dense TMA boxes");
};

// ---- TMA descriptors (host) ---------------------------------------------------------------------
// Q and K: [BH, rows_pad, D] int8 as (rows, D, BH); V^T: [BH, D, Sk_pad] e4m3 as (D, Sk_pad, BH).
template <int D>
auto make_tma_q(const int8_t* q8, int64_t sq_pad, int64_t bh) {
  Tensor m = make_tensor(make_gmem_ptr(q8), make_shape(sq_pad, Int<D>{}, bh), make_stride(Int<D>{}, _1{}, sq_pad * D));
  return make_tma_copy(SM90_TMA_LOAD{}, m, typename Sm90Traits<D>::LayoutQ{});
}
template <int D>
auto make_tma_k(const int8_t* k8, int64_t sk_pad, int64_t bh) {
  Tensor m = make_tensor(make_gmem_ptr(k8), make_shape(sk_pad, Int<D>{}, bh), make_stride(Int<D>{}, _1{}, sk_pad * D));
  return make_tma_copy(SM90_TMA_LOAD{}, m, typename Sm90Traits<D>::LayoutK1{});
}
template <int D>
auto make_tma_v(const uint8_t* v8t, int64_t sk_pad, int64_t bh) {
  Tensor m = make_tensor(make_gmem_ptr(reinterpret_cast<const fp8*>(v8t)), make_shape(Int<D>{}, sk_pad, bh),
                         make_stride(sk_pad, _1{}, sk_pad * D));
  return make_tma_copy(SM90_TMA_LOAD{}, m, typename Sm90Traits<D>::LayoutV1{});
}

template <int D>
struct KernelParams {
  decltype(make_tma_q<D>(nullptr, 0, 0)) tma_q;
  decltype(make_tma_k<D>(nullptr, 0, 0)) tma_k;
  decltype(make_tma_v<D>(nullptr, 0, 0)) tma_v;
  Fp8AttentionParams p;
  // ceil(sk / kBN), set with p: the loops compare against this kernel parameter (constant bank)
  // instead of keeping a computed trip count live across them (it was spilled at D = 128).
  int n_tiles;
};

// ---- P from the S accumulator layout to the A-operand layout of the RS wgmma ---------------------
// A thread of a quad (lane % 4 = q) holds, per 8-key group j and row half h (rows g, g + 8), the
// pair of keys 8j + 2q, 8j + 2q + 1 of the S accumulator; the 8-bit A operand wants, per 32 keys,
// keys 4q .. 4q + 3 and 16 + 4q .. 16 + 4q + 3. Per 32 keys and row half, every thread packs two
// words, W0 = pairs of groups (0, 2) and W1 = groups (1, 3), and reads two words from its quad:
// round r reads lane perm_src(q, r), which provides W[perm_word(src, r)]; the two words X (keys
// 4q, 4q + 1, 16 + 4q, 17 + 4q) and Y (the next two of each) are byte-permuted into the A registers.
__host__ __device__ constexpr int perm_src(int lane, int round) {
  const int q = lane & 3;
  return (lane & ~3) | (2 * (q & 1) + ((q >> 1) ^ round));
}
__host__ __device__ constexpr int perm_word(int lane, int round) { return (lane & 1) ^ round; }
__host__ __device__ constexpr bool perm_swap(int lane) { return (lane & 2) != 0; }  // X is round 1's word

// Compile-time emulation of that exchange on the CuTe layouts of the two wgmma atoms: value ids are
// positions m + 64 n in the 64 x 128 S tile; after the exchange, A register value (thread t, value
// e + 4h + 8 half of the 32-key block kb) must hold the id the A layout assigns to it.
template <class CL, class AL>
constexpr bool p_exchange_is_exact(int t_begin, int t_end) {
  struct Word {
    int b[4];
  };
  for (int t = t_begin; t < t_end; ++t) {
    for (int kb = 0; kb < 4; ++kb) {
      for (int h = 0; h < 2; ++h) {
        auto word = [&](int lane, int w) {  // word w of lane `lane` of t's warp
          const int src = (t & ~31) | lane;
          const int j0 = 4 * kb + w, j1 = j0 + 2;
          Word out{};
          out.b[0] = int(CL{}(src, 4 * j0 + 2 * h));
          out.b[1] = int(CL{}(src, 4 * j0 + 2 * h + 1));
          out.b[2] = int(CL{}(src, 4 * j1 + 2 * h));
          out.b[3] = int(CL{}(src, 4 * j1 + 2 * h + 1));
          return out;
        };
        const int lane = t & 31;
        const int s0 = perm_src(lane, 0), s1 = perm_src(lane, 1);
        const Word r0 = word(s0 & 31, perm_word(s0, 0)), r1 = word(s1 & 31, perm_word(s1, 1));
        const Word x = perm_swap(lane) ? r1 : r0, y = perm_swap(lane) ? r0 : r1;
        const int lo[4] = {x.b[0], x.b[1], y.b[0], y.b[1]};
        const int hi[4] = {x.b[2], x.b[3], y.b[2], y.b[3]};
        for (int e = 0; e < 4; ++e) {
          const int a_lo = int(AL{}(t, e + 4 * h)), a_hi = int(AL{}(t, e + 4 * h + 8));  // m + 64 k
          if (lo[e] != a_lo % 64 + 64 * (a_lo / 64 + 32 * kb)) return false;
          if (hi[e] != a_hi % 64 + 64 * (a_hi / 64 + 32 * kb)) return false;
        }
      }
    }
  }
  return true;
}
// One constant evaluation per 4 threads (the front end bounds the work of each).
template <int Chunk>
struct PExchangeChunk {
  static constexpr bool value = p_exchange_is_exact<MMA_Traits<SM90_64x128x32_S32S8S8_SS_TN>::CLayout,
                                                    MMA_Traits<SM90_64x128x32_F32E4M3E4M3_RS_TN<>>::ALayout>(
      4 * Chunk, 4 * Chunk + 4);
};
template <int... Chunks>
constexpr bool p_exchange_all(std::integer_sequence<int, Chunks...>) {
  return (PExchangeChunk<Chunks>::value && ...);
}
static_assert(p_exchange_all(std::make_integer_sequence<int, 32>{}),
              "the quad exchange of P does not produce the wgmma A-operand layout");
static_assert(std::is_same_v<MMA_Traits<SM90_64x128x32_F32E4M3E4M3_RS_TN<>>::ALayout,
                             MMA_Traits<SM90_64x64x32_F32E4M3E4M3_RS_TN<>>::ALayout>);

// ---- the epilogue's paired stores ----------------------------------------------------------------
// Output accumulator values 2j and 2j + 1 of every consumer thread must be columns c and c + 1 (c even)
// of one row, so a pair is one 32-bit (bf16x2, fp16x2) or 64-bit (fp32 x2) aligned store. Proved on
// the tiled MMA's (thread, value) -> m + kBM n map, the order partition_fragment_C gives tOrO
// (one atom per thread: size(tOrO) == D / 2 and compact, asserted in the kernel).
template <class TV>
constexpr bool c_pairs_are_adjacent_columns(int t_begin, int t_end) {
  for (int t = t_begin; t < t_end; ++t) {
    for (int v = 0; v + 1 < int(size<1>(TV{})); v += 2) {
      const int a = int(TV{}(t, v)), b = int(TV{}(t, v + 1));
      if (b != a + kBM || (a / kBM) % 2 != 0) return false;
    }
  }
  return true;
}
template <int D>
using OutTV = decltype(typename Sm90Traits<D>::MmaO{}.get_layoutC_TV());
// One constant evaluation per 8 threads (the front end bounds the work of each).
template <int D, int Chunk>
struct CPairsChunk {
  static constexpr bool value = c_pairs_are_adjacent_columns<OutTV<D>>(8 * Chunk, 8 * Chunk + 8);
};
template <int D, int... Chunks>
constexpr bool c_pairs_all(std::integer_sequence<int, Chunks...>) {
  return (CPairsChunk<D, Chunks>::value && ...);
}
static_assert(size<0>(OutTV<64>{}) == 256 && size<0>(OutTV<128>{}) == 256, "256 consumer threads");
static_assert(c_pairs_all<64>(std::make_integer_sequence<int, 32>{}) &&
                  c_pairs_all<128>(std::make_integer_sequence<int, 32>{}),
              "the output accumulator does not hold pairs of adjacent columns: the paired stores are wrong");

// Columns c, c + 1 of one output row in one store (ptr aligned to the pair: c and D even, out
// 16-byte aligned). Round to nearest even per element, as cuda::from_float rounds.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* ptr, float lo, float hi) {
  if constexpr (std::is_same_v<OutT, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(ptr) = __floats2bfloat162_rn(lo, hi);
  } else if constexpr (std::is_same_v<OutT, __half>) {
    *reinterpret_cast<__half2*>(ptr) = __floats2half2_rn(lo, hi);
  } else {
    static_assert(std::is_same_v<OutT, float>);
    // One 64-bit word, lo at the lower address (a float2 assignment is split into two 32-bit stores,
    // __stwb makes it a strong one).
    *reinterpret_cast<unsigned long long*>(ptr) =
        (static_cast<unsigned long long>(__float_as_uint(hi)) << 32) | __float_as_uint(lo);
  }
}

// Register fragments are indexed linearly below: their layouts must be compact column-major.
template <class L>
constexpr bool is_compact() {
  for (int i = 0; i < int(size(L{})); ++i)
    if (int(L{}(i)) != i) return false;
  return true;
}

// S accumulator value i: element i & 1 of the pair of 8-key group i >> 2, row half (i >> 1) & 1.
__device__ __forceinline__ int row_half(int i) { return (i >> 1) & 1; }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Two floats to e4m3 (round to nearest even, saturating: fp8attn::float_to_e4m3), lo in the low byte.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}
// The exact values of two e4m3 (low byte first), through f16x2.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t pair) {
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<uint16_t>(pair)));
  __half2 h;
  memcpy(&h, &h2, 4);
  return __half22float2(h);
}

// Issue acc = A B^T over the K extent of the tiles into a zeroed accumulator (one wgmma batch).
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_issue(Mma& mma, const TA& tA, const TB& tB, TC& tC) {
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tC);
}

template <int D, typename OutT>
__global__ void __launch_bounds__(kThreads, 1) fp8_attention_sm90_kernel(const __grid_constant__ KernelParams<D> kp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Sm90Traits<D>;
  using Pipeline = typename T::Pipeline;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  extern __shared__ char smem_raw[];
  auto& smem = *reinterpret_cast<typename T::Smem*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const Fp8AttentionParams& p = kp.p;
  const int warp_group = cutlass::canonical_warp_group_idx();
  // 32-bit block index math (check_params: the grid is below 2^31 blocks, sq_pad below 2^32): no
  // 64-bit division, and bh, m_block are known to be zero-extended (no high words kept live).
  const uint32_t m_blocks = uint32_t(p.sq_pad / kBM);
  const int64_t bh = blockIdx.x / m_blocks, m_block = blockIdx.x % m_blocks;
  const int64_t m0 = m_block * kBM;

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = T::kStageBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = 128 * kConsumers;
  if (threadIdx.x == 0) Barrier::init(&smem.q_bar, 1);
  // Warp 0 initialises the stage barriers; every thread fences the initialisation.
  Pipeline pipeline(smem.pipe, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename T::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k), typename T::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v), typename T::LayoutV{});

  if (warp_group == 0) {
    // ---- producer: one thread issues every load ----
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) {
      prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
      prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
      prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
      Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.sq_pad, Int<D>{}, p.bh));
      Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.sk_pad, Int<D>{}, p.bh));
      Tensor mV = kp.tma_v.get_tma_tensor(make_shape(Int<D>{}, p.sk_pad, p.bh));
      Tensor gQ = local_tile(mQ(_, _, bh), Shape<Int<kBM>, Int<D>>{}, make_coord(m_block, 0));  // (kBM, D)
      Tensor gK = local_tile(mK(_, _, bh), Shape<Int<kBN>, Int<D>>{}, make_coord(_, 0));        // (kBN, D, n)
      Tensor gV = local_tile(mV(_, _, bh), Shape<Int<D>, Int<kBN>>{}, make_coord(0, _));        // (D, kBN, n)
      auto cq = kp.tma_q.get_slice(0);
      auto ck = kp.tma_k.get_slice(0);
      auto cv = kp.tma_v.get_slice(0);
      Tensor tQg = cq.partition_S(gQ);
      Tensor tQs = cq.partition_D(sQ);
      Tensor tKg = ck.partition_S(gK);  // (TMA, .., n)
      Tensor tKs = ck.partition_D(sK);  // (TMA, .., stage)
      Tensor tVg = cv.partition_S(gV);
      Tensor tVs = cv.partition_D(sV);

      Barrier::arrive_and_expect_tx(&smem.q_bar, T::kQBytes);
      copy(kp.tma_q.with(smem.q_bar), tQg, tQs);

      const float* k_scale = p.k_scale + bh * p.sk_pad;
      auto state = cutlass::make_producer_start_state<Pipeline>();
      for (int n = 0; n < kp.n_tiles; ++n) {
        pipeline.producer_acquire(state);  // waits for a free stage, expects kStageBytes
        uint64_t* bar = pipeline.producer_get_barrier(state);
        const int s = state.index();
        copy(kp.tma_k.with(*bar), tKg(_, _, _, n), tKs(_, _, _, s));
        copy(kp.tma_v.with(*bar), tVg(_, _, _, n), tVs(_, _, _, s));
        SM90_BULK_COPY_G2S::copy(k_scale + int64_t(n) * kBN, bar, smem.k_scale[s], int32_t(T::kScaleBytes));
        ++state;
      }
    }
    return;
  }

  // ---- consumers: warpgroups 1 and 2, query rows m0 + 64 (warp_group - 1) + [0, 64) ----
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int ctid = threadIdx.x - 128;
  const int lane = threadIdx.x & 31;
  typename T::MmaS mma_s;
  typename T::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // smem descriptors (MMA, 1, D / 32)
  Tensor tSrK = thr_s.partition_fragment_B(sK);  // (MMA, 1, D / 32, stages)
  Tensor tOrVt = thr_o.partition_fragment_B(sV);  // (MMA, 1, kBN / 32, stages)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBM>, Int<kBN>>{});   // int32
  Tensor tOrPV = partition_fragment_C(mma_o, Shape<Int<kBM>, Int<D>>{});    // fp32, fresh per tile
  Tensor tOrO = make_fragment_like(tOrPV);
  Tensor tOrP = make_tensor<fp8>(partition_shape_A(mma_o, Shape<Int<kBM>, Int<kBN>>{}));  // e4m3 registers
  Tensor tOrPw = recast<uint32_t>(tOrP);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<D>>{}));
  static_assert(size(tSrS) == 64 && size(tOrP) == 64 && size(tOrPw) == 16 && size(tOrO) == D / 2);
  static_assert(is_compact<decltype(tSrS.layout())>() && is_compact<decltype(tOrO.layout())>() &&
                is_compact<decltype(tOrPV.layout())>() && is_compact<decltype(tOrP.layout())>() &&
                is_compact<decltype(tOrPw.layout())>());

  // Each thread holds two rows (g and g + 8 of its warp's 16) of its warpgroup's 64.
  const int row0 = int(get<0>(tScS(0)));
  float qs[2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) qs[h] = p.q_scale[bh * p.sq_pad + m0 + row0 + 8 * h];
  clear(tOrO);

  // Online softmax of tile `n` (stage `s`) on tSrS: updates m, l; alpha = 2^(m_old - m_new);
  // writes P (e4m3, A-operand layout) to pw.
  auto softmax = [&](int s, int n, uint32_t (&pw)[16], float (&alpha)[2]) {
    const float* ks = smem.k_scale[s];
    const int64_t valid = p.sk - int64_t(n) * kBN;  // keys of this tile before the padding
    float t[64];
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 64; ++i) {
      const int col = int(get<1>(tScS(i)));
      t[i] = col < valid ? fp8attn::logit(tSrS(i), qs[row_half(i)], ks[col]) : -INFINITY;
      tile_max[row_half(i)] = fmaxf(tile_max[row_half(i)], t[i]);
    }
    float rowsum[2] = {0.f, 0.f};
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m[h], quad_max(tile_max[h]));
      alpha[h] = fp8attn::rescale_factor(m[h], m_new);
      m[h] = m_new;
    }
    uint32_t pair[16][2];  // e4m3 pairs per 8-key group and row half
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 16; ++j) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int i = 4 * j + 2 * h;  // exp2f(-inf) = 0: masked keys give 0
        pair[j][h] = e4m3x2(exp2f(t[i] - m[h]) * fp8attn::kFp8Max, exp2f(t[i + 1] - m[h]) * fp8attn::kFp8Max);
        const float2 back = e4m3x2_to_float2(pair[j][h]);
        rowsum[h] += back.x;
        rowsum[h] += back.y;
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) l[h] = fp8attn::mul_add_rn(l[h], alpha[h], quad_sum(rowsum[h]));
    const int src0 = perm_src(lane, 0), src1 = perm_src(lane, 1);
    const bool w0 = perm_word(lane, 0) != 0, swap = perm_swap(lane);
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < 4; ++kb) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const uint32_t wa = pair[4 * kb][h] | (pair[4 * kb + 2][h] << 16);
        const uint32_t wb = pair[4 * kb + 1][h] | (pair[4 * kb + 3][h] << 16);
        // Round r provides word perm_word(lane, r): round 0 wb iff w0, round 1 the other one.
        const uint32_t r0 = __shfl_sync(0xffffffffu, w0 ? wb : wa, src0);
        const uint32_t r1 = __shfl_sync(0xffffffffu, w0 ? wa : wb, src1);
        const uint32_t x = swap ? r1 : r0, y = swap ? r0 : r1;
        pw[4 * kb + h] = __byte_perm(x, y, 0x5410);
        pw[4 * kb + 2 + h] = __byte_perm(x, y, 0x7632);
      }
    }
  };
  auto rescale_add = [&](const float (&alpha)[2]) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tOrO); ++i)
      tOrO(i) = fp8attn::mul_add_rn(tOrO(i), alpha[row_half(i)], tOrPV(i));
  };

  Barrier::wait(&smem.q_bar, 0);
  typename Pipeline::PipelineState rd;  // stage 0, phase 0
  uint32_t pw[16];
  float alpha_prev[2], alpha[2];

  // Tile 0: S, softmax.
  pipeline.consumer_wait(rd);
  gemm_issue(mma_s, tSrQ, tSrK(_, _, _, rd.index()), tSrS);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  softmax(rd.index(), 0, pw, alpha_prev);
  auto prev = rd;
  ++rd;
  for (int n = 1; n < kp.n_tiles; ++n) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 16; ++r) tOrPw(r) = pw[r];  // P of tile n - 1 (the last PV has completed)
    warpgroup_fence_operand(tOrPw);
    pipeline.consumer_wait(rd);
    gemm_issue(mma_s, tSrQ, tSrK(_, _, _, rd.index()), tSrS);        // S_n = Q K_n^T
    gemm_issue(mma_o, tOrP, tOrVt(_, _, _, prev.index()), tOrPV);    // PV_{n-1}, in flight ...
    warpgroup_wait<1>();                                             // ... while S_n is done
    warpgroup_fence_operand(tSrS);
    softmax(rd.index(), n, pw, alpha);                               // ... and softmax runs
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrPV);
    warpgroup_fence_operand(tOrPw);
    pipeline.consumer_release(prev);  // K_{n-1} and V_{n-1} are read
    rescale_add(alpha_prev);          // o = o * alpha_{n-1} + PV_{n-1}
    alpha_prev[0] = alpha[0];
    alpha_prev[1] = alpha[1];
    prev = rd;
    ++rd;
  }
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < 16; ++r) tOrPw(r) = pw[r];
  warpgroup_fence_operand(tOrPw);
  gemm_issue(mma_o, tOrP, tOrVt(_, _, _, prev.index()), tOrPV);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrPV);
  warpgroup_fence_operand(tOrPw);
  pipeline.consumer_release(prev);
  rescale_add(alpha_prev);

  // Epilogue: values i, i + 1 are columns c, c + 1 of one row (proved above): one store per pair.
  // Rows past q_len (padding of the last query tile) are not written; D is never partial.
  OutT* out = static_cast<OutT*>(p.out);
  const float* v_scale = p.v_scale + bh * D;
  const float* v_mean = p.v_mean + bh * D;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tOrO); i += 2) {
    const int r = int(get<0>(tOcO(i))), c = int(get<1>(tOcO(i)));
    const int64_t row = m0 + r;
    if (row < p.sq) {
      const float lo = fp8attn::finalize(tOrO(i), l[row_half(i)], v_scale[c], v_mean[c]);
      const float hi = fp8attn::finalize(tOrO(i + 1), l[row_half(i + 1)], v_scale[c + 1], v_mean[c + 1]);
      store_pair(out + (bh * p.sq + row) * D + c, lo, hi);
    }
  }
#elif defined(__CUDA_ARCH__)
  // An image for another architecture (e.g. TORCH_CUDA_ARCH_LIST="9.0;9.0a" picked sm_90): fail
  // loudly instead of returning with `out` unwritten.
  __trap();
#endif
}

// ---- launcher -----------------------------------------------------------------------------------
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// cuTensorMapEncodeTiled, resolved the way cutlass::call_cuTensorMapEncodeTiled resolves it.
bool tensor_map_encoder_available() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
  const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status);
#else
  const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
  // The lookup's own (non-sticky) error is cleared; the caller made sure no earlier error was pending,
  // so this clears nothing else.
  if (err != cudaSuccess) cudaGetLastError();
  return err == cudaSuccess && status == cudaDriverEntryPointSuccess && fn != nullptr;
}

// ---- per-call host work, done once ----------------------------------------------------------
// A call with the shapes (and buffers) of an earlier one costs cudaGetDevice, the launch and the
// error checks around it: the device checks, the kernel's register check and shared-memory opt-in
// are made once per device (and kernel), and the tensor maps are reused while they would encode
// the same thing (same device, base addresses and extents: PyTorch's caching allocator hands the
// same blocks back to a loop of same-shaped calls).
constexpr int kMaxDevices = 64;

// Per device: 0 = not checked yet, else 1 + the cudaError_t of the check (1 = usable).
using DeviceFlags = std::array<std::atomic<int>, kMaxDevices>;

int once_per_device(DeviceFlags& flags, int dev, int (*check)(int)) {
  if (dev < 0 || dev >= kMaxDevices) return check(dev);  // beyond the table: check every call
  const int cached = flags[dev].load(std::memory_order_acquire);
  if (cached != 0) return cached - 1;
  const int err = check(dev);  // idempotent: two threads racing here do the same calls
  flags[dev].store(err + 1, std::memory_order_release);
  return err;
}

int check_device(int dev) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (major != 9 || minor != 0) return static_cast<int>(cudaErrorNotSupported);
  if (!tensor_map_encoder_available()) return static_cast<int>(cudaErrorNotSupported);
  return 0;
}

// The kernel's checks and attribute, on the current device (`dev`).
template <int D, typename OutT>
int check_kernel(int dev) {
  using T = Sm90Traits<D>;
  auto kernel = fp8_attention_sm90_kernel<D, OutT>;
  constexpr int smem = T::kSmemBytes;
  cudaFuncAttributes attr{};
  if (const cudaError_t e = cudaFuncGetAttributes(&attr, kernel); e != cudaSuccess) return static_cast<int>(e);
  // The split must fit the registers the compiled image really got (the static_assert checks the bound).
  if (128 * kProducerRegs + 128 * kConsumers * kConsumerRegs > kThreads * attr.numRegs)
    return static_cast<int>(cudaErrorInvalidConfiguration);
  int smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (smem_optin < smem) return static_cast<int>(cudaErrorInvalidConfiguration);
  return static_cast<int>(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
}

// What a set of tensor maps encodes; equal keys give identical descriptors.
struct TensorMapKey {
  int dev;
  const void* q8;
  const void* k8;
  const void* v8t;
  int64_t sq_pad, sk_pad, bh;
  bool operator==(const TensorMapKey& o) const {
    return dev == o.dev && q8 == o.q8 && k8 == o.k8 && v8t == o.v8t && sq_pad == o.sq_pad &&
           sk_pad == o.sk_pad && bh == o.bh;
  }
};

// The kernel parameters for p: the tensor maps from a small most-recently-used table (encoded on a
// miss), the rest of p as given.
template <int D>
KernelParams<D> kernel_params(int dev, const Fp8AttentionParams& p) {
  struct Entry {
    TensorMapKey key;
    KernelParams<D> kp;
  };
  constexpr int kEntries = 8;
  static std::mutex mutex;
  static std::array<Entry*, kEntries> table{};  // most recent first; entries are never freed
  const TensorMapKey key{dev, p.q8, p.k8, p.v8t, p.sq_pad, p.sk_pad, p.bh};
  std::lock_guard<std::mutex> lock(mutex);
  int hit = -1;
  for (int i = 0; i < kEntries && table[i] != nullptr; ++i) {
    if (table[i]->key == key) { hit = i; break; }
  }
  Entry* e = nullptr;
  if (hit >= 0) {
    e = table[hit];
  } else {
    e = table[kEntries - 1];  // reuse the least recent slot's storage
    const KernelParams<D> fresh{make_tma_q<D>(p.q8, p.sq_pad, p.bh), make_tma_k<D>(p.k8, p.sk_pad, p.bh),
                                make_tma_v<D>(p.v8t, p.sk_pad, p.bh), p, 0};
    if (e == nullptr) e = new Entry{key, fresh};
    else *e = Entry{key, fresh};
    hit = kEntries - 1;
  }
  for (int i = hit; i > 0; --i) table[i] = table[i - 1];  // move to the front
  table[0] = e;
  KernelParams<D> kp = e->kp;
  kp.p = p;  // scales, v_mean and the output change from call to call
  kp.n_tiles = int((p.sk + kBN - 1) / kBN);  // < 2^25: sk_pad < 2^32 (check_params)
  return kp;
}

template <int D, typename OutT>
int launch(const Fp8AttentionParams& p, int dev, cudaStream_t stream) {
  static DeviceFlags kernel_ready{};
  if (const int err = once_per_device(kernel_ready, dev, &check_kernel<D, OutT>)) return err;
  const KernelParams<D> kp = kernel_params<D>(dev, p);
  const int64_t blocks = p.bh * (p.sq_pad / kBM);
  fp8_attention_sm90_kernel<D, OutT><<<static_cast<unsigned>(blocks), kThreads, Sm90Traits<D>::kSmemBytes, stream>>>(kp);
  return static_cast<int>(cudaGetLastError());
}

template <int D>
int launch_out(const Fp8AttentionParams& p, int dev, cudaStream_t stream) {
  switch (p.out_dtype) {
    case DType::kFloat32: return launch<D, float>(p, dev, stream);
    case DType::kBFloat16: return launch<D, __nv_bfloat16>(p, dev, stream);
    case DType::kFloat16: return launch<D, __half>(p, dev, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// Every precondition of the kernel and of its tensor maps (cuTensorMapEncodeTiled: 16-byte
// aligned base, strides multiples of 16 bytes below 2^40, dimensions below 2^32).
int check_params(const Fp8AttentionParams& p) {
  const int bad = static_cast<int>(cudaErrorInvalidValue);
  if (p.d != 64 && p.d != 128) return bad;
  if (p.bh < 1 || p.sq < 1 || p.sk < 1) return bad;
  if (p.sq_pad < p.sq || p.sk_pad < p.sk || p.sq_pad % kBM != 0 || p.sk_pad % kBN != 0) return bad;
  if (!p.q8 || !p.q_scale || !p.k8 || !p.k_scale || !p.v8t || !p.v_scale || !p.v_mean || !p.out) return bad;
  if (!aligned16(p.q8) || !aligned16(p.k8) || !aligned16(p.v8t) || !aligned16(p.k_scale) || !aligned16(p.out))
    return static_cast<int>(cudaErrorMisalignedAddress);
  constexpr int64_t kDimMax = int64_t(1) << 32, kStrideMax = int64_t(1) << 40;
  if (p.bh >= kDimMax || p.sq_pad >= kDimMax || p.sk_pad >= kDimMax) return bad;
  if (p.sq_pad * p.d >= kStrideMax || p.sk_pad * p.d >= kStrideMax) return bad;  // head strides
  if (p.bh * (p.sq_pad / kBM) > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  return 0;
}

}  // namespace

int launch_fp8_attention_sm90(const Fp8AttentionParams& p, void* stream) {
  if (p.bh == 0 || p.sq == 0) return 0;
  if (const int err = check_params(p)) return err;
  // An earlier launch's error is reported as it is, never cleared by the lookups below.
  if (const cudaError_t prior = cudaPeekAtLastError(); prior != cudaSuccess) return static_cast<int>(prior);
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return static_cast<int>(err);
  static DeviceFlags device_ready{};
  if (const int err = once_per_device(device_ready, dev, &check_device)) return err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.d == 64 ? launch_out<64>(p, dev, s) : launch_out<128>(p, dev, s);
}

}  // namespace ddrl
