// Punctual's CPU decode kernels (bf16, AVX-512 BF16), loaded as torch.ops.punctual.*.
//
// Why: a one-stream decode step of a small Llama is weight-read bound, and eager PyTorch spends
// it in two places: oneDNN's bf16 GEMM, which reads weights at a third of the machine's bandwidth
// for a handful of rows, and ~75 small eager ops per layer (RMSNorm, RoPE, SiLU, adds, casts)
// at 1-5 us each. This file has one kernel for each: a small-M GEMM over weights packed for it,
// and fused element-wise kernels that round exactly where eager rounds (bf16 after each op), so
// that they give eager's results bit for bit (the GEMM does not: its sums are in another order).
//
// Built by punctual/kernels/cpu_kernels.py with the system C++ compiler, cached on disk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <omp.h>
#include <thread>
#include <type_traits>
#include <vector>

namespace {
void softmax_(float* sc, int64_t n);  // below: a row of scores into its softmax, in place

using bf16 = c10::BFloat16;

// bf16 <-> fp32 for 16 lanes. fp32 -> bf16 rounds to nearest even, as c10::BFloat16 does.
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 round_bf16(__m512 x) {  // x rounded to bf16 and back: eager's rounding after an op
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
inline void store16(bf16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

#include "team.h"

constexpr int64_t kBlockN = 16;          // outputs per packed block: one zmm of fp32 sums
#ifndef PUNCTUAL_PREFETCH
#define PUNCTUAL_PREFETCH 1024
#endif
constexpr int64_t kPrefetchElems = PUNCTUAL_PREFETCH;  // elements ahead in the weight stream (2 KiB of bf16)

// The weight [N, K] as [N/16, K/2, 16, 2]: one 64-byte load is 16 outputs x 2 inputs, the operand
// shape of vdpbf16ps, and a block of 16 outputs is one contiguous stream.
at::Tensor pack_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_bf16: a 2-D bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlockN == 0 && k % 2 == 0, "pack_bf16: out features must be a multiple of 16 and in features even, got ",
              n, "x", k);
  return weight.contiguous().view({n / kBlockN, kBlockN, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor unpack_bf16(const at::Tensor& packed) {
  const int64_t blocks = packed.size(0), k2 = packed.size(1);
  return packed.permute({0, 2, 1, 3}).reshape({blocks * kBlockN, k2 * 2});
}

// M rows (M <= kRowTile) against one block of 16 outputs. Four independent accumulator chains
// per row (inputs k-pair 0, 4, 8, ... in the first, 1, 5, 9, ... in the second, ...), summed in
// the same order whatever M is: a row's result does not depend on the rows beside it (so a
// request's output does not depend on its batch), and one row is not bound by vdpbf16ps's latency.
constexpr int64_t kRowTile = 4;
constexpr int kChains = 4;

// 32 weights (16 outputs x 2 inputs) of a packed block as bf16 pairs: bf16 as stored; int8
// widened exactly (|q| <= 127 fits bf16's 8-bit mantissa).
inline __m512bh load_pair(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }
inline __m512bh load_pair(const int8_t* w) {
  const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(wide)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(wide, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

template <int M, typename T>
inline void block_rows(const T* w, const uint32_t* x, int64_t x_stride, int64_t k2, float* out) {
  __m512 acc[M][kChains];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_ps();
  int64_t kp = 0;
  for (; kp + kChains <= k2; kp += kChains) {
    for (int c = 0; c < kChains; ++c) {
      const T* wp = w + (kp + c) * 2 * kBlockN;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchElems), _MM_HINT_T0);
      const __m512bh wv = load_pair(wp);
      for (int m = 0; m < M; ++m)
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv, (__m512bh)_mm512_set1_epi32(x[m * x_stride + kp + c]));
    }
  }
  for (int c = 0; kp < k2; ++kp, ++c) {  // fewer than kChains pairs left: one each in the first chains
    const __m512bh wv = load_pair(w + kp * 2 * kBlockN);
    for (int m = 0; m < M; ++m)
      acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv, (__m512bh)_mm512_set1_epi32(x[m * x_stride + kp]));
  }
  for (int m = 0; m < M; ++m) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
    _mm512_storeu_ps(out + m * kBlockN, sum);
  }
}

// M rows against two neighbouring blocks (32 outputs) at once: each broadcast input pair feeds two
// vdpbf16ps instead of one, which is what bounds a many-row tile (loads, not multiplies). Every
// output's sum runs in block_rows's exact order (the same four chains, added the same way), so
// the result is bitwise block_rows's whichever of the two computes it. (One template over the
// number of blocks, with arrays of weights and accumulators, compiled 13-40% slower here on
// every shape: g++ did not keep them in registers. So the two stay apart.)
template <int M, typename T>
inline void block_rows_pair(const T* w0, const T* w1, const uint32_t* x, int64_t x_stride, int64_t k2,
                            float* out0, float* out1) {
  __m512 acc0[M][kChains], acc1[M][kChains];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kChains; ++c) acc0[m][c] = acc1[m][c] = _mm512_setzero_ps();
  int64_t kp = 0;
  for (; kp + kChains <= k2; kp += kChains) {
    for (int c = 0; c < kChains; ++c) {
      const T* wp0 = w0 + (kp + c) * 2 * kBlockN;
      const T* wp1 = w1 + (kp + c) * 2 * kBlockN;
      _mm_prefetch(reinterpret_cast<const char*>(wp0 + kPrefetchElems), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wp1 + kPrefetchElems), _MM_HINT_T0);
      const __m512bh wv0 = load_pair(wp0), wv1 = load_pair(wp1);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m * x_stride + kp + c]);
        acc0[m][c] = _mm512_dpbf16_ps(acc0[m][c], wv0, xv);
        acc1[m][c] = _mm512_dpbf16_ps(acc1[m][c], wv1, xv);
      }
    }
  }
  for (int c = 0; kp < k2; ++kp, ++c) {  // as block_rows: the leftover pairs in the first chains
    const __m512bh wv0 = load_pair(w0 + kp * 2 * kBlockN), wv1 = load_pair(w1 + kp * 2 * kBlockN);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m * x_stride + kp]);
      acc0[m][c] = _mm512_dpbf16_ps(acc0[m][c], wv0, xv);
      acc1[m][c] = _mm512_dpbf16_ps(acc1[m][c], wv1, xv);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(out0 + m * kBlockN,
                     _mm512_add_ps(_mm512_add_ps(acc0[m][0], acc0[m][1]), _mm512_add_ps(acc0[m][2], acc0[m][3])));
    _mm512_storeu_ps(out1 + m * kBlockN,
                     _mm512_add_ps(_mm512_add_ps(acc1[m][0], acc1[m][1]), _mm512_add_ps(acc1[m][2], acc1[m][3])));
  }
}

