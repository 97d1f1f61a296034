// Quest's block selection (sparse decode attention), shared by both builds: decode_stack picks
// each sparse decode's blocks in every layer with it, and the quest_select op exposes it to the
// tests, which compare it with models/attention.py's quest_choose (the PyTorch reference).
// Included inside each file's anonymous namespace, after its kernels: it calls the build's
// softmax_ (an fp32 row in place) and parallel_range.
//
// Why in C++: selecting through PyTorch (a matmul and a top-k per layer) takes the step out of
// the whole-stack kernel, and at one stream the per-layer dispatch ate what the shorter
// attention saved (1.00x of dense at 8k tokens, 0.53x at 1k).
//
// The arithmetic is quest_choose's, step for step: q times the softmax scale, rounded to bf16,
// split into its positive and negative parts; a block's upper bound of q.k per query head,
// sum_d q+_d max_d + q-_d min_d, summed in fp32 (products of bf16 values are exact in fp32) and
// rounded to bf16 as the reference's bf16 matmul rounds it; a softmax per head over the
// sequence's blocks but the last (kept anyway; a partial block's summary is stale); the sum over
// every head of the sequence; the first and last blocks always, then the best others, a tie
// going to the earlier block (the reference sorts stably). Only the order of the fp32 sums and
// the exp (the build's polynomial, ~2e-7 relative) differ from PyTorch's, so a selection differs
// only where two blocks' scores agree to about 1e-6.

inline float quest_bf16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

