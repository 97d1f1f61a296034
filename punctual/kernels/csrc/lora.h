// LoRA: the low-rank terms of one linear for every adapter of a step, in one call (Punica's SGMV
// shape: each adapter's rows shrink by its A, expand by its B, add into the base output). Shared by
// both builds: plain C++ loops the compiler vectorises for the build's ISA. Included inside each
// file's anonymous namespace, after team.h.
//
// Why a kernel: done with PyTorch ops, a step of 16 adapters over smollm2's 30 layers is ~13,000
// tiny GEMMs, index_selects and index_adds (each a few rows by rank 16), and a bf16 GEMM of two
// rows costs oneDNN ~40 us however small: seconds a step. Here each layer's linear is one call
// whose cost is reading the adapters' A and B once.
//
// Layout: `rows` holds the step's flat token rows grouped by adapter, `offsets` [G + 1] each group's
// span of `rows`; `a[g]` is group g's A [R_g, in] (every part's A stacked); `parts` [P, 5] int64 is
// (group, first output column, end column, first rank, end rank) with `b[p]` its B transposed,
// [ranks, cols], the adapter's scale folded in. x, out, a and b share one dtype (float32 or bfloat16); the sums are
// float32, and each output element is rounded once, when its term is added.

// Widen n values to float32: a shift per bf16 value (vectorised), a copy for float32.
inline void lora_widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<uint32_t>(s[k]) << 16;
}
inline void lora_widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

// Round n floats to bf16, to nearest even as c10::BFloat16 does (NaN kept a quiet NaN), in integer
// ops the compiler vectorises: a scalar conversion per element was most of the expand's time.
inline void lora_narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = s[k];
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    d[k] = nan ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}
inline void lora_narrow(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

template <typename T>
void lora_sgmv_impl(at::Tensor& out, const at::Tensor& x, const int64_t* rows, const int64_t* offsets, int64_t groups,
                    const std::vector<at::Tensor>& a, const int64_t* parts, int64_t num_parts,
                    const std::vector<at::Tensor>& b) {
  const int64_t in = x.size(1);
  const int64_t n = offsets[groups];
  int64_t max_rank = 1;
  std::vector<int64_t> rank_start(groups + 1, 0);  // the (group, rank) pairs, flattened
  for (int64_t g = 0; g < groups; ++g) {
    max_rank = std::max(max_rank, a[g].size(0));
    rank_start[g + 1] = rank_start[g] + a[g].size(0);
  }
  const T* xp = x.data_ptr<T>();
  const int64_t x_stride = x.stride(0);
  // The step's rows once in float32, in group order: each A row is then dotted with contiguous floats.
  std::vector<float> xs(n * in);
  for (int64_t i = 0; i < n; ++i) lora_widen(xp + rows[i] * x_stride, xs.data() + i * in, in);
  // Shrink: shrunk[i][r] = x_i . A_g[r] for the rows i of group g; tasks over (group, rank) pairs,
  // so each A row is read once whatever the group's rows.
  std::vector<float> shrunk(n * max_rank, 0.f);
  const int64_t pairs = rank_start[groups];
  at::parallel_for(0, pairs, 8, [&](int64_t p0, int64_t p1) {
    std::vector<float> arow(in);
    int64_t g = 0;
    for (int64_t p = p0; p < p1; ++p) {
      while (rank_start[g + 1] <= p) ++g;
      const int64_t r = p - rank_start[g];
      lora_widen(a[g].data_ptr<T>() + r * in, arow.data(), in);
      for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
        const float* xi = xs.data() + i * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < in; ++k) acc += xi[k] * arow[k];
        shrunk[i * max_rank + r] = acc;
      }
    }
  });
  // Expand: out[row, c] += sum_r shrunk[i][r] * Bt[r][c] (B stored transposed, [ranks, cols]), a
  // task per (part, block of columns); the block is widened once for all the group's rows.
  constexpr int64_t kCols = 128;
  std::vector<int64_t> task_start(num_parts + 1, 0);
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t cols = parts[p * 5 + 2] - parts[p * 5 + 1];
    task_start[p + 1] = task_start[p] + (cols + kCols - 1) / kCols;
  }
  T* op = out.data_ptr<T>();
  const int64_t out_stride = out.stride(0);
  at::parallel_for(0, task_start[num_parts], 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> block(kCols * max_rank);
    alignas(64) float acc[kCols];
    alignas(64) float dst_f[kCols];
    int64_t p = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (task_start[p + 1] <= t) ++p;
      const int64_t g = parts[p * 5], col0 = parts[p * 5 + 1], col_end = parts[p * 5 + 2];
      const int64_t r0 = parts[p * 5 + 3], ranks = parts[p * 5 + 4] - r0;
      const int64_t width = col_end - col0;
      const int64_t c0 = (t - task_start[p]) * kCols;
      const int64_t cols = std::min(kCols, width - c0);
      const T* bp = b[p].data_ptr<T>();
      for (int64_t r = 0; r < ranks; ++r) lora_widen(bp + r * width + c0, block.data() + r * kCols, cols);
      for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
        const float* s = shrunk.data() + i * max_rank + r0;
        for (int64_t c = 0; c < kCols; ++c) acc[c] = 0.f;
        for (int64_t r = 0; r < ranks; ++r) {
          const float sr = s[r];
          const float* brow = block.data() + r * kCols;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) acc[c] += sr * brow[c];
        }
        T* dst = op + rows[i] * out_stride + col0 + c0;
        lora_widen(dst, dst_f, cols);
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) dst_f[c] += acc[c];
        lora_narrow(dst_f, dst, cols);
      }
    }
  });
}

