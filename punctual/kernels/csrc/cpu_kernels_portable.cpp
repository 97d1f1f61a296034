// Punctual's CPU decode kernels for CPUs without AVX-512 BF16 (AVX2 + FMA x86, Arm NEON, or any
// target the compiler vectorizes for), loaded as the same torch.ops.punctual.* ops as
// cpu_kernels.cpp: same names, signatures and packed weight layouts, so the model code does not
// know which build it runs.
//
// The math is written once over an 8-lane fp32 vector (GCC/Clang vector extensions, with AVX2's
// FMA and rounding where the compiler is told the CPU has them) and follows the AVX-512 file's
// order of operations wherever it is cheap to: the element-wise kernels round exactly where eager
// rounds (bit for bit, as there); the GEMMs widen bf16 (a shift) and int8 (a conversion) to fp32
// and sum in vdpbf16ps's order (each pair's odd input, then its even one; products of bf16 are
// exact in fp32, so a fused multiply-add gives the instruction's sum), in the same four chains,
// so a row's result never depends on the rows beside it. Attention sums in its own fixed order.
//
// Built by punctual/kernels/cpu_kernels.py (variant "avx2" on x86, "neon" on aarch64) with
// -ffp-contract=off: an a * b + c that eager rounds twice must not become one fused rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
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

// ---- the vector layer: 8 fp32 lanes ------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8f loadf(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storef(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f bits_f(v8u u) { return (v8f)u; }  // a cast between vectors of one size keeps the bits
inline v8u bits_u(v8f f) { return (v8u)f; }

