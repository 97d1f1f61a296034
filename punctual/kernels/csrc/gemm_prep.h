// The big-batch quantized linears (prompt chunks, wide decode batches): each is oneDNN's GEMM
// (AMX tiles where the CPU has them) fed by one pass of C++ before it and after it, in place of
// a chain of PyTorch ops that each sweep the whole tensor.
//   linear_int8_gemm: x quantized per row to int8 (absmax / 127, round half even), oneDNN's
//     int8 x int8 -> int32 GEMM on the prepacked weight scaled per output channel (fp32), then
//     times the row's scale, plus the bias, rounded once to bf16. The same operations in the same
//     order as QuantizedWeight's PyTorch version of it (kernels/quant.py), so bit for bit its results.
//   dequantize_int4: 4-bit weights to bf16, (q - 8) * scale rounded to bf16, + zero rounded to
//     bf16: the roundings of QuantizedWeight.dequantize, one pass.
// Shared by both builds (cpu_kernels.cpp, cpu_kernels_portable.cpp): included after their
// anonymous namespace, registering its ops as a fragment of the punctual library. The AVX-512
// build takes the intrinsics; the portable one plain loops (compiled with -ffp-contract=off, so
// each multiply and add rounds on its own there too).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace punctual_gemm_prep {

using bf16 = c10::BFloat16;

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Row r of x [rows, k] bf16 -> q (int8) and d = max|x| / 127; q = round_half_even(x * (1 / d)), 0 where d = 0.
inline float quantize_row(const uint16_t* x, int64_t k, int8_t* q) {
  // max |x| over bf16 bit patterns: with the sign cleared, their order as integers is the values' order.
  uint16_t amax_bits = 0;
  int64_t i = 0;
#if defined(__AVX512BW__)
  __m512i amax = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
  for (; i + 32 <= k; i += 32)
    amax = _mm512_max_epu16(amax, _mm512_and_si512(_mm512_loadu_si512(x + i), magnitude));
  alignas(64) uint16_t lanes[32];
  _mm512_store_si512(lanes, amax);
  for (int j = 0; j < 32; ++j) amax_bits = std::max(amax_bits, lanes[j]);
#endif
  for (; i < k; ++i) amax_bits = std::max<uint16_t>(amax_bits, x[i] & 0x7FFF);
  const float d = bf16_bits_to_float(amax_bits) / 127.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  i = 0;
#if defined(__AVX512BW__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    const __m512i qi = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(qi));
  }
#endif
  for (; i < k; ++i) q[i] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(bf16_bits_to_float(x[i]) * inv))));
  return d;
}

// out [rows, n] bf16 = round(acc * d[row] + bias), acc fp32: the multiply and the add rounded apart.
inline void scale_rows(const float* acc, const float* d, const float* bias, int64_t r0, int64_t r1, int64_t n,
                       uint16_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = acc + r * n;
    uint16_t* o = out + r * n;
    int64_t c = 0;
#if defined(__AVX512BF16__)
    const __m512 dv = _mm512_set1_ps(d[r]);
    for (; c + 16 <= n; c += 16) {
      // The embedded-rounding form: GCC may contract a plain _mm512_mul_ps and the add into one FMA.
      __m512 v = _mm512_mul_round_ps(_mm512_loadu_ps(a + c), dv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), (__m256i)_mm512_cvtneps_pbh(v));
    }
#endif
    for (; c < n; ++c) {
      float v = a[c] * d[r];
      if (bias) v = v + bias[c];
      o[c] = c10::BFloat16(v).x;  // round to nearest even
    }
  }
}

at::Tensor linear_int8_gemm(const at::Tensor& x, const at::Tensor& gemm, const at::Tensor& scales,
                            const at::Tensor& zero_points, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "linear_int8_gemm: x must be 2-D bf16");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.is_contiguous(),
              "linear_int8_gemm: scales must be 1-D contiguous fp32");
  const auto xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1), n = scales.size(0);
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    bias32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias32.numel() == n, "linear_int8_gemm: bias has ", bias32.numel(), " values, expected ", n);
  }
  auto xq = at::empty({rows, k}, x.options().dtype(at::kChar));
  auto d = at::empty({rows}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto* qp = xq.data_ptr<int8_t>();
  auto* dp = d.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dp[r] = quantize_row(xp + r * k, k, qp + r * k);
  });
  // oneDNN's GEMM, as torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, gemm, scales, zero_points, None,
  // 1.0, 0, float32, "none", [], ""): int32 sums times the weight's scale, in fp32.
  static const c10::OperatorHandle qlinear =
      c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(13);
  stack.emplace_back(xq);
  stack.emplace_back(1.0);
  stack.emplace_back(int64_t(0));
  stack.emplace_back(gemm);
  stack.emplace_back(scales);
  stack.emplace_back(zero_points);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(1.0);
  stack.emplace_back(int64_t(0));
  stack.emplace_back(at::kFloat);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  qlinear.callBoxed(&stack);
  const at::Tensor acc = stack.back().toTensor().contiguous();
  TORCH_CHECK(acc.size(0) == rows && acc.size(1) == n, "linear_int8_gemm: the weight has ", acc.size(1),
              " outputs, scales ", n);
  auto out = at::empty({rows, n}, x.options());
  const float* ap = acc.data_ptr<float>();
  const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) { scale_rows(ap, dp, bp, r0, r1, n, op); });
  return out;
}