inline float quest_round_bf16(float x) {  // to nearest even, as c10::BFloat16 rounds (finite x)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// 16 fp32 lanes as GCC's generic vectors: one zmm in the AVX-512 build, two ymm in the AVX2 one,
// four q registers on NEON; lane by lane the same arithmetic in each.
typedef float QuestF16 __attribute__((vector_size(64)));
typedef uint16_t QuestH16 __attribute__((vector_size(32)));
typedef uint32_t QuestU16 __attribute__((vector_size(64)));
typedef float QuestF8 __attribute__((vector_size(32)));
typedef float QuestF4 __attribute__((vector_size(16)));

inline QuestF16 quest_load_bf16(const uint16_t* p) {  // 16 bf16 values, widened exactly
  QuestH16 half;
  std::memcpy(&half, p, sizeof half);
  const QuestU16 wide = __builtin_convertvector(half, QuestU16) << 16;
  QuestF16 x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

// The sum of a vector's 16 lanes in a fixed tree (lane l plus lane l + 8, then l + 4, ...).
inline float quest_lane_sum(QuestF16 v) {
  const QuestF8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const QuestF4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// One block's bounds for the G query heads of a KV head, each rounded to bf16: out[g * stride].
// qs: the heads' signed queries, `chunks` vectors each. G fixed (1..8) keeps the accumulators in
// registers; G = 0 takes `group` heads one after another. Each head's sum runs in the same order
// either way.
template <int G>
void quest_block_bounds(const uint16_t* row, const QuestF16* qs, int64_t chunks, int64_t group, float* out,
                        int64_t stride) {
  if constexpr (G > 0) {
    QuestF16 acc[G] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const QuestF16 bound = quest_load_bf16(row + 16 * c);
      for (int g = 0; g < G; ++g) acc[g] += qs[g * chunks + c] * bound;
    }
    for (int g = 0; g < G; ++g) out[g * stride] = quest_round_bf16(quest_lane_sum(acc[g]));
  } else {
    for (int64_t g = 0; g < group; ++g) {
      QuestF16 acc = {};
      for (int64_t c = 0; c < chunks; ++c) acc += qs[g * chunks + c] * quest_load_bf16(row + 16 * c);
      out[g * stride] = quest_round_bf16(quest_lane_sum(acc));
    }
  }
}

using QuestBoundsFn = void (*)(const uint16_t*, const QuestF16*, int64_t, int64_t, float*, int64_t);

inline QuestBoundsFn quest_bounds_kernel(int64_t group) {
  switch (group) {
    case 1: return quest_block_bounds<1>;
    case 2: return quest_block_bounds<2>;
    case 3: return quest_block_bounds<3>;
    case 4: return quest_block_bounds<4>;
    case 5: return quest_block_bounds<5>;
    case 6: return quest_block_bounds<6>;
    case 7: return quest_block_bounds<7>;
    case 8: return quest_block_bounds<8>;
    default: return quest_block_bounds<0>;
  }
}

// For queries i in [0, m) (one token each: q row i at q + i * q_row, H heads of D bf16 values)
// whose sequence's table is tables[rows_of[i]] (`width` entries) and which see context_lens[i]
// keys: where a sequence has more than `budget` blocks, writes the `budget` blocks it attends
// over (in position order, the last block last) to the first entries of out[rows_of[i]] (rows of
// `out_width` entries); other rows are left as they are. summaries: [KVH, pool, 2D] bf16 (each
// block's key max, then min).
void quest_choose_rows(const uint16_t* q, int64_t q_row, int64_t m, int64_t heads, int64_t kv_heads, int64_t dim,
                       float scale, const uint16_t* summaries, int64_t pool, const int64_t* tables, int64_t width,
                       const int64_t* rows_of, const int64_t* context_lens, int64_t budget, int64_t block_size,
                       int64_t* out, int64_t out_width) {
  TORCH_CHECK(budget >= 2, "quest: a budget of 2 blocks at least");
  TORCH_CHECK(heads % kv_heads == 0 && dim % 16 == 0, "quest: head dim a multiple of 16, whole query groups");
  const int64_t group = heads / kv_heads, two_d = 2 * dim;
  std::vector<int64_t> picked, blocks;  // the queries that leave blocks out, and their block counts
  int64_t most = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t n = (context_lens[i] + block_size - 1) / block_size;
    TORCH_CHECK(context_lens[i] > 0 && n <= width, "quest: a context of ", context_lens[i], " keys beyond its table");
    if (n <= budget) continue;
    picked.push_back(i);
    blocks.push_back(n);
    most = std::max(most, n);
  }
  const int64_t count = static_cast<int64_t>(picked.size());
  if (count == 0) return;
  TORCH_CHECK(budget <= out_width, "quest: a budget of ", budget, " blocks beyond the table's ", out_width);
  // Each query head's q * scale in bf16 as (positive part, negative part): [count, H, 2D] fp32.
  const int64_t chunks = two_d / 16;
  std::vector<QuestF16> signed_q(count * heads * chunks);
  for (int64_t j = 0; j < count; ++j)
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* row = q + picked[j] * q_row + h * dim;
      float* dst = reinterpret_cast<float*>(signed_q.data() + (j * heads + h) * chunks);
      for (int64_t d = 0; d < dim; ++d) {
        const float x = quest_round_bf16(quest_bf16_value(row[d]) * scale);
        dst[d] = x > 0.f ? x : 0.f;
        dst[dim + d] = x < 0.f ? x : 0.f;
      }
    }
  // The bounds [count, H, most] (query head h = kv * G + g reads KV head kv's summaries), in
  // spans of blocks so that one long sequence still splits across threads.
  constexpr int64_t kSpan = 64;
  const int64_t spans = (most + kSpan - 1) / kSpan;
  std::vector<float> bounds(count * heads * most);
  const QuestBoundsFn block_bounds = quest_bounds_kernel(group);
  parallel_range(0, count * kv_heads * spans, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t j = item / (kv_heads * spans), kv = item / spans % kv_heads, span = item % spans;
      const int64_t* table = tables + rows_of[picked[j]] * width;
      const int64_t end = std::min(blocks[j] - 1, (span + 1) * kSpan);  // the last block: no bound
      const uint16_t* head_summaries = summaries + kv * pool * two_d;
      for (int64_t b = span * kSpan; b < end; ++b) {
        const int64_t block = table[b];
        TORCH_CHECK(block >= 0 && block < pool, "quest: block ", block, " outside the summaries");
        if (b + 4 < end) {  // blocks scatter over the pool: fetch a few ahead (a summary is 2D values)
          const char* ahead = reinterpret_cast<const char*>(head_summaries + table[b + 4] * two_d);
          for (int64_t byte = 0; byte < two_d * 2; byte += 64) __builtin_prefetch(ahead + byte);
        }
        // Each head's 16 lanes of partial sums (a bf16 product is exact in fp32: FMA or not, the same).
        block_bounds(head_summaries + block * two_d, signed_q.data() + (j * heads + kv * group) * chunks, chunks,
                     group, bounds.data() + (j * heads + kv * group) * most + b, most);
      }
    }
  });
  // Per sequence: a softmax per head, the sum over heads, then the first, the last and the best others.
  parallel_range(0, count, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> score;
    std::vector<int64_t> order;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = blocks[j];
      score.assign(n - 1, 0.f);
      for (int64_t h = 0; h < heads; ++h) {
        float* row = bounds.data() + (j * heads + h) * most;
        softmax_(row, n - 1);
        for (int64_t b = 0; b < n - 1; ++b) score[b] += row[b];
      }
      order.resize(n - 2);
      for (int64_t b = 1; b < n - 1; ++b) order[b - 1] = b;
      const auto better = [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); };
      std::partial_sort(order.begin(), order.begin() + (budget - 2), order.end(), better);
      std::sort(order.begin(), order.begin() + (budget - 2));
      const int64_t* table = tables + rows_of[picked[j]] * width;
      int64_t* dst = out + rows_of[picked[j]] * out_width;
      dst[0] = table[0];
      for (int64_t k = 0; k < budget - 2; ++k) dst[1 + k] = table[order[k]];
      dst[budget - 1] = table[n - 1];
    }
  });
}