template <typename T>
void rows_against_block(int64_t rows, const T* w, const uint32_t* x, int64_t x_stride, int64_t k2, float* out) {
  switch (rows) {
    case 1: block_rows<1>(w, x, x_stride, k2, out); break;
    case 2: block_rows<2>(w, x, x_stride, k2, out); break;
    case 3: block_rows<3>(w, x, x_stride, k2, out); break;
    default: block_rows<4>(w, x, x_stride, k2, out); break;
  }
}

// Blocks [b0, b1) of a packed weight against all m_rows rows of x, tile by tile; store(b, m0,
// rows, sums) takes block b's sums for rows [m0, m0 + rows) ([rows, 16] fp32). Up to kRowTile
// rows: each block alone (a block's weights stream once per row tile). More rows: two blocks at
// a time in tiles of kPairRows rows, which needs fewer loads per multiply; same sums either way.
constexpr int64_t kPairRows = 3;

template <typename T, typename Store>
inline void gemm_blocks(const T* w, int64_t k2, const uint32_t* x, int64_t m_rows, int64_t b0, int64_t b1,
                        const Store& store) {
  alignas(64) float sums[kRowTile * kBlockN];
  alignas(64) float sums1[kRowTile * kBlockN];
  const int64_t block_elems = k2 * 2 * kBlockN;
  int64_t b = b0;
  if (m_rows > kRowTile) {
    for (; b + 1 < b1; b += 2) {
      const T* w0 = w + b * block_elems;
      const T* w1 = w0 + block_elems;
      for (int64_t m0 = 0; m0 < m_rows; m0 += kPairRows) {
        const int64_t rows = std::min<int64_t>(kPairRows, m_rows - m0);
        const uint32_t* xm = x + m0 * k2;
        if (rows == 3) block_rows_pair<3>(w0, w1, xm, k2, k2, sums, sums1);
        else if (rows == 2) block_rows_pair<2>(w0, w1, xm, k2, k2, sums, sums1);
        else block_rows_pair<1>(w0, w1, xm, k2, k2, sums, sums1);
        store(b, m0, rows, sums);
        store(b + 1, m0, rows, sums1);
      }
    }
  }
  for (; b < b1; ++b) {
    for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTile) {
      const int64_t rows = std::min<int64_t>(kRowTile, m_rows - m0);
      rows_against_block(rows, w + b * block_elems, x + m0 * k2, k2, k2, sums);
      store(b, m0, rows, sums);
    }
  }
}

// The optional bias as fp32 (nullptr without one), checked against the n outputs of `op`;
// `holder` keeps the converted copy alive for the kernel.
static const float* bias_fp32(const c10::optional<at::Tensor>& bias, int64_t n, const char* op, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(holder.numel() == n, op, ": bias has ", holder.numel(), " values, expected ", n);
  return holder.data_ptr<float>();
}

// int8 weights [N, K] in the same block layout, [N/16, K/2, 16, 2]: half the bytes of bf16.
at::Tensor pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_int8: a 2-D int8 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlockN == 0 && k % 2 == 0, "pack_int8: out features must be a multiple of 16 and in features even, got ",
              n, "x", k);
  return weight.contiguous().view({n / kBlockN, kBlockN, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// x [M, K] @ (q * scales[:, None]).T (+ bias): int8 weights widened to bf16 in registers, fp32
// sums scaled per output channel, rounded once to bf16.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "linear_int8: x must be 2-D bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlockN && packed.size(3) == 2 && packed.scalar_type() == at::kChar,
              "linear_int8: weight not packed by pack_int8");
  const auto xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), k2 = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(k == k2 * 2, "linear_int8: x has ", k, " features, the weight ", k2 * 2);
  const int64_t n = blocks * kBlockN;
  const auto scale32 = scales.to(at::kFloat).contiguous();
  TORCH_CHECK(scale32.numel() == n, "linear_int8: ", scale32.numel(), " scales for ", n, " outputs");
  at::Tensor bias32;
  const float* bias_p = bias_fp32(bias, n, "linear_int8", bias32);
  auto out = at::empty({m_rows, n}, x.options());
  const auto* w = packed.data_ptr<int8_t>();
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr());
  const float* sp = scale32.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    gemm_blocks(w, k2, xp, m_rows, b0, b1, [&](int64_t b, int64_t m0, int64_t rows, const float* sums) {
      const __m512 sv = _mm512_loadu_ps(sp + b * kBlockN);
      const __m512 bv = bias_p ? _mm512_loadu_ps(bias_p + b * kBlockN) : _mm512_setzero_ps();
      for (int64_t m = 0; m < rows; ++m) {
        const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(sums + m * kBlockN), sv, bv);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + m) * n + b * kBlockN),
                            (__m256i)_mm512_cvtneps_pbh(v));
      }
    });
  });
  return out;
}