// a * b + c rounded once.
inline v8f fmadd(v8f a, v8f b, v8f c) {
#if defined(__AVX2__) && defined(__FMA__)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// Round half to even, to an integer-valued float.
inline v8f round_even(v8f x) {
#if defined(__AVX2__)
  return (v8f)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = std::nearbyint(x[i]);
  return r;
#endif
}

inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// bf16 <-> fp32 for 8 lanes. fp32 -> bf16 rounds to nearest even, as c10::BFloat16 and
// vcvtneps2bf16 do; NaN stays NaN.
inline v8f load8(const uint16_t* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  return bits_f(__builtin_convertvector(h, v8u) << 16);
}
inline v8f load8(const bf16* p) { return load8(reinterpret_cast<const uint16_t*>(p)); }
inline v8u bf16_bits(v8f x) {
  const v8u u = bits_u(x);
  const v8u rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? (v8u)((u >> 16) | 0x40u) : rounded;
}
inline v8f round_bf16(v8f x) { return bits_f(bf16_bits(x) << 16); }  // eager's rounding after an op
inline void store8(uint16_t* p, v8f x) {
  const v8u16 h = __builtin_convertvector(bf16_bits(x), v8u16);
  std::memcpy(p, &h, sizeof h);
}
inline void store8(bf16* p, v8f x) { store8(reinterpret_cast<uint16_t*>(p), x); }

// The lanes' sum in _mm512_reduce_add_ps's tree order over 16 lanes (a: lanes 0-7, b: 8-15).
inline float reduce_add16(v8f a, v8f b) {
  const v8f s = a + b;
  const float q0 = s[0] + s[4], q1 = s[1] + s[5], q2 = s[2] + s[6], q3 = s[3] + s[7];
  return (q0 + q2) + (q1 + q3);
}
inline float reduce_add8(v8f s) {
  const float q0 = s[0] + s[4], q1 = s[1] + s[5], q2 = s[2] + s[6], q3 = s[3] + s[7];
  return (q0 + q2) + (q1 + q3);
}
inline float reduce_max8(v8f s) {
  float m = s[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, s[i]);
  return m;
}

#include "team.h"

constexpr int64_t kBlockN = 16;  // outputs per packed block: two 8-lane vectors of fp32 sums
constexpr int64_t kPrefetchElems = 1024;

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

at::Tensor pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_int8: a 2-D int8 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlockN == 0 && k % 2 == 0, "pack_int8: out features must be a multiple of 16 and in features even, got ",
              n, "x", k);
  return weight.contiguous().view({n / kBlockN, kBlockN, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

static const float* bias_fp32(const c10::optional<at::Tensor>& bias, int64_t n, const char* op, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(holder.numel() == n, op, ": bias has ", holder.numel(), " values, expected ", n);
  return holder.data_ptr<float>();
}

// ---- small-M GEMM over the packed [N/16, K/2, 16, 2] layout ----------------------------------
// A k-pair's weights for outputs 8h..8h+7 (half h of the block) as fp32: `even` their first
// input, `odd` their second. bf16: the low and high halves of each 32-bit pair; int8: converted.
inline void load_half(const uint16_t* w, int h, v8f& even, v8f& odd) {
  v8u u;
  std::memcpy(&u, w + 16 * h, sizeof u);
  even = bits_f(u << 16);
  odd = bits_f(u & 0xFFFF0000u);
}
inline void load_half(const int8_t* w, int h, v8f& even, v8f& odd) {
  for (int j = 0; j < 8; ++j) {
    even[j] = float(w[16 * h + 2 * j]);
    odd[j] = float(w[16 * h + 2 * j + 1]);
  }
}

constexpr int kChains = 4;
// Rows per pass over half a block when there are several: AVX2 has 16 vector registers and a row's
// four chains over 8 outputs take 4. One row takes the whole block (8 registers) in one pass, so
// a decode streams each weight once.
constexpr int64_t kRowTile = 3;

// M rows against H halves of a block from half `first` (H = 2: all 16 outputs): chain c takes
// k-pairs c, c + 4, ...; the leftover pairs go one each to the first chains; the chains add as
// (0 + 1) + (2 + 3): the AVX-512 build's order, the same for every output whatever M and H.
// x: the rows widened to fp32 once per call ([M, K], row stride x_stride), so a pair's two inputs
// are two broadcasts from memory. out: [M, 16] (a row's 16 outputs, this call's halves written).
template <int M, int H, typename T>
inline void block_rows(const T* w, int first, const float* x, int64_t x_stride, int64_t k2, float* out) {
  v8f acc[M][kChains][H];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kChains; ++c)
      for (int h = 0; h < H; ++h) acc[m][c][h] = splat(0.f);
  auto step = [&](int64_t kp, int c) {
    const T* wp = w + kp * 2 * kBlockN;
    __builtin_prefetch(wp + kPrefetchElems);
    v8f even[H], odd[H];
    for (int h = 0; h < H; ++h) load_half(wp, first + h, even[h], odd[h]);
    for (int m = 0; m < M; ++m) {
      const float* pair = x + m * x_stride + 2 * kp;
      const v8f x_even = splat(pair[0]), x_odd = splat(pair[1]);
      for (int h = 0; h < H; ++h) acc[m][c][h] = fmadd(even[h], x_even, fmadd(odd[h], x_odd, acc[m][c][h]));
    }
  };
  int64_t kp = 0;
  for (; kp + kChains <= k2; kp += kChains)
    for (int c = 0; c < kChains; ++c) step(kp + c, c);
  for (int c = 0; kp < k2; ++kp, ++c) step(kp, c);
  for (int m = 0; m < M; ++m)
    for (int h = 0; h < H; ++h)
      storef(out + m * kBlockN + 8 * (first + h), (acc[m][0][h] + acc[m][1][h]) + (acc[m][2][h] + acc[m][3][h]));
}

template <typename T, typename Store>
inline void gemm_blocks(const T* w, int64_t k2, const float* x, int64_t m_rows, int64_t b0, int64_t b1,
                        const Store& store) {
  alignas(64) float sums[kRowTile * kBlockN];
  const int64_t block_elems = k2 * 2 * kBlockN, k = 2 * k2;
  for (int64_t b = b0; b < b1; ++b) {
    const T* wb = w + b * block_elems;
    if (m_rows == 1) {
      block_rows<1, 2>(wb, 0, x, k, k2, sums);
      store(b, 0, 1, sums);
      continue;
    }
    for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTile) {
      const int64_t rows = std::min<int64_t>(kRowTile, m_rows - m0);
      for (int half = 0; half < 2; ++half) {
        if (rows == 3) block_rows<3, 1>(wb, half, x + m0 * k, k, k2, sums);
        else if (rows == 2) block_rows<2, 1>(wb, half, x + m0 * k, k, k2, sums);
        else block_rows<1, 1>(wb, half, x + m0 * k, k, k2, sums);
      }
      store(b, m0, rows, sums);
    }
  }
}

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
  const at::Tensor x32 = xc.to(at::kFloat);  // widened once: exact
  const float* xp = x32.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    gemm_blocks(w, k2, xp, m_rows, b0, b1, [&](int64_t b, int64_t m0, int64_t rows, const float* sums) {
      for (int h = 0; h < 2; ++h) {
        const v8f bv = bias_p ? loadf(bias_p + b * kBlockN + 8 * h) : splat(0.f);
        for (int64_t m = 0; m < rows; ++m)
          store8(op + (m0 + m) * n + b * kBlockN + 8 * h, loadf(sums + m * kBlockN + 8 * h) + bv);
      }
    });
  });
  return out;
}

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
  const at::Tensor x32 = xc.to(at::kFloat);  // widened once: exact
  const float* xp = x32.data_ptr<float>();
  const float* sp = scale32.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    gemm_blocks(w, k2, xp, m_rows, b0, b1, [&](int64_t b, int64_t m0, int64_t rows, const float* sums) {
      for (int h = 0; h < 2; ++h) {
        const v8f sv = loadf(sp + b * kBlockN + 8 * h);
        const v8f bv = bias_p ? loadf(bias_p + b * kBlockN + 8 * h) : splat(0.f);
        for (int64_t m = 0; m < rows; ++m)
          store8(op + (m0 + m) * n + b * kBlockN + 8 * h, fmadd(loadf(sums + m * kBlockN + 8 * h), sv, bv));
      }
    });
  });
  return out;
}