at::Tensor lora_sgmv_(at::Tensor out, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& offsets,
                      at::TensorList a, const at::Tensor& parts, at::TensorList b) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "lora_sgmv_: x and out must be [T, *]");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "lora_sgmv_: x and out need contiguous rows");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "lora_sgmv_: out and x must share a dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && parts.scalar_type() == at::kLong,
              "lora_sgmv_: rows, offsets and parts are int64");
  const at::Tensor rows_c = rows.contiguous(), offsets_c = offsets.contiguous(), parts_c = parts.contiguous();
  const int64_t groups = offsets_c.numel() - 1;
  TORCH_CHECK(groups == static_cast<int64_t>(a.size()), "lora_sgmv_: one A per group");
  TORCH_CHECK(parts_c.dim() == 2 && parts_c.size(1) == 5 && parts_c.size(0) == static_cast<int64_t>(b.size()),
              "lora_sgmv_: parts is [P, 5] with one B per part");
  TORCH_CHECK(offsets_c.data_ptr<int64_t>()[groups] == rows_c.numel(), "lora_sgmv_: offsets must end at len(rows)");
  std::vector<at::Tensor> a_c, b_c;
  for (const auto& t : a) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == x.size(1) && t.scalar_type() == x.scalar_type(),
                "lora_sgmv_: each A is [R, in] in x's dtype");
    a_c.push_back(t.contiguous());
  }
  const int64_t* pp = parts_c.data_ptr<int64_t>();
  for (size_t p = 0; p < b.size(); ++p) {
    const int64_t g = pp[p * 5], cols = pp[p * 5 + 2] - pp[p * 5 + 1], ranks = pp[p * 5 + 4] - pp[p * 5 + 3];
    TORCH_CHECK(g >= 0 && g < groups && pp[p * 5 + 1] >= 0 && pp[p * 5 + 2] <= out.size(1) && pp[p * 5 + 3] >= 0 &&
                    pp[p * 5 + 4] <= a_c[g].size(0),
                "lora_sgmv_: part ", p, " is out of range");
    TORCH_CHECK(b[p].dim() == 2 && b[p].size(0) == ranks && b[p].size(1) == cols &&
                    b[p].scalar_type() == x.scalar_type(),
                "lora_sgmv_: part ", p, "'s B (transposed) must be [", ranks, ", ", cols, "] in x's dtype");
    b_c.push_back(b[p].contiguous());
  }
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows_c.numel(); ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0), "lora_sgmv_: row ", rp[i], " is out of range");
  if (x.scalar_type() == at::kFloat) {
    lora_sgmv_impl<float>(out, x, rp, offsets_c.data_ptr<int64_t>(), groups, a_c, pp, parts_c.size(0), b_c);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "lora_sgmv_: float32 or bfloat16 only");
    lora_sgmv_impl<c10::BFloat16>(out, x, rp, offsets_c.data_ptr<int64_t>(), groups, a_c, pp, parts_c.size(0), b_c);
  }
  return out;
}