// int4 weights: q in [0, 15] with W = (q - 8) * scale + zero per group of `group` inputs and output
// (llama.cpp's Q4_1 shape). Packed as [N/16, K/2, 16] bytes, each byte the two inputs of a pair
// (low nibble first): 32 weights in 16 bytes. Scales and zeros as [N/16, K/group, 16] fp32.
// A group's sum of (q - 8) * x runs in bf16 pairs; then total += sum * scale + sum(x) * zero.
template <int M>
inline void block_rows_int4(const uint8_t* w, const float* scale, const float* zero, const uint32_t* x,
                            const float* xsum, int64_t x_stride, int64_t k2, int64_t group_pairs, int64_t groups,
                            float* out) {
  // bf16 of q - 8 for q = 0..15, indexed by nibble (vpermw picks from the low 16 of 32 entries).
  const __m512i table = _mm512_set_epi16(
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
      (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0,
      (short)0xC100);
  const __m512i low4 = _mm512_set1_epi32(0xF);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    const int64_t kp0 = g * group_pairs;
    auto pair_weights = [&](int64_t kp) {
      const uint8_t* wp = w + kp * kBlockN;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchElems), _MM_HINT_T0);
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
      const __m512i nibbles = _mm512_or_si512(_mm512_and_si512(bytes, low4),
                                              _mm512_slli_epi32(_mm512_srli_epi32(bytes, 4), 16));
      return (__m512bh)_mm512_permutexvar_epi16(nibbles, table);
    };
    // Four chains (pairs i, i+1, i+2, i+3 of the group), unrolled so they stay in registers: with
    // one row, vdpbf16ps's latency would otherwise bound the loop.
    for (int64_t i = 0; i < group_pairs; i += 4) {
      const __m512bh w0 = pair_weights(kp0 + i), w1 = pair_weights(kp0 + i + 1);
      const __m512bh w2 = pair_weights(kp0 + i + 2), w3 = pair_weights(kp0 + i + 3);
      for (int m = 0; m < M; ++m) {
        const uint32_t* xr = x + m * x_stride + kp0 + i;
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_set1_epi32(xr[0]));
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_set1_epi32(xr[1]));
        acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, (__m512bh)_mm512_set1_epi32(xr[2]));
        acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, (__m512bh)_mm512_set1_epi32(xr[3]));
      }
    }
    const __m512 sv = _mm512_loadu_ps(scale + g * kBlockN), zv = _mm512_loadu_ps(zero + g * kBlockN);
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, sv, total[m]);
      total[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), zv, total[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * kBlockN, total[m]);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "linear_int4: x must be 2-D bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlockN && packed.scalar_type() == at::kByte,
              "linear_int4: weight not in the [N/16, K/2, 16] nibble layout");
  const auto xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), k2 = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(k == k2 * 2 && group % 8 == 0 && k % group == 0, "linear_int4: x has ", k, " features, the weight ",
              k2 * 2, ", groups of ", group);
  const int64_t n = blocks * kBlockN, groups = k / group;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat && scales.numel() == n * groups &&
              zeros.numel() == n * groups, "linear_int4: fp32 scales and zeros [N/16, K/group, 16]");
  at::Tensor bias32;
  const float* bias_p = bias_fp32(bias, n, "linear_int4", bias32);
  // Each row's sum of x over each group (fp32), for the zero points.
  std::vector<float> xsum(m_rows * groups);
  const bf16* xb = xc.data_ptr<bf16>();
  for (int64_t r = 0; r < m_rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t i = 0; i < group; ++i) sum += float(xb[r * k + g * group + i]);
      xsum[r * groups + g] = sum;
    }
  auto out = at::empty({m_rows, n}, x.options());
  const auto* w = packed.data_ptr<uint8_t>();
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  const float* xs = xsum.data();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float sums[kRowTile * kBlockN];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * k2 * kBlockN;
      const float* sb = sp + b * groups * kBlockN;
      const float* zb = zp + b * groups * kBlockN;
      const __m512 bv = bias_p ? _mm512_loadu_ps(bias_p + b * kBlockN) : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTile) {
        const int64_t rows = std::min<int64_t>(kRowTile, m_rows - m0);
        const uint32_t* xr = xp + m0 * k2;
        const float* xsr = xs + m0 * groups;
        switch (rows) {
          case 1: block_rows_int4<1>(wb, sb, zb, xr, xsr, k2, k2, group / 2, groups, sums); break;
          case 2: block_rows_int4<2>(wb, sb, zb, xr, xsr, k2, k2, group / 2, groups, sums); break;
          case 3: block_rows_int4<3>(wb, sb, zb, xr, xsr, k2, k2, group / 2, groups, sums); break;
          default: block_rows_int4<4>(wb, sb, zb, xr, xsr, k2, k2, group / 2, groups, sums); break;
        }
        for (int64_t m = 0; m < rows; ++m)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + m) * n + b * kBlockN),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(sums + m * kBlockN), bv)));
      }
    }
  });
  return out;
}

// int4 weights against int8 activations, for decode (llama.cpp's Q4 x Q8_0 scheme). Each row of x
// is quantized per weight group to int8 with one fp32 scale dx (symmetric, max |x| -> 127, round
// to nearest even), and a group's sum of q * xq runs in exact int32 with vpdpbusd (unsigned nibble
// times signed byte, four products per lane): a quarter of the dot instructions of widening the
// nibbles to bf16, and a mask and a shift instead of a table lookup. Per group and row:
//   out += scale * dx * (sum q * xq - 8 * sum xq) + zero * sum x
// The zero point takes the exact fp32 sum of x rather than dx * sum xq: the rounding error of x
// then meets only (q - 8) * scale, the weight less its zero point, never the zero point itself,
// and the sum is taken once per row with the quantization, outside the weight loop.
// The weight is packed as [N/16, K/8, 16, 4] bytes: per 8 inputs, 16 outputs x 4 bytes, byte j of
// an output holding input j in its low nibble and input 4 + j in its high one; one 64-byte load
// is two vpdpbusd operands.
struct Int8Rows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, K/group]: dx
  std::vector<int32_t> qsum;  // [M, K/group]: sum of q
  std::vector<float> sum;     // [M, K/group]: sum of x in fp32
};

// d = max|x| / 127 and q = round_half_even(x * (1 / d)) per group of `group` inputs (a multiple of 16).
void quantize_rows_int8(const bf16* x, int64_t rows, int64_t k, int64_t group, Int8Rows& out) {
  const int64_t groups = k / group;
  out.q.resize(rows * k);
  out.scale.resize(rows * groups);
  out.qsum.resize(rows * groups);
  out.sum.resize(rows * groups);
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const bf16* xg = x + r * k + g * group;
      __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) {
        const __m512 v = load16(xg + i);
        amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v));
        sum = _mm512_add_ps(sum, v);
      }
      const float d = _mm512_reduce_max_ps(amax) / 127.f;
      const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
      __m512i qsum = _mm512_setzero_si512();
      int8_t* qg = out.q.data() + r * k + g * group;
      for (int64_t i = 0; i < group; i += 16) {
        const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16(xg + i), inv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        qsum = _mm512_add_epi32(qsum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + i), _mm512_cvtsepi32_epi8(q));
      }
      out.scale[r * groups + g] = d;
      out.qsum[r * groups + g] = _mm512_reduce_add_epi32(qsum);
      out.sum[r * groups + g] = _mm512_reduce_add_ps(sum);
    }
}

constexpr int64_t kRowTileQ8 = 4;

// M rows (M <= kRowTileQ8) of quantized x against one block of 16 outputs. The integer sums are
// exact, so their two chains (low and high nibbles) cost no order; the fp32 total adds the groups
// in order, the same for every M: a row's result does not depend on the rows beside it.
template <int M>
inline void block_rows_int4_q8(const uint8_t* w, const float* scale, const float* zero, const int8_t* xq,
                               const float* dx, const int32_t* xqsum, const float* xsum, int64_t k, int64_t group,
                               int64_t groups, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo_acc[M], hi_acc[M];
    for (int m = 0; m < M; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {  // 8 inputs: 64 bytes of the block
      const uint8_t* wp = w + i * kBlockN / 2;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchElems), _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512(wp);
      const __m512i lo = _mm512_and_si512(bytes, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
      for (int m = 0; m < M; ++m) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq + m * k + i);
        lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], lo, _mm512_set1_epi32(xr[0]));
        hi_acc[m] = _mm512_dpbusd_epi32(hi_acc[m], hi, _mm512_set1_epi32(xr[1]));
      }
    }
    const __m512 sv = _mm512_loadu_ps(scale + g * kBlockN), zv = _mm512_loadu_ps(zero + g * kBlockN);
    for (int m = 0; m < M; ++m) {
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(lo_acc[m], hi_acc[m]),
                                           _mm512_set1_epi32(8 * xqsum[m * groups + g]));
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, _mm512_set1_ps(dx[m * groups + g])),
                                 total[m]);
      total[m] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xsum[m * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * kBlockN, total[m]);
}