// The keys a query sees through its kept blocks: all of every block but the last, which keeps its own fill.
inline int64_t quest_context(int64_t context, int64_t budget, int64_t block_size) {
  const int64_t n = (context + block_size - 1) / block_size;
  return n <= budget ? context : (budget - 1) * block_size + (context - 1) % block_size + 1;
}

// quest_select's result from the kernel: q [m, H, D] bf16, summaries [KVH, pool, 2D] bf16,
// block_tables [m, W] and context_lens [m] int64. Returns (tables [m, min(W, budget)], the keys
// each query sees through them), as attention.quest_select returns them.
std::tuple<at::Tensor, at::Tensor> quest_select(const at::Tensor& q, const at::Tensor& summaries,
                                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                                int64_t budget_blocks, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "quest_select: q as [m, H, D] bf16 rows");
  TORCH_CHECK(summaries.dim() == 3 && summaries.scalar_type() == at::kBFloat16 && summaries.is_contiguous() &&
              summaries.size(2) == 2 * q.size(2), "quest_select: contiguous bf16 summaries [KVH, blocks, 2D]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && context_lens.scalar_type() ==
              at::kLong && context_lens.numel() == q.size(0) && block_tables.size(0) == q.size(0),
              "quest_select: int64 block_tables [m, W] and context_lens [m]");
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const int64_t m = q.size(0), width = tables.size(1);
  if (width <= budget_blocks) return {tables, lens};
  auto out = tables.narrow(1, 0, budget_blocks).clone();
  const auto rows = at::arange(m, lens.options());
  quest_choose_rows(reinterpret_cast<const uint16_t*>(q.data_ptr()), q.stride(0), m, q.size(1), summaries.size(0),
                    q.size(2), float(scale), reinterpret_cast<const uint16_t*>(summaries.data_ptr()), summaries.size(1),
                    tables.data_ptr<int64_t>(), width, rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                    budget_blocks, block_size, out.data_ptr<int64_t>(), budget_blocks);
  auto seen = lens.clone();
  int64_t* sp = seen.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) sp[i] = quest_context(sp[i], budget_blocks, block_size);
  return {out, seen};
}