// int4 weights on bf16 activations (layout and math as cpu_kernels.cpp's linear_int4): nibble
// q -> q - 8, exact in fp32; a group's four chains, then total += sum * scale + sum(x) * zero.
constexpr int64_t kRowTileInt4 = 2;
template <int M>
inline void block_rows_int4(const uint8_t* w, const float* scale, const float* zero, const float* x,
                            const float* xsum, int64_t x_stride, int64_t group_pairs, int64_t groups, float* out) {
  v8f total[M][2];
  for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = splat(0.f);
  for (int64_t g = 0; g < groups; ++g) {
    v8f acc[M][4][2];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < 4; ++c) acc[m][c][0] = acc[m][c][1] = splat(0.f);
    const int64_t kp0 = g * group_pairs;
    for (int64_t i = 0; i < group_pairs; ++i) {
      const uint8_t* wp = w + (kp0 + i) * kBlockN;
      __builtin_prefetch(wp + kPrefetchElems);
      v8f even[2], odd[2];
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 8; ++j) {
          even[h][j] = float(int(wp[8 * h + j] & 15) - 8);
          odd[h][j] = float(int(wp[8 * h + j] >> 4) - 8);
        }
      const int c = int(i % 4);
      for (int m = 0; m < M; ++m) {
        const float* pair = x + m * x_stride + 2 * (kp0 + i);
        const v8f x_even = splat(pair[0]), x_odd = splat(pair[1]);
        for (int h = 0; h < 2; ++h) acc[m][c][h] = fmadd(even[h], x_even, fmadd(odd[h], x_odd, acc[m][c][h]));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const v8f sv = loadf(scale + g * kBlockN + 8 * h), zv = loadf(zero + g * kBlockN + 8 * h);
      for (int m = 0; m < M; ++m) {
        const v8f sum = (acc[m][0][h] + acc[m][1][h]) + (acc[m][2][h] + acc[m][3][h]);
        total[m][h] = fmadd(splat(xsum[m * groups + g]), zv, fmadd(sum, sv, total[m][h]));
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int h = 0; h < 2; ++h) storef(out + m * kBlockN + 8 * h, total[m][h]);
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
  const at::Tensor x32 = xc.to(at::kFloat);  // widened once: exact
  const float* xp = x32.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_range(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float sums[kRowTileInt4 * kBlockN];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * k2 * kBlockN;
      const float* sb = sp + b * groups * kBlockN;
      const float* zb = zp + b * groups * kBlockN;
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTileInt4) {
        const int64_t rows = std::min<int64_t>(kRowTileInt4, m_rows - m0);
        const float* xr = xp + m0 * k;
        const float* xsr = xsum.data() + m0 * groups;
        if (rows == 2) block_rows_int4<2>(wb, sb, zb, xr, xsr, k, group / 2, groups, sums);
        else block_rows_int4<1>(wb, sb, zb, xr, xsr, k, group / 2, groups, sums);
        for (int h = 0; h < 2; ++h) {
          const v8f bv = bias_p ? loadf(bias_p + b * kBlockN + 8 * h) : splat(0.f);
          for (int64_t m = 0; m < rows; ++m)
            store8(op + (m0 + m) * n + b * kBlockN + 8 * h, loadf(sums + m * kBlockN + 8 * h) + bv);
        }
      }
    }
  });
  return out;
}