at::Tensor linear_int4_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "linear_int4_q8: x must be 2-D bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlockN && packed.size(3) == 4 && packed.scalar_type() == at::kByte,
              "linear_int4_q8: weight not in the [N/16, K/8, 16, 4] nibble layout");
  const auto xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), blocks = packed.size(0);
  TORCH_CHECK(k == packed.size(1) * 8 && group % 16 == 0 && k % group == 0, "linear_int4_q8: x has ", k,
              " features, the weight ", packed.size(1) * 8, ", groups of ", group, " (a multiple of 16)");
  const int64_t n = blocks * kBlockN, groups = k / group;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat && scales.numel() == n * groups &&
              zeros.numel() == n * groups && scales.is_contiguous() && zeros.is_contiguous(),
              "linear_int4_q8: fp32 scales and zeros [N/16, K/group, 16]");
  at::Tensor bias32;
  const float* bias_p = bias_fp32(bias, n, "linear_int4_q8", bias32);
  Int8Rows xq;
  quantize_rows_int8(xc.data_ptr<bf16>(), m_rows, k, group, xq);
  auto out = at::empty({m_rows, n}, x.options());
  const auto* w = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float sums[kRowTileQ8 * kBlockN];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * k * kBlockN / 2;
      const float* sb = sp + b * groups * kBlockN;
      const float* zb = zp + b * groups * kBlockN;
      const __m512 bv = bias_p ? _mm512_loadu_ps(bias_p + b * kBlockN) : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTileQ8) {
        const int64_t rows = std::min<int64_t>(kRowTileQ8, m_rows - m0);
        const int8_t* xr = xq.q.data() + m0 * k;
        const int64_t r = m0 * groups;
        const float* dx = xq.scale.data() + r;
        const int32_t* qs = xq.qsum.data() + r;
        const float* xs = xq.sum.data() + r;
        switch (rows) {
          case 1: block_rows_int4_q8<1>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums); break;
          case 2: block_rows_int4_q8<2>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums); break;
          case 3: block_rows_int4_q8<3>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums); break;
          default: block_rows_int4_q8<4>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums); break;
        }
        for (int64_t m = 0; m < rows; ++m)
          store16(reinterpret_cast<bf16*>(op + (m0 + m) * n + b * kBlockN),
                  _mm512_add_ps(_mm512_load_ps(sums + m * kBlockN), bv));
      }
    }
  });
  return out;
}

// x [M, K] @ weight.T (+ bias): fp32 sums, rounded once to bf16. Each thread streams its own
// blocks of the weight once and applies every row to a block while it is in L1.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "linear_bf16: x must be 2-D bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlockN && packed.size(3) == 2, "linear_bf16: weight not packed");
  const auto xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1), k2 = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(k == k2 * 2, "linear_bf16: x has ", k, " features, the weight ", k2 * 2);
  const int64_t n = blocks * kBlockN;
  auto out = at::empty({m_rows, n}, x.options());
  at::Tensor bias32;
  const float* bias_p = bias_fp32(bias, n, "linear_bf16", bias32);
  const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    gemm_blocks(w, k2, xp, m_rows, b0, b1, [&](int64_t b, int64_t m0, int64_t rows, const float* sums) {
      const __m512 bv = bias_p ? _mm512_loadu_ps(bias_p + b * kBlockN) : _mm512_setzero_ps();
      for (int64_t m = 0; m < rows; ++m) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(sums + m * kBlockN), bv);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + m) * n + b * kBlockN),
                            (__m256i)_mm512_cvtneps_pbh(v));
      }
    });
  });
  return out;
}

// The sum of v[0..n) in the order of PyTorch's CPU sum over a contiguous row (cascade_sum in
// aten/src/ATen/native/cpu/SumKernel.cpp: 8-lane vectors (its reductions run AVX2 code even on
// AVX-512 machines), 4 accumulators, levels of 16 steps), so RMSNorm's mean rounds exactly as
// eager's `x.pow(2).mean(-1)`. Lanes add independently, so 8-lane vector adds are that order.
float sum_in_torch_order(const float* v, int64_t n) {
  constexpr int64_t lanes = 8, ilp = 4, levels = 4;
  const int64_t vectors = n / lanes, rows = vectors / ilp;
  int64_t log2_rows = 0;
  while ((int64_t(1) << log2_rows) < rows) ++log2_rows;
  const int64_t level_power = std::max<int64_t>(4, log2_rows / levels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  __m256 acc[levels][ilp];
  for (auto& level : acc)
    for (auto& a : level) a = _mm256_setzero_ps();
  auto add_row = [&](int64_t i) {
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(v + (i * ilp + k) * lanes));
  };
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int64_t j = 1; j < levels; ++j) {
      for (int64_t k = 0; k < ilp; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(i);
  for (int64_t j = 1; j < levels; ++j)
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  for (int64_t r = rows * ilp; r < vectors; ++r) acc[0][0] = _mm256_add_ps(acc[0][0], _mm256_loadu_ps(v + r * lanes));
  for (int64_t k = 1; k < ilp; ++k) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
  alignas(32) float partial[lanes];
  _mm256_store_ps(partial, acc[0][0]);
  float total = 0.f;
  for (int64_t t = vectors * lanes; t < n; ++t) total += v[t];
  for (int64_t l = 0; l < lanes; ++l) total += partial[l];
  return total;
}

// RMSNorm in eager's order: h = bf16(x + residual) (kept in `residual`), then
// weight * bf16(h * rsqrt(mean(h^2) + eps)), every product rounded to bf16 as eager rounds it.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm: bf16 only");
  const auto xc = x.contiguous();
  const int64_t hidden = xc.size(-1), rows = xc.numel() / hidden;
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " values for rows of ", hidden);
  auto out = at::empty_like(xc);
  bf16* res_p = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == xc.sizes() && residual->scalar_type() == at::kBFloat16,
                "rms_norm: residual must be a contiguous bf16 tensor shaped like x");
    res_p = residual->data_ptr<bf16>();
  }
  const bf16* xp = xc.data_ptr<bf16>();
  const bf16* wp = weight.contiguous().data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t full = hidden / 16 * 16;
  parallel_range(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(hidden), squares(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* xr = xp + r * hidden;
      bf16* rr = res_p ? res_p + r * hidden : nullptr;
      int64_t i = 0;
      for (; i < full; i += 16) {
        __m512 v = load16(xr + i);
        if (rr) {
          v = round_bf16(_mm512_add_ps(v, load16(rr + i)));
          store16(rr + i, v);
        }
        _mm512_storeu_ps(h.data() + i, v);
        _mm512_storeu_ps(squares.data() + i, _mm512_mul_ps(v, v));
      }
      for (; i < hidden; ++i) {
        float v = float(xr[i]);
        if (rr) {
          const bf16 sum = bf16(v + float(rr[i]));
          rr[i] = sum;
          v = float(sum);
        }
        h[i] = v;
        squares[i] = v * v;
      }
      const float scale = 1.f / std::sqrt(sum_in_torch_order(squares.data(), hidden) / float(hidden) + float(eps));
      bf16* orow = op + r * hidden;
      const __m512 sv = _mm512_set1_ps(scale);
      for (i = 0; i < full; i += 16)
        store16(orow + i, _mm512_mul_ps(load16(wp + i), round_bf16(_mm512_mul_ps(_mm512_loadu_ps(h.data() + i), sv))));
      for (; i < hidden; ++i) orow[i] = bf16(float(wp[i]) * float(bf16(h[i] * scale)));
    }
  });
  return out;
}