// nibbles [N, K/2] (input 2j in byte j's low nibble, 2j + 1 in its high one), scales [K/g, N, 2]
// (scale, zero) in bf16 or fp32 -> W [N, K] bf16 with W = bf16(bf16((q - 8) * s) + z), s and z
// rounded to bf16 first (QuantizedWeight.dequantize(bfloat16), bit for bit).
at::Tensor dequantize_int4(const at::Tensor& nibbles, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(nibbles.dim() == 2 && nibbles.scalar_type() == at::kByte && nibbles.is_contiguous(),
              "dequantize_int4: nibbles must be contiguous uint8 [N, K/2]");
  const int64_t n = nibbles.size(0), k = nibbles.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && k % group == 0, "dequantize_int4: groups of ", group, " do not divide ", k);
  const int64_t groups = k / group;
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == groups && scales.size(1) == n && scales.size(2) == 2,
              "dequantize_int4: scales must be [K/group, N, 2]");
  // Read in place (a permuted copy cost a third of the pass): fp32 ones rounded to bf16 as read.
  const auto sc = scales.contiguous();
  const bool fp32 = sc.scalar_type() == at::kFloat;
  TORCH_CHECK(fp32 || sc.scalar_type() == at::kBFloat16, "dequantize_int4: scales must be bf16 or fp32");
  const auto* s32 = fp32 ? sc.data_ptr<float>() : nullptr;
  const auto* s16 = fp32 ? nullptr : reinterpret_cast<const uint16_t*>(sc.data_ptr());
  const auto scale_at = [&](int64_t i) {
    return fp32 ? static_cast<float>(c10::BFloat16(s32[i])) : bf16_bits_to_float(s16[i]);
  };
  auto out = at::empty({n, k}, nibbles.options().dtype(at::kBFloat16));
  const auto* np = nibbles.data_ptr<uint8_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale_at((g * n + r) * 2);
        const float z = scale_at((g * n + r) * 2 + 1);
        const uint8_t* src = np + r * k / 2 + g * group / 2;
        uint16_t* dst = op + r * k + g * group;
        int64_t i = 0;
#if defined(__AVX512BF16__)
        // The group's 16 possible values, computed with the roundings below, then looked up: 32
        // nibbles -> 32 bf16 per vpermw (a quarter of the instructions of computing each one).
        const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_set_epi32(
            15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)), _mm512_set1_ps(8.f)), _mm512_set1_ps(s));  // exact
        const __m512 rounded = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(scaled)), 16));  // to bf16
        const __m512i lut =
            _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(rounded, _mm512_set1_ps(z))));
        const __m128i low4 = _mm_set1_epi8(0x0F);
        for (; i + 32 <= group; i += 32) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i / 2));
          const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
          const __m256i idx8 = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
          _mm512_storeu_si512(dst + i, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx8), lut));
        }
#endif
        for (; i < group; ++i) {
          const int q = (src[i / 2] >> ((i & 1) * 4)) & 15;
          const float t = static_cast<float>(c10::BFloat16(float(q - 8) * s));
          dst[i] = c10::BFloat16(t + z).x;
        }
      }
  });
  return out;
}

}  // namespace punctual_gemm_prep

TORCH_LIBRARY_FRAGMENT(punctual, m) {
  m.def("linear_int8_gemm(Tensor x, Tensor gemm, Tensor scales, Tensor zero_points, Tensor? bias) -> Tensor",
        punctual_gemm_prep::linear_int8_gemm);
  m.def("dequantize_int4(Tensor nibbles, Tensor scales, int group) -> Tensor", punctual_gemm_prep::dequantize_int4);
}
