// The quantisation scheme of ddrl::fp8_attention, shared by the CPU emulation and the CUDA kernels.
//
// Every number the scheme produces is defined here once, as float arithmetic both compilers
// evaluate the same way (no additions that could be contracted into FMAs next to a product), so
// the CPU emulation reproduces the quantised Q, K, V of the GPU pre-pass bit for bit.
//
// The scheme (per batch b and head h; S_q query tokens, S_k key tokens, head dim D):
//   K smoothing   k_j <- k_j - mean_t k_t            exact: softmax is shift-invariant per row
//   rotation      x <- H diag(sign) x   for q and k   exact: H H^T = D I, spreads outliers over D
//   Q, K          INT8, one scale per token (amax/127) 7 bits of mantissa for QK^T, int32 exact
//   logits        t_ij = float(q8_i . k8_j) * qs_i * ks_j, where qs_i already holds
//                 softmax_scale * log2(e) / D (the 1/D undoes the unnormalised Hadamard)
//   online softmax over key tiles of kKeyTile tokens, in order, base 2:
//                 m' = max(m, max_j t_ij); alpha = 2^(m - m'); p_ij = 2^(t_ij - m') <= 1
//   P             FP8 e4m3 of p * 448 (per row, the running max makes p <= 1)
//   V smoothing   v_j <- v_j - mean_t v_t, added back at the end (exact: the weights sum to 1)
//   V             FP8 e4m3, one scale per channel (amax over tokens / 448), stored transposed
//   l, o          l' = l alpha + sum_j p8_ij;  o' = o alpha + sum_j p8_ij v8_jd   (fp32, the PV
//                 tile product accumulated outside the tensor-core accumulator)
//   out_id        o_d / l * vs_d + vm_d
// Means are fp32 sums over chunks of kTokenChunk tokens (sequential inside a chunk), then over
// chunks in order, divided by S: a fixed order, so the GPU reduction gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DDRL_FP8_HD __host__ __device__ __forceinline__
#else
#define DDRL_FP8_HD inline
#endif