// RoPE in place on the first `heads` heads of each row of qkv [T, >= heads * D] (q's and k's),
// in eager's rounding: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)). cos, sin: [T, D].
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(), "rope_: contiguous bf16 qkv");
  const int64_t tokens = qkv.size(0), stride = qkv.size(1), half = head_dim / 2;
  TORCH_CHECK(heads * head_dim <= stride, "rope_: more heads than qkv holds");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  TORCH_CHECK(cc.scalar_type() == at::kBFloat16 && sc.scalar_type() == at::kBFloat16 && cc.size(0) == tokens &&
              cc.size(-1) == head_dim, "rope_: cos and sin must be bf16 [tokens, head_dim]");
  bf16* q = qkv.data_ptr<bf16>();
  const bf16* cp = cc.data_ptr<bf16>();
  const bf16* sp = sc.data_ptr<bf16>();
  const bool vectorized = half % 16 == 0 && head_dim <= 256;
  parallel_range(0, tokens * heads, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> x(head_dim);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, h = i % heads;
      bf16* row = q + t * stride + h * head_dim;
      const bf16* c = cp + t * head_dim;
      const bf16* s = sp + t * head_dim;
      if (vectorized) {
        __m512 xs[16];
        const int64_t chunks = head_dim / 16, half_chunks = chunks / 2;
        for (int64_t k = 0; k < chunks; ++k) xs[k] = load16(row + k * 16);
        const __m512 sign = _mm512_set1_ps(-0.f);
        for (int64_t k = 0; k < chunks; ++k) {
          const __m512 rotated = k < half_chunks ? _mm512_xor_ps(xs[k + half_chunks], sign) : xs[k - half_chunks];
          const __m512 a = round_bf16(_mm512_mul_ps(xs[k], load16(c + k * 16)));
          const __m512 b = round_bf16(_mm512_mul_ps(rotated, load16(s + k * 16)));
          store16(row + k * 16, _mm512_add_ps(a, b));
        }
        continue;
      }
      for (int64_t d = 0; d < head_dim; ++d) x[d] = float(row[d]);
      for (int64_t d = 0; d < head_dim; ++d) {
        const float rotated = d < half ? -x[d + half] : x[d - half];
        const float a = float(bf16(x[d] * float(c[d])));
        const float b = float(bf16(rotated * float(s[d])));
        row[d] = bf16(a + b);
      }
    }
  });
}

// exp over 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor polynomial
// (relative error ~2e-7, below bf16's 4e-3 that the attention output is rounded to). Inputs here
// are scores minus their maximum (<= 0); below -87 the result flushes to 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(gate) * up over gate_up [T, 2I] -> [T, I], rounded where eager rounds (silu, then the
// product); exp is exp16's, within a few fp32 ulps of PyTorch's, so an output can differ from
// eager's by one bf16 step where the exact value lies near a rounding boundary.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul: 2-D bf16 [tokens, 2 * intermediate]");
  const auto gc = gate_up.contiguous();
  const int64_t tokens = gc.size(0), inter = gc.size(1) / 2, full = inter / 16 * 16;
  auto out = at::empty({tokens, inter}, gc.options());
  const bf16* gp = gc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  parallel_range(0, tokens, 4, [&](int64_t t0, int64_t t1) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* g = gp + t * 2 * inter;
      const bf16* u = g + inter;
      bf16* o = op + t * inter;
      int64_t i = 0;
      for (; i < full; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 silu = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
        store16(o + i, _mm512_mul_ps(silu, load16(u + i)));
      }
      for (; i < inter; ++i) {
        const float gv = float(g[i]);
        o[i] = bf16(float(bf16(gv / (1.f + std::exp(-gv)))) * float(u[i]));
      }
    }
  });
  return out;
}

// A cache's rows are scattered by the block table, and one row is only D bf16 of a slot: the
// hardware prefetcher does not follow them, and with ~10 keys of work in flight a thread waits on
// memory (the kernel read K and V at ~10 GB/s out of DRAM, 50 GB/s out of L3). So each key's row
// is prefetched kKeysAhead keys before it is read.
constexpr int64_t kKeysAhead = 32;

// A cache holds bf16 rows (uint16_t) or int8 rows with one fp32 scale per slot and KV head
// (LayerKVCache's quantized layout: value = q * scale). An int8 row is half a bf16 row's bytes;
// its values are widened exactly (|q| <= 127 fits bf16) and the scale applied to the fp32 score,
// or folded into the probability that weighs the V row.
template <int VEC, typename KT>
inline void prefetch_row(const KT* row) {  // D = 32 * VEC values
  constexpr int lines = VEC * 32 * static_cast<int>(sizeof(KT)) / 64;
  for (int c = 0; c < (lines > 0 ? lines : 1); ++c)
    _mm_prefetch(reinterpret_cast<const char*>(row) + c * 64, _MM_HINT_T0);
}

inline __m512bh load_k32(const uint16_t* row) { return (__m512bh)_mm512_loadu_si512(row); }  // 32 values
inline __m512bh load_k32(const int8_t* row) { return load_pair(row); }
inline __m512 load_v16(const uint16_t* row) {  // 16 values as fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))), 16));
}
inline __m512 load_v16(const int8_t* row) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
}