// int4 weights on int8 activations (cpu_kernels.cpp's linear_int4_q8: the same quantization of
// x, the same exact integer sums and the same fp32 steps after them).
struct Int8Rows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, K/group]: dx
  std::vector<int32_t> qsum;  // [M, K/group]: sum of q
  std::vector<float> sum;     // [M, K/group]: sum of x in fp32
};

void quantize_rows_int8(const bf16* x, int64_t rows, int64_t k, int64_t group, Int8Rows& out) {
  const int64_t groups = k / group;
  out.q.resize(rows * k);
  out.scale.resize(rows * groups);
  out.qsum.resize(rows * groups);
  out.sum.resize(rows * groups);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const bf16* xg = x + r * k + g * group;
      v8f amax = splat(0.f), sum_lo = splat(0.f), sum_hi = splat(0.f);  // 16 lanes, as the AVX-512 build
      for (int64_t i = 0; i < group; i += 16) {
        const v8f lo = load8(xg + i), hi = load8(xg + i + 8);
        amax = vmax(amax, vmax(bits_f(bits_u(lo) & 0x7FFFFFFFu), bits_f(bits_u(hi) & 0x7FFFFFFFu)));
        sum_lo += lo;
        sum_hi += hi;
      }
      const float d = reduce_max8(amax) / 127.f;
      const v8f inv = splat(d > 0.f ? 1.f / d : 0.f);
      int32_t qsum = 0;
      int8_t* qg = out.q.data() + r * k + g * group;
      for (int64_t i = 0; i < group; i += 8) {
        const v8f q = round_even(load8(xg + i) * inv);
        for (int j = 0; j < 8; ++j) {
          const int32_t v = int32_t(q[j]);
          qsum += v;
          qg[i + j] = int8_t(std::min(127, std::max(-128, v)));
        }
      }
      out.scale[r * groups + g] = d;
      out.qsum[r * groups + g] = qsum;
      out.sum[r * groups + g] = reduce_add16(sum_lo, sum_hi);
    }
}

constexpr int64_t kRowTileQ8 = 2;