namespace ddrl::fp8attn {

// Keys per online-softmax step; also the padding granule of the quantised tensors (so the GPU
// kernel loads whole tiles without bounds checks: padded keys are zeros and masked).
constexpr int kKeyTile = 128;
// Tokens per partial sum of the K and V means.
constexpr int kTokenChunk = 128;
constexpr float kInt8Max = 127.f;
constexpr float kFp8Max = 448.f;  // largest finite e4m3fn
constexpr float kLog2e = 1.4426950408889634074f;

DDRL_FP8_HD int64_t padded_len(int64_t s) { return (s + kKeyTile - 1) / kKeyTile * kKeyTile; }
DDRL_FP8_HD int64_t num_token_chunks(int64_t s) { return (s + kTokenChunk - 1) / kTokenChunk; }

// The random signs of the rotation: a fixed pseudo-random +-1 per channel (a 32-bit integer hash
// of the channel index), the same for every head and every run.
DDRL_FP8_HD float hadamard_sign(int d) {
  uint32_t x = static_cast<uint32_t>(d) * 0x9E3779B1u + 0x7F4A7C15u;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  return (x & 1u) ? -1.f : 1.f;
}

// In-place unnormalised fast Walsh-Hadamard transform of x[0..D), D a power of two. Stage h pairs
// element j (bit h clear) with j + h: (a, b) -> (a + b, a - b). Each output of a stage depends on
// exactly two inputs, so any schedule that keeps the stages in this order (shuffles on the GPU)
// gives the same bits.
DDRL_FP8_HD void fwht(float* x, int D) {
  for (int h = 1; h < D; h *= 2) {
    for (int i = 0; i < D; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

// ---- INT8 per token ---------------------------------------------------------------------------
// max(a, b) that keeps a NaN (fmaxf drops it): a NaN (or, after the Hadamard mix, an inf) in a token
// makes its amax and so its scale NaN, and the output NaN exactly where sdpa's is (the Q row; for K or
// V, through their means, the whole head or channel), instead of a silently finite result.
DDRL_FP8_HD float nan_max(float a, float b) { return b != b ? b : (a != a ? a : fmaxf(a, b)); }
DDRL_FP8_HD float int8_inv_scale(float amax) { return amax > 0.f ? kInt8Max / amax : 0.f; }
DDRL_FP8_HD float int8_scale(float amax) { return amax / kInt8Max; }
DDRL_FP8_HD int8_t quant_int8(float x, float inv_scale) {
  float r = rintf(x * inv_scale);  // round half to even
  r = fminf(fmaxf(r, -kInt8Max), kInt8Max);
  return static_cast<int8_t>(r);
}

// ---- FP8 e4m3fn (bias 7, max 448, subnormals m * 2^-9, no infinities) --------------------------
// Round to nearest even, saturating to +-448 (PTX cvt.rn.satfinite.e4m3x2.f32). NaN -> 0x7f.
DDRL_FP8_HD uint8_t float_to_e4m3(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7f;
  float a;
  memcpy(&a, &u, 4);
  if (a >= kFp8Max) return sign | 0x7e;
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9 (m == 8 encodes 2^-6 itself)
    return sign | static_cast<uint8_t>(rintf(a * 512.f));
  }
  int e = static_cast<int>(u >> 23) - 127;  // -6 .. 8
  uint32_t mant = u & 0x7fffffu;
  uint32_t r = mant >> 20;
  const uint32_t rem = mant & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) ++r;
  if (r == 8u) {
    r = 0;
    ++e;
  }
  uint32_t bits = (static_cast<uint32_t>(e + 7) << 3) | r;
  if (bits > 0x7eu) bits = 0x7eu;
  return sign | static_cast<uint8_t>(bits);
}

DDRL_FP8_HD float e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 0xf, m = b & 7;
  float v;
  if (e == 0) {
    v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  } else if (e == 15 && m == 7) {
    v = NAN;
  } else {
    v = ldexpf(1.f + static_cast<float>(m) * 0.125f, e - 7);
  }
  return (b & 0x80) ? -v : v;
}

DDRL_FP8_HD float fp8_inv_scale(float amax) { return amax > 0.f ? kFp8Max / amax : 0.f; }
DDRL_FP8_HD float fp8_scale(float amax) { return amax / kFp8Max; }

// ---- scales and the online softmax -------------------------------------------------------------
// The per-token factor folded into the Q scale: softmax_scale * log2(e) / D.
DDRL_FP8_HD float logit_factor(float softmax_scale, int D) {
  return softmax_scale * kLog2e / static_cast<float>(D);
}
DDRL_FP8_HD float q_token_scale(float amax, float factor) { return int8_scale(amax) * factor; }

// Base-2 logit of one query/key pair from the exact int32 dot product.
DDRL_FP8_HD float logit(int32_t dot, float qs, float ks) { return static_cast<float>(dot) * qs * ks; }

// 2^(m_old - m_new), 0 on the first tile (m_old = -inf).
DDRL_FP8_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
}
DDRL_FP8_HD uint8_t quant_p(float t, float m_new) { return float_to_e4m3(exp2f(t - m_new) * kFp8Max); }

// max|x - mean| over tokens from the tokens' max and min (rounding is monotonic, so this equals
// the elementwise maximum of |fl(x - mean)|).
DDRL_FP8_HD float centred_amax(float vmax, float vmin, float mean) {
  return fmaxf(vmax - mean, mean - vmin);
}

// a * b + c with both roundings, on host and device alike (nvcc contracts a product next to an add
// into one FFMA unless told not to; host builds target x86-64 without FMA). The kernels use it for
// every multiply-add of the scheme (l and o updates, finalize).
DDRL_FP8_HD float mul_add_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  return a * b + c;
#endif
}

DDRL_FP8_HD float finalize(float o, float l, float vs, float vm) { return mul_add_rn(o / l, vs, vm); }

}  // namespace ddrl::fp8attn