// One KV head's share of a token's attention, with its G query heads' accumulators in registers
// (D = 32 * VEC): the scores q . k of every key, then the weighted sum of V rows. `rows` holds
// each key's slot offset in the cache; k and v point at this KV head's row within a slot.
//
// Keys go 16 at a time: each head's 16 dot products stay vectors of 16 partial sums, and one
// transposing tree of adds (sum16) turns them into the 16 scores: about 3 vector ops a key
// instead of a full horizontal reduction (~10) per key and head. The keys left after the last
// 16 are reduced one by one. Either way a key's score depends only on its place in the token's
// own context, never on the batch.
inline __m512 sum_pairs_in_lanes(__m512 a, __m512 b) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

// v[0..16) -> [sum(v[0]), ..., sum(v[15])]: every lane of each vector added, one score per lane.
inline __m512 sum16(const __m512* v) {
  __m512 quads[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 t0 = sum_pairs_in_lanes(v[4 * i], v[4 * i + 1]);
    const __m512 t1 = sum_pairs_in_lanes(v[4 * i + 2], v[4 * i + 3]);
    // per 128-bit lane L: [v4i over L, v4i+1 over L, v4i+2 over L, v4i+3 over L]
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  }
  // Across the 128-bit lanes: halves, then quarters, leaving keys in order 0..15.
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// 16 keys' scores for G heads (bf16 rows: row_of(i) is key i's), each times its factor's lane:
// out[h * n + i] for head h, key i.
template <int VEC, int G, typename RowOf>
inline void chunk_scores(const __m512i (&qv)[G][VEC], const RowOf& row_of, __m512 factor, float* out, int64_t n) {
  for (int h = 0; h < G; ++h) {
    __m512 dots[16];
    for (int i = 0; i < 16; ++i) {
      const uint16_t* krow = row_of(i);
      __m512 dot = _mm512_setzero_ps();
      for (int c = 0; c < VEC; ++c)
        dot = _mm512_dpbf16_ps(dot, (__m512bh)qv[h][c], (__m512bh)_mm512_loadu_si512(krow + c * 32));
      dots[i] = dot;
    }
    _mm512_storeu_ps(out + h * n, _mm512_mul_ps(sum16(dots), factor));
  }
}

// `scales` (int8 caches only, else null): this KV head's scale of each slot is scales[srows[j]].
template <int VEC, int G, typename KT>
void scores_group(const uint16_t* q, const KT* k, const KT* v, const int64_t* rows, const float* scales,
                  const int64_t* srows, int64_t n, float scale, float* scores) {
  constexpr bool kQuantized = std::is_same<KT, int8_t>::value;
  __m512i qv[G][VEC];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < VEC; ++c) qv[h][c] = _mm512_loadu_si512(q + (h * VEC + c) * 32);
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < std::min<int64_t>(n, kKeysAhead); ++i) prefetch_row<VEC>(k + rows[i]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    // Ahead of the keys: K rows, then past the last key the first V rows (values_group's start).
    for (int64_t i = j + kKeysAhead; i < std::min<int64_t>(n + kKeysAhead, j + 16 + kKeysAhead); ++i)
      prefetch_row<VEC>(i < n ? k + rows[i] : v + rows[i - n]);
    if constexpr (kQuantized) {
      // Each int8 row widened once into L1, not once per query head that reads it.
      alignas(64) uint16_t widened[16 * VEC * 32];
      alignas(64) float key_scales[16];
      for (int i = 0; i < 16; ++i) {
        key_scales[i] = scales[srows[j + i]];
        for (int c = 0; c < VEC; ++c)
          _mm512_store_si512(widened + (i * VEC + c) * 32, (__m512i)load_k32(k + rows[j + i] + c * 32));
      }
      // per key: the softmax scale times the key's int8 scale
      chunk_scores<VEC, G>(qv, [&](int i) { return widened + i * VEC * 32; },
                           _mm512_mul_ps(_mm512_load_ps(key_scales), scale_v), scores + j, n);
    } else {
      chunk_scores<VEC, G>(qv, [&](int i) { return k + rows[j + i]; }, scale_v, scores + j, n);
    }
  }
  for (; j < n; ++j) {
    const KT* krow = k + rows[j];
    __m512bh kv[VEC];
    for (int c = 0; c < VEC; ++c) kv[c] = load_k32(krow + c * 32);
    const float factor = kQuantized ? scales[srows[j]] * scale : scale;
    for (int h = 0; h < G; ++h) {
      __m512 dot = _mm512_setzero_ps();
      for (int c = 0; c < VEC; ++c) dot = _mm512_dpbf16_ps(dot, (__m512bh)qv[h][c], kv[c]);
      scores[h * n + j] = _mm512_reduce_add_ps(dot) * factor;
    }
  }
}

template <int VEC, int G, typename KT>
void values_group(const float* probs, const KT* v, const int64_t* rows, const float* scales, const int64_t* srows,
                  int64_t n, uint16_t* out) {
  constexpr bool kQuantized = std::is_same<KT, int8_t>::value;
  constexpr int lanes = 2 * VEC;  // 16 fp32 per zmm
  __m512 acc[G][lanes];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < lanes; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (j + kKeysAhead < n) prefetch_row<VEC>(v + rows[j + kKeysAhead]);
    const KT* vrow = v + rows[j];
    __m512 vv[lanes];
    for (int c = 0; c < lanes; ++c) vv[c] = load_v16(vrow + c * 16);
    const float value_scale = kQuantized ? scales[srows[j]] : 1.f;
    for (int h = 0; h < G; ++h) {
      const __m512 w = _mm512_set1_ps(kQuantized ? probs[h * n + j] * value_scale : probs[h * n + j]);
      for (int c = 0; c < lanes; ++c) acc[h][c] = _mm512_fmadd_ps(w, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < lanes; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (h * lanes + c) * 16), (__m256i)_mm512_cvtneps_pbh(acc[h][c]));
}

template <typename KT>
using ScoresFn = void (*)(const uint16_t*, const KT*, const KT*, const int64_t*, const float*, const int64_t*,
                          int64_t, float, float*);
template <typename KT>
using ValuesFn = void (*)(const float*, const KT*, const int64_t*, const float*, const int64_t*, int64_t, uint16_t*);

template <int VEC, typename KT>
std::pair<ScoresFn<KT>, ValuesFn<KT>> group_kernels(int64_t group) {
  switch (group) {
    case 1: return {scores_group<VEC, 1, KT>, values_group<VEC, 1, KT>};
    case 2: return {scores_group<VEC, 2, KT>, values_group<VEC, 2, KT>};
    case 3: return {scores_group<VEC, 3, KT>, values_group<VEC, 3, KT>};
    case 4: return {scores_group<VEC, 4, KT>, values_group<VEC, 4, KT>};
    case 5: return {scores_group<VEC, 5, KT>, values_group<VEC, 5, KT>};
    case 6: return {scores_group<VEC, 6, KT>, values_group<VEC, 6, KT>};
    case 7: return {scores_group<VEC, 7, KT>, values_group<VEC, 7, KT>};
    case 8: return {scores_group<VEC, 8, KT>, values_group<VEC, 8, KT>};
    default: return {nullptr, nullptr};
  }
}

