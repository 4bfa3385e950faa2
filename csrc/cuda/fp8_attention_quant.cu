// CUDA pre-pass of ddrl::fp8_attention: quantises q, k, v into the layouts the sm_90a kernel reads
// (scheme and formulas: ddrl/fp8_attention_math.h; the CPU emulation computes the same bits).
// q, k, v are read through their batch, head and token strides (channel stride 1, Fp8TokenStrides):
// a view is not copied first. Every load is a scalar one (threads of a warp take adjacent channels
// of a token, so the loads coalesce whatever the token stride); the outputs are packed.
//   1. chunk_stats:  per (head, chunk of 128 tokens, channel): sum of k, sum of v, max v, min v
//   2. finish_stats: per (head, channel): chunk sums in order -> K mean, V mean; V amax and scale
//   3. quant_qk:     one warp per token: centre (K), sign flip, Hadamard by shuffles, INT8 + scale
//   4. quant_v:      64 tokens x D per block: centre, e4m3 per channel, transposed through smem
// Memory-bound and short next to the attention; no tensor cores. No torch headers.
#include <cuda_runtime.h>

#include "ddrl/fp8_attention_math.h"
#include "ddrl/fp8_attention_params.h"
#include "row_reduce.cuh"

namespace ddrl {
namespace {

using namespace fp8attn;
constexpr int kMaxGridY = 65535;

struct Workspace {
  float* partials;  // [BH, chunks, 4, D]: k sum, v sum, v max, v min
  float* k_mean;    // [BH, D]
  float* v_amax;    // [BH, D]
};

Workspace carve(const Fp8QuantizeParams& p) {
  const int64_t chunks = num_token_chunks(p.sk);
  Workspace w;
  w.partials = p.workspace;
  w.k_mean = p.workspace + p.bh * chunks * 4 * p.d;
  w.v_amax = w.k_mean + p.bh * p.d;
  return w;
}

// One thread per channel d (a token's channels are adjacent: coalesced whatever the token stride).
template <typename T>
__global__ void chunk_stats_kernel(Fp8QuantizeParams p, Workspace w) {
  const int64_t chunks = gridDim.x, c = blockIdx.x;
  const int d = threadIdx.x, D = p.d;
  const int64_t sk = p.sk;
  const int64_t t0 = c * kTokenChunk, t1 = sk < t0 + kTokenChunk ? sk : t0 + kTokenChunk;
  for (int64_t bh = blockIdx.y; bh < p.bh; bh += gridDim.y) {
    const T* __restrict__ k = static_cast<const T*>(p.k) + head_offset(p.k_stride, bh, p.heads) + d;
    const T* __restrict__ v = static_cast<const T*>(p.v) + head_offset(p.v_stride, bh, p.heads) + d;
    float ks = 0.f, vs = 0.f, vmax = -INFINITY, vmin = INFINITY;
    for (int64_t t = t0; t < t1; ++t) {
      const float kx = cuda::to_float(k[t * p.k_stride.token]), vx = cuda::to_float(v[t * p.v_stride.token]);
      ks += kx;
      vs += vx;
      vmax = fmaxf(vmax, vx);
      vmin = fminf(vmin, vx);
    }
    float* out = w.partials + (bh * chunks + c) * 4 * D + d;
    out[0] = ks;
    out[D] = vs;
    out[2 * D] = vmax;
    out[3 * D] = vmin;
  }
}

__global__ void finish_stats_kernel(Workspace w, float* __restrict__ v_scale, float* __restrict__ v_mean,
                                    int64_t bh_count, int64_t sk, int64_t chunks, int D) {
  const int d = threadIdx.x;
  for (int64_t bh = blockIdx.x; bh < bh_count; bh += gridDim.x) {
    float ks = 0.f, vs = 0.f, vmax = -INFINITY, vmin = INFINITY;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* in = w.partials + (bh * chunks + c) * 4 * D + d;
      ks += in[0];
      vs += in[D];
      vmax = fmaxf(vmax, in[2 * D]);
      vmin = fminf(vmin, in[3 * D]);
    }
    const float km = ks / static_cast<float>(sk), vm = vs / static_cast<float>(sk);
    const float amax = centred_amax(vmax, vmin, vm);
    w.k_mean[bh * D + d] = km;
    w.v_amax[bh * D + d] = amax;
    v_mean[bh * D + d] = vm;
    v_scale[bh * D + d] = fp8_scale(amax);
  }
}

// One warp per token; lane l holds channels [l E, l E + E), E = D / 32. Hadamard stages with
// h < E stay in registers, the others pair lanes l and l ^ (h / E) (fwht()'s order, same bits).
// (256, 8): at most 32 registers, a full SM of warps (the strided addressing's 64-bit head split
// would otherwise take it to 36; ptxas reports no spill at 32).
template <typename T, int D>
__global__ void __launch_bounds__(256, 8) quant_qk_kernel(Fp8QuantizeParams p, Workspace w) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t tok = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const bool is_k = blockIdx.z == 1;
  const int64_t S = is_k ? p.sk : p.sq, S_pad = is_k ? p.sk_pad : p.sq_pad;
  if (tok >= S_pad) return;
  const T* src = static_cast<const T*>(is_k ? p.k : p.q);
  const Fp8TokenStrides st = is_k ? p.k_stride : p.q_stride;
  int8_t* dst8 = is_k ? p.k8 : p.q8;
  float* dst_scale = is_k ? p.k_scale : p.q_scale;
  const float factor = is_k ? 1.f : p.logit_factor;
  for (int64_t bh = blockIdx.y; bh < p.bh; bh += gridDim.y) {
    const int64_t token_base = head_offset(st, bh, p.heads) + tok * st.token;  // element offset of channel 0
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane * E + e;
      float c = 0.f;
      if (tok < S) {
        c = cuda::to_float(src[token_base + d]);
        if (is_k) c = c - w.k_mean[bh * D + d];
      }
      x[e] = c * hadamard_sign(d);
    }
#pragma unroll
    for (int h = 1; h < E; h *= 2) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (!(e & h)) {
          const float a = x[e], b = x[e + h];
          x[e] = a + b;
          x[e + h] = a - b;
        }
      }
    }