// Packed [N/16, K/8, 16, 4]: per 8 inputs, output j's 4 bytes hold inputs b (low nibble) and
// 4 + b (high nibble) in byte b.
template <int M>
inline void block_rows_int4_q8(const uint8_t* w, const float* scale, const float* zero, const int8_t* xq,
                               const float* dx, const int32_t* xqsum, const float* xsum, int64_t k, int64_t group,
                               int64_t groups, float* out) {
  v8f total[M][2];
  for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = splat(0.f);
  for (int64_t g = 0; g < groups; ++g) {
    v8i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = v8i{};
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
      const uint8_t* wp = w + i * kBlockN / 2;
      __builtin_prefetch(wp + kPrefetchElems);
      v8u words[2];
      std::memcpy(words, wp, sizeof words);
      for (int b = 0; b < 4; ++b) {
        v8i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          lo[h] = (v8i)((words[h] >> (8 * b)) & 15u);
          hi[h] = (v8i)((words[h] >> (8 * b + 4)) & 15u);
        }
        for (int m = 0; m < M; ++m) {
          const int32_t x_lo = xq[m * k + i + b], x_hi = xq[m * k + i + 4 + b];
          for (int h = 0; h < 2; ++h) acc[m][h] += lo[h] * x_lo + hi[h] * x_hi;
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const v8f sv = loadf(scale + g * kBlockN + 8 * h), zv = loadf(zero + g * kBlockN + 8 * h);
      for (int m = 0; m < M; ++m) {
        const v8i dot = acc[m][h] - 8 * xqsum[m * groups + g];
        total[m][h] = fmadd(__builtin_convertvector(dot, v8f), sv * splat(dx[m * groups + g]), total[m][h]);
        total[m][h] = fmadd(zv, splat(xsum[m * groups + g]), total[m][h]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int h = 0; h < 2; ++h) storef(out + m * kBlockN + 8 * h, total[m][h]);
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
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowTileQ8) {
        const int64_t rows = std::min<int64_t>(kRowTileQ8, m_rows - m0);
        const int8_t* xr = xq.q.data() + m0 * k;
        const int64_t r = m0 * groups;
        const float* dx = xq.scale.data() + r;
        const int32_t* qs = xq.qsum.data() + r;
        const float* xs = xq.sum.data() + r;
        if (rows == 2) block_rows_int4_q8<2>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums);
        else block_rows_int4_q8<1>(wb, sb, zb, xr, dx, qs, xs, k, group, groups, sums);
        for (int h = 0; h < 2; ++h) {
          const v8f bv = bias_p ? loadf(bias_p + b * kBlockN + 8 * h) : splat(0.f);
          for (int64_t m = 0; m < rows; ++m)
            store8(op + (m0 + m) * n + b * kBlockN + 8 * h, loadf(sums + m * kBlockN + 8 * h) + bv);
        }
      }
    }
  });
  return out;
}