// The specialised kernels for this head shape, or nulls (the generic loop then runs; bf16 only).
template <typename KT>
std::pair<ScoresFn<KT>, ValuesFn<KT>> pick_group_kernels(int64_t dim, int64_t group) {
  switch (dim) {
    case 64: return group_kernels<2, KT>(group);
    case 128: return group_kernels<4, KT>(group);
    default: return {nullptr, nullptr};
  }
}

// Attention of each query token over its own context, read from the paged cache through its
// sequence's block table: no gather, no padding, no mask. q [T, H, D] (rows may be strided);
// caches [blocks, block_size, KVH, D]; token t is sequence seq_of_token[t]'s query at
// positions[t] and sees keys max(0, p - window + 1) .. p (window 0: all). Scores and softmax in
// fp32, one rounding to bf16 at the end. Each token's result is computed the same way whatever
// else is in the call (the batch-invariant attention); the query heads of a KV head share its
// K/V reads (GQA). Returns [T, H * D].
//
// int8 caches (k_scale, v_scale [blocks, block_size, KVH] fp32 given): each key's score is its
// int8 row's dot product with q times its scale, and each V row is weighed by its probability
// times its scale. Head dims 64 and 128 with at most 8 query heads per KV head only (the
// specialised loops; `cpu_kernels.int8_kv_attention_supported` says so before a model asks).
template <typename KT>
at::Tensor paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_of_token,
                                const at::Tensor& positions, int64_t window, double scale,
                                const float* k_scales, const float* v_scales) {
  constexpr bool kQuantized = std::is_same<KT, int8_t>::value;
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_attention: q as [T, H, D] rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: contiguous caches");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_of_token.scalar_type() == at::kLong &&
              positions.scalar_type() == at::kLong, "paged_attention: int64 tables and indices");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0 && dim % 16 == 0 && dim <= 256,
              "paged_attention: head dim must match the cache and be a multiple of 16, at most 256");
  const int64_t group = heads / kv_heads, q_row = q.stride(0);
  const auto tables = block_tables.contiguous();
  const auto seqs = seq_of_token.contiguous();
  const auto pos = positions.contiguous();
  const int64_t max_blocks = tables.size(1);
  auto out = at::empty({tokens, heads * dim}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const KT*>(k_cache.data_ptr());
  const auto* vp = reinterpret_cast<const KT*>(v_cache.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = seqs.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t token_stride = kv_heads * dim;  // between consecutive slots of the cache
  const int64_t vec = dim / 32;                // 32 bf16 per zmm...
  const bool half_vec = dim % 32 != 0;         // ...and 16 more, loaded under a mask
  const float fscale = float(scale);
  const auto fast = pick_group_kernels<KT>(dim, group);
  TORCH_CHECK(!kQuantized || fast.first, "paged_attention: int8 caches need head dim 64 or 128 and at most 8 "
              "query heads per KV head, got head dim ", dim, " and ", group);
  const int64_t lanes = dim / 16;
  // One work item per (token, KV head): the G query heads of a KV head share its K/V reads (a
  // key's row of that head is read once), and a single decode token still splits across threads.
  // Each head's sums run in the same order whatever the split, so results do not depend on it.
  parallel_range(0, tokens * kv_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    std::vector<int64_t> rows, srows;  // each key's row in the cache; and in the scales (int8)
    std::vector<__m512> acc(group * lanes);
    int64_t rows_token = -1;  // the token whose key rows `rows` holds
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / kv_heads, g = item % kv_heads;
      const int64_t p = pp[t], s = sp[t];
      TORCH_CHECK(p >= 0 && (p / block_size) < max_blocks, "paged_attention: position beyond the block table");
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t n = p - lo + 1;
      scores.resize(group * n);
      if (rows_token != t) {
        // Where each key's slot starts in the cache: one division per block, not per key.
        const int64_t* table = tp + s * max_blocks;
        rows.resize(n);
        if (kQuantized) srows.resize(n);
        for (int64_t key = lo; key <= p;) {
          const int64_t base = table[key / block_size] * block_size;
          for (int64_t o = key % block_size; o < block_size && key <= p; ++o, ++key) {
            rows[key - lo] = (base + o) * token_stride;
            if (kQuantized) srows[key - lo] = (base + o) * kv_heads;
          }
        }
        rows_token = t;
      }
      const uint16_t* qg = qp + t * q_row + g * group * dim;  // this KV head's G query heads
      const KT* kg = kp + g * dim;
      const KT* vg = vp + g * dim;
      const float* ksg = kQuantized ? k_scales + g : nullptr;
      const float* vsg = kQuantized ? v_scales + g : nullptr;
      if (fast.first) {
        fast.first(qg, kg, vg, rows.data(), ksg, srows.data(), n, fscale, scores.data());
      } else if constexpr (!kQuantized) {
        // Scores: q . k for each key and head, fp32 sums of bf16 pairs.
        for (int64_t j = 0; j < n; ++j) {
          const uint16_t* krow = kg + rows[j];
          for (int64_t h = 0; h < group; ++h) {
            const uint16_t* qrow = qg + h * dim;
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < vec; ++c)
              dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(qrow + c * 32),
                                     (__m512bh)_mm512_loadu_si512(krow + c * 32));
            if (half_vec)
              dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, qrow + vec * 32),
                                     (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, krow + vec * 32));
            scores[h * n + j] = _mm512_reduce_add_ps(dot) * fscale;
          }
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        softmax_(scores.data() + h * n, n);
      }
      uint16_t* og = op + t * heads * dim + g * group * dim;
      if (fast.second) {
        fast.second(scores.data(), vg, rows.data(), vsg, srows.data(), n, og);
        continue;
      }
      // Output: the probability-weighted sum of V rows, in fp32 (bf16 caches: int8 took fast.second).
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const KT* vrow = vg + rows[j];
        __m512 v[16];
        for (int64_t c = 0; c < lanes; ++c) v[c] = load_v16(vrow + c * 16);
        for (int64_t h = 0; h < group; ++h) {
          const __m512 w = _mm512_set1_ps(scores[h * n + j]);
          for (int64_t c = 0; c < lanes; ++c) acc[h * lanes + c] = _mm512_fmadd_ps(w, v[c], acc[h * lanes + c]);
        }
      }
      for (int64_t i = 0; i < group * lanes; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(og + i * 16), (__m256i)_mm512_cvtneps_pbh(acc[i]));
    }
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_of_token,
                           const at::Tensor& positions, int64_t window, double scale,
                           const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_attention: bf16 q");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_attention: K and V caches of one dtype");
  if (k_cache.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(!k_scale && !v_scale, "paged_attention: scales are for int8 caches");
    return paged_attention_impl<uint16_t>(q, k_cache, v_cache, block_tables, seq_of_token, positions, window,
                                          scale, nullptr, nullptr);
  }
  TORCH_CHECK(k_cache.scalar_type() == at::kChar, "paged_attention: bf16 or int8 caches");
  TORCH_CHECK(k_scale && v_scale, "paged_attention: int8 caches need k_scale and v_scale");
  for (const auto* s : {&*k_scale, &*v_scale})
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 3 &&
                s->sizes() == k_cache.sizes().slice(0, 3), "paged_attention: fp32 scales [blocks, block_size, KVH]");
  return paged_attention_impl<int8_t>(q, k_cache, v_cache, block_tables, seq_of_token, positions, window, scale,
                                      k_scale->data_ptr<float>(), v_scale->data_ptr<float>());
}