#pragma unroll
    for (int h = E; h < D; h *= 2) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, x[e], h / E);
        x[e] = ((lane * E + e) & h) ? other - x[e] : x[e] + other;
      }
    }
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) amax = nan_max(amax, fabsf(x[e]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float inv = int8_inv_scale(amax);
    int8_t* out = dst8 + (bh * S_pad + tok) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = quant_int8(x[e], inv);
    if (lane == 0) dst_scale[bh * S_pad + tok] = q_token_scale(amax, factor);
  }
}

// 64 tokens x D channels per block, written transposed: v8t[bh][d][t].
template <typename T, int D>
__global__ void __launch_bounds__(256) quant_v_kernel(Fp8QuantizeParams p, Workspace w) {
  constexpr int kTok = 64;
  __shared__ uint8_t tile[D][kTok + 4];
  const int64_t t0 = int64_t(blockIdx.x) * kTok;
  for (int64_t bh = blockIdx.y; bh < p.bh; bh += gridDim.y) {
    const T* v = static_cast<const T*>(p.v) + head_offset(p.v_stride, bh, p.heads);
    for (int i = threadIdx.x; i < kTok * D; i += blockDim.x) {
      const int t = i / D, d = i % D;
      const int64_t tok = t0 + t;
      uint8_t b = 0;
      if (tok < p.sk) {
        const float x = cuda::to_float(v[tok * p.v_stride.token + d]);
        b = float_to_e4m3((x - p.v_mean[bh * D + d]) * fp8_inv_scale(w.v_amax[bh * D + d]));
      }
      tile[d][t] = b;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTok * D; i += blockDim.x) {
      const int d = i / kTok, t = i % kTok;
      p.v8t[(bh * D + d) * p.sk_pad + t0 + t] = tile[d][t];
    }
    __syncthreads();
  }
}

template <typename T, int D>
int launch(const Fp8QuantizeParams& p, cudaStream_t stream) {
  const Workspace w = carve(p);
  const int64_t chunks = num_token_chunks(p.sk);
  const unsigned gy = static_cast<unsigned>(p.bh < kMaxGridY ? p.bh : kMaxGridY);
  chunk_stats_kernel<T><<<dim3(static_cast<unsigned>(chunks), gy), D, 0, stream>>>(p, w);
  finish_stats_kernel<<<static_cast<unsigned>(p.bh < cuda::kMaxGrid ? p.bh : cuda::kMaxGrid), D, 0, stream>>>(
      w, p.v_scale, p.v_mean, p.bh, p.sk, chunks, D);
  const int64_t tokens = p.sq_pad > p.sk_pad ? p.sq_pad : p.sk_pad;
  quant_qk_kernel<T, D><<<dim3(static_cast<unsigned>((tokens + 7) / 8), gy, 2), 256, 0, stream>>>(p, w);
  quant_v_kernel<T, D><<<dim3(static_cast<unsigned>(p.sk_pad / 64), gy), 256, 0, stream>>>(p, w);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_d(const Fp8QuantizeParams& p, cudaStream_t stream) {
  return p.d == 64 ? launch<T, 64>(p, stream) : launch<T, 128>(p, stream);
}

}  // namespace

int launch_fp8_quantize(const Fp8QuantizeParams& p, void* stream) {
  if (p.bh == 0) return 0;
  if (p.d != 64 && p.d != 128) return static_cast<int>(cudaErrorInvalidValue);
  if (p.heads < 1 || p.bh % p.heads != 0) return static_cast<int>(cudaErrorInvalidValue);
  for (const Fp8TokenStrides& st : {p.q_stride, p.k_stride, p.v_stride})
    if (st.batch < 0 || st.head < 0 || st.token < 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch_d<float>(p, s);
    case DType::kBFloat16: return launch_d<__nv_bfloat16>(p, s);
    case DType::kFloat16: return launch_d<__half>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ddrl