// ---- element-wise kernels: eager's rounding, bit for bit -------------------------------------
// PyTorch's CPU sum over a contiguous row (cascade_sum: 8-lane vectors, 4 accumulators, levels of
// 16 steps); see cpu_kernels.cpp. Lanes add independently, so 8-lane vector adds are that order.
float sum_in_torch_order(const float* v, int64_t n) {
  constexpr int64_t lanes = 8, ilp = 4, levels = 4;
  const int64_t vectors = n / lanes, rows = vectors / ilp;
  int64_t log2_rows = 0;
  while ((int64_t(1) << log2_rows) < rows) ++log2_rows;
  const int64_t level_power = std::max<int64_t>(4, log2_rows / levels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  v8f acc[levels][ilp];
  for (auto& level : acc)
    for (auto& a : level) a = splat(0.f);
  auto add_row = [&](int64_t i) {
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] += loadf(v + (i * ilp + k) * lanes);
  };
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int64_t j = 1; j < levels; ++j) {
      for (int64_t k = 0; k < ilp; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = splat(0.f);
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(i);
  for (int64_t j = 1; j < levels; ++j)
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] += acc[j][k];
  for (int64_t r = rows * ilp; r < vectors; ++r) acc[0][0] += loadf(v + r * lanes);
  for (int64_t k = 1; k < ilp; ++k) acc[0][0] += acc[0][k];
  float total = 0.f;
  for (int64_t t = vectors * lanes; t < n; ++t) total += v[t];
  for (int64_t l = 0; l < lanes; ++l) total += acc[0][0][l];
  return total;
}

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
  const auto wc = weight.contiguous();
  const bf16* wp = wc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t full = hidden / 8 * 8;
  parallel_range(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(hidden), squares(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* xr = xp + r * hidden;
      bf16* rr = res_p ? res_p + r * hidden : nullptr;
      int64_t i = 0;
      for (; i < full; i += 8) {
        v8f v = load8(xr + i);
        if (rr) {
          v = round_bf16(v + load8(rr + i));
          store8(rr + i, v);
        }
        storef(h.data() + i, v);
        storef(squares.data() + i, v * v);
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
      const v8f sv = splat(scale);
      for (i = 0; i < full; i += 8) store8(orow + i, load8(wp + i) * round_bf16(loadf(h.data() + i) * sv));
      for (; i < hidden; ++i) orow[i] = bf16(float(wp[i]) * float(bf16(h[i] * scale)));
    }
  });
  return out;
}

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
  const bool vectorized = half % 8 == 0;
  parallel_range(0, tokens * heads, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> x(head_dim);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, h = i % heads;
      bf16* row = q + t * stride + h * head_dim;
      const bf16* c = cp + t * head_dim;
      const bf16* s = sp + t * head_dim;
      if (vectorized) {
        for (int64_t d = 0; d < head_dim; d += 8) storef(x.data() + d, load8(row + d));
        for (int64_t d = 0; d < head_dim; d += 8) {
          const v8f rotated = d < half ? -loadf(x.data() + d + half) : loadf(x.data() + d - half);
          const v8f a = round_bf16(loadf(x.data() + d) * load8(c + d));
          const v8f b = round_bf16(rotated * load8(s + d));
          store8(row + d, a + b);
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

// exp as cpu_kernels.cpp's exp16, step for step (so silu_mul gives that build's results): 2^n *
// p(r), x = n ln2 + r, a degree-6 polynomial; below -87 the result flushes to 0. 2^n is applied
// as two factors so that n up to 128 (where the result overflows to inf, as scalef gives) stays
// in range.
inline v8f exp8(v8f x) {
  x = vmax(x, splat(-87.f));
  x = x > splat(89.f) ? splat(89.f) : x;  // exp(89) is already inf in fp32; keeps 2^n's halves finite
  const v8f n = round_even(x * splat(1.44269504088896341f));
  v8f r = fmadd(-n, splat(0.693359375f), x);
  r = fmadd(-n, splat(-2.12194440e-4f), r);
  v8f p = splat(1.f / 720.f);
  p = fmadd(p, r, splat(1.f / 120.f));
  p = fmadd(p, r, splat(1.f / 24.f));
  p = fmadd(p, r, splat(1.f / 6.f));
  p = fmadd(p, r, splat(0.5f));
  p = fmadd(p, r, splat(1.f));
  p = fmadd(p, r, splat(1.f));
  const v8i ni = __builtin_convertvector(n, v8i);
  const v8i n1 = ni >> 1, n2 = ni - n1;  // each within [-63, 64]: a normal power of two
  return p * bits_f((v8u)((n1 + 127) << 23)) * bits_f((v8u)((n2 + 127) << 23));
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_mul: 2-D bf16 [tokens, 2 * intermediate]");
  const auto gc = gate_up.contiguous();
  const int64_t tokens = gc.size(0), inter = gc.size(1) / 2, full = inter / 8 * 8;
  auto out = at::empty({tokens, inter}, gc.options());
  const bf16* gp = gc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  parallel_range(0, tokens, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* g = gp + t * 2 * inter;
      const bf16* u = g + inter;
      bf16* o = op + t * inter;
      int64_t i = 0;
      for (; i < full; i += 8) {
        const v8f gv = load8(g + i);
        const v8f silu = round_bf16(gv / (splat(1.f) + exp8(splat(0.f) - gv)));
        store8(o + i, silu * load8(u + i));
      }
      for (; i < inter; ++i) {
        const float gv = float(g[i]);
        o[i] = bf16(float(bf16(gv / (1.f + std::exp(-gv)))) * float(u[i]));
      }
    }
  });
  return out;
}

// ---- paged attention ---------------------------------------------------------------------
// The contract of cpu_kernels.cpp's paged_attention (see there): each token over its own context
// through its block table, fp32 scores and softmax, one rounding at the end; int8 caches for head
// dims 64 and 128 with at most 8 query heads per KV head. Each key's score is its own fixed sum
// (8 lanes, one chain, a fixed tree), so a token's result never depends on the batch.
constexpr int64_t kKeysAhead = 32;

template <typename KT>
inline void prefetch_row(const KT* row, int64_t dim) {
  for (int64_t c = 0; c < int64_t(dim * sizeof(KT)); c += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + c);
}

inline v8f load_kv8(const uint16_t* row) { return load8(row); }
inline v8f load_kv8(const int8_t* row) {
  v8f v;
  for (int j = 0; j < 8; ++j) v[j] = float(row[j]);
  return v;
}

// One query head's probability-weighted sum of V rows, in fp32 (each output a sequence of FMAs over
// the keys in order), rounded once to bf16. L: the head dim's 8-lane vectors where it is a
// compile-time 8 or 16 (the sums stay in registers), else 0 (`lanes` of them in `spill`).
template <int L, typename KT>
inline void values_head(const float* probs, const KT* v, const int64_t* rows, const float* scales,
                        const int64_t* srows, int64_t n, int64_t lanes_rt, bool prefetch, v8f* spill, uint16_t* out) {
  constexpr bool kQuantized = std::is_same<KT, int8_t>::value;
  const int64_t lanes = L ? L : lanes_rt;
  v8f local[L ? L : 1];
  v8f* acc = L ? local : spill;
  for (int64_t c = 0; c < lanes; ++c) acc[c] = splat(0.f);
  for (int64_t j = 0; j < n; ++j) {
    if (prefetch && j + kKeysAhead < n) prefetch_row(v + rows[j + kKeysAhead], lanes * 8);
    const KT* vrow = v + rows[j];
    const v8f weight = splat(kQuantized ? probs[j] * scales[srows[j]] : probs[j]);
    for (int64_t c = 0; c < lanes; ++c) acc[c] = fmadd(weight, load_kv8(vrow + c * 8), acc[c]);
  }
  for (int64_t c = 0; c < lanes; ++c) store8(out + c * 8, acc[c]);
}

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
  TORCH_CHECK(!kQuantized || ((dim == 64 || dim == 128) && group <= 8), "paged_attention: int8 caches need head dim 64 "
              "or 128 and at most 8 query heads per KV head, got head dim ", dim, " and ", group);
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
  const int64_t token_stride = kv_heads * dim;
  const float fscale = float(scale);
  const int64_t lanes = dim / 8;
  parallel_range(0, tokens * kv_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, qf(group * dim);
    std::vector<int64_t> rows, srows;
    std::vector<v8f> acc(lanes);  // values_head's sums where the head dim is not 64 or 128
    int64_t rows_token = -1;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / kv_heads, g = item % kv_heads;
      const int64_t p = pp[t], s = sp[t];
      TORCH_CHECK(p >= 0 && (p / block_size) < max_blocks, "paged_attention: position beyond the block table");
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t n = p - lo + 1;
      scores.resize(group * n);
      if (rows_token != t) {
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
      const uint16_t* qg = qp + t * q_row + g * group * dim;
      for (int64_t i = 0; i < group * dim; i += 8) storef(qf.data() + i, load8(qg + i));
      const KT* kg = kp + g * dim;
      const KT* vg = vp + g * dim;
      for (int64_t j = 0; j < std::min<int64_t>(n, kKeysAhead); ++j) prefetch_row(kg + rows[j], dim);
      // Four keys at a time in four independent chains (one chain would wait on each FMA's
      // latency); each key's sum is the one-key loop's below, so where a key falls does not matter.
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        for (int64_t i = j + kKeysAhead; i < std::min<int64_t>(n, j + 4 + kKeysAhead); ++i) prefetch_row(kg + rows[i], dim);
        const KT* k0 = kg + rows[j];
        const KT* k1 = kg + rows[j + 1];
        const KT* k2 = kg + rows[j + 2];
        const KT* k3 = kg + rows[j + 3];
        float factor[4] = {fscale, fscale, fscale, fscale};
        if (kQuantized)
          for (int i = 0; i < 4; ++i) factor[i] = k_scales[srows[j + i] + g] * fscale;
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qf.data() + h * dim;
          v8f d0 = splat(0.f), d1 = splat(0.f), d2 = splat(0.f), d3 = splat(0.f);
          for (int64_t c = 0; c < lanes; ++c) {
            const v8f qv = loadf(qh + c * 8);
            d0 = fmadd(qv, load_kv8(k0 + c * 8), d0);
            d1 = fmadd(qv, load_kv8(k1 + c * 8), d1);
            d2 = fmadd(qv, load_kv8(k2 + c * 8), d2);
            d3 = fmadd(qv, load_kv8(k3 + c * 8), d3);
          }
          float* sh = scores.data() + h * n + j;
          sh[0] = reduce_add8(d0) * factor[0];
          sh[1] = reduce_add8(d1) * factor[1];
          sh[2] = reduce_add8(d2) * factor[2];
          sh[3] = reduce_add8(d3) * factor[3];
        }
      }
      for (; j < n; ++j) {
        const KT* krow = kg + rows[j];
        const float factor = kQuantized ? k_scales[srows[j] + g] * fscale : fscale;
        for (int64_t h = 0; h < group; ++h) {
          v8f dot = splat(0.f);
          for (int64_t c = 0; c < lanes; ++c) dot = fmadd(loadf(qf.data() + h * dim + c * 8), load_kv8(krow + c * 8), dot);
          scores[h * n + j] = reduce_add8(dot) * factor;
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        softmax_(scores.data() + h * n, n);
      }
      uint16_t* og = op + t * heads * dim + g * group * dim;
      const float* vsg = kQuantized ? v_scales + g : nullptr;
      for (int64_t h = 0; h < group; ++h) {
        const float* probs = scores.data() + h * n;
        uint16_t* oh = og + h * dim;
        if (dim == 64) values_head<8>(probs, vg, rows.data(), vsg, srows.data(), n, lanes, h == 0, acc.data(), oh);
        else if (dim == 128) values_head<16>(probs, vg, rows.data(), vsg, srows.data(), n, lanes, h == 0, acc.data(), oh);
        else values_head<0>(probs, vg, rows.data(), vsg, srows.data(), n, lanes, h == 0, acc.data(), oh);
      }
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

// torch.argmax(x, -1) per row: the first index of the maximum, the first NaN where a row has one.
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
      const int64_t full = n / 8 * 8;
      float best = v[0];
      int64_t best_at = 0;
      bool nan = false;
      if (full > 0) {
        // Per lane: its largest value and the first index holding it (strictly greater moves it).
        v8f lane_max = loadf(v);
        v8i lane_at = v8i{0, 1, 2, 3, 4, 5, 6, 7}, at_v = lane_at;
        v8i unordered = lane_max != lane_max;
        for (int64_t j = 8; j < full; j += 8) {
          at_v += 8;
          const v8f value = loadf(v + j);
          const v8i greater = value > lane_max;
          lane_max = greater ? value : lane_max;
          lane_at = greater ? at_v : lane_at;
          unordered |= value != value;
        }
        for (int l = 0; l < 8; ++l) nan |= unordered[l] != 0;
        best = lane_max[0];
        best_at = lane_at[0];
        for (int l = 1; l < 8; ++l)
          if (lane_max[l] > best || (lane_max[l] == best && lane_at[l] < best_at)) best = lane_max[l], best_at = lane_at[l];
      }
      for (int64_t j = full; j < n; ++j) {
        if (std::isnan(v[j])) nan = true;
        if (v[j] > best) best = v[j], best_at = j;
      }
      if (nan) {
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
  float peak = -INFINITY;
  for (int64_t j = 0; j < n; ++j) peak = std::max(peak, sc[j]);
  const int64_t full = n / 8 * 8;
  v8f total_v = splat(0.f);
  for (int64_t j = 0; j < full; j += 8) {
    const v8f e = exp8(loadf(sc + j) - splat(peak));
    storef(sc + j, e);
    total_v += e;
  }
  float total = reduce_add8(total_v);
  if (full < n) {
    v8f rest = splat(-INFINITY);
    for (int64_t j = full; j < n; ++j) rest[j - full] = sc[j];
    const v8f e = exp8(rest - splat(peak));
    for (int64_t j = full; j < n; ++j) {
      sc[j] = e[j - full];
      total += sc[j];
    }
  }
  const float inv = 1.f / total;
  for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
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