// The index of each row's largest value, as torch.argmax(x, -1) gives it: the first index of the
// maximum, and the first NaN where a row has one (NaN counts as the largest). x [S, V] fp32 rows.
// Greedy sampling of S rows over a 49k vocabulary took ~1 ms through torch's CPU argmax at 32 rows
// (~2 ms at 64), longer than the logits' conversion; this reads them once at memory speed.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: [S, V] fp32, V > 0");
  const auto xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel_range(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = xp + r * n;
      const int64_t full = n / 16 * 16;
      float best = v[0];
      int64_t best_at = 0;
      bool nan = false;
      if (full > 0) {
        // Per lane: its largest value and the first index holding it (strictly greater moves it).
        __m512 lane_max = _mm512_loadu_ps(v);
        __m512i lane_at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 unordered = _mm512_cmp_ps_mask(lane_max, lane_max, _CMP_UNORD_Q);
        __m512i at_v = lane_at;
        const __m512i step = _mm512_set1_epi32(16);
        for (int64_t j = 16; j < full; j += 16) {
          at_v = _mm512_add_epi32(at_v, step);
          const __m512 value = _mm512_loadu_ps(v + j);
          const __mmask16 greater = _mm512_cmp_ps_mask(value, lane_max, _CMP_GT_OQ);
          lane_max = _mm512_mask_mov_ps(lane_max, greater, value);
          lane_at = _mm512_mask_mov_epi32(lane_at, greater, at_v);
          unordered |= _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
        }
        nan = unordered != 0;
        alignas(64) float maxes[16];
        alignas(64) int32_t ats[16];
        _mm512_store_ps(maxes, lane_max);
        _mm512_store_si512(ats, lane_at);
        best = maxes[0];
        best_at = ats[0];
        for (int l = 1; l < 16; ++l)  // the largest over the lanes; on a tie, the first index
          if (maxes[l] > best || (maxes[l] == best && ats[l] < best_at)) best = maxes[l], best_at = ats[l];
      }
      for (int64_t j = full; j < n; ++j) {
        if (std::isnan(v[j])) nan = true;
        if (v[j] > best) best = v[j], best_at = j;
      }
      if (nan) {  // rare: torch's answer is the first NaN
        for (int64_t j = 0; j < n; ++j)
          if (std::isnan(v[j])) {
            best_at = j;
            break;
          }
      }
      op[r] = best_at;
    }
  });
  return out;
}

// A row of n fp32 scores into its softmax, in place (paged_attention's rows; Quest's selection).
void softmax_(float* sc, int64_t n) {
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1);
  __m512 peak_v = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 16) peak_v = _mm512_max_ps(peak_v, _mm512_loadu_ps(sc + j));
  if (tail) peak_v = _mm512_mask_max_ps(peak_v, tail, peak_v, _mm512_maskz_loadu_ps(tail, sc + full));
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(peak_v));
  __m512 total_v = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), peak));
    _mm512_storeu_ps(sc + j, e);
    total_v = _mm512_add_ps(total_v, e);
  }
  if (tail) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + full), peak));
    _mm512_mask_storeu_ps(sc + full, tail, e);
    total_v = _mm512_mask_add_ps(total_v, tail, total_v, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total_v));
  for (int64_t j = 0; j < full; j += 16) _mm512_storeu_ps(sc + j, _mm512_mul_ps(_mm512_loadu_ps(sc + j), inv));
  if (tail) _mm512_mask_storeu_ps(sc + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, sc + full), inv));
}

#include "quest.h"

#include "stack.h"

#include "lora.h"

}  // namespace

#include "gemm_prep.h"

TORCH_LIBRARY(punctual, m) {
  m.def("lora_sgmv_(Tensor(a!) out, Tensor x, Tensor rows, Tensor offsets, Tensor[] a, Tensor parts, Tensor[] b) -> Tensor",
        lora_sgmv_);
  m.def("pack_bf16(Tensor weight) -> Tensor", pack_bf16);
  m.def("unpack_bf16(Tensor packed) -> Tensor", unpack_bf16);
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias) -> Tensor", linear_bf16);
  m.def("pack_int8(Tensor weight) -> Tensor", pack_int8);
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group, Tensor? bias) -> Tensor",
        linear_int4);
  m.def("linear_int4_q8(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group, Tensor? bias) -> Tensor",
        linear_int4_q8);
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scales, Tensor? bias) -> Tensor", linear_int8);
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!)? residual) -> Tensor", rms_norm);
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int head_dim) -> ()", rope_);
  m.def("silu_mul(Tensor gate_up) -> Tensor", silu_mul);
  m.def("argmax_rows(Tensor x) -> Tensor", argmax_rows);
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_of_token, "
        "Tensor positions, int window, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor",
        paged_attention);
  m.def("decode_stack(Tensor input_ids, Tensor positions, Tensor embed, Tensor cos, Tensor sin, Tensor?[] weights, "
        "int[] kinds, int[] groups, Tensor final_norm, Tensor[] k_caches, Tensor[] v_caches, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_of_token, int heads, int kv_heads, int head_dim, float eps, int window, "
        "float scale, Tensor[] k_scales, Tensor[] v_scales, Tensor[] summaries, int sparse_start, "
        "int sparse_end, int budget_blocks) -> Tensor", decode_stack);
  m.def("quest_select(Tensor q, Tensor summaries, Tensor block_tables, Tensor context_lens, int budget_blocks, "
        "int block_size, float scale) -> (Tensor, Tensor)", quest_select);
}
