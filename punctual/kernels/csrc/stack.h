// decode_stack and the KV-cache writes it does, shared by both builds: they call the build's
// kernels (linear_*, rms_norm, rope_, silu_mul, paged_attention) by name, so the stack runs the
// same kernels in the same order as the layer-by-layer path whichever build is loaded. Included
// inside each file's anonymous namespace, after its kernels.

// ---- the whole layer stack in one call ------------------------------------------------------
// A decode step of a small model runs ~10 kernels per layer; called one by one from Python, each
// call pays the interpreter, the dispatcher and its argument checks (~1 ms of a 10 ms step for
// 30 layers). decode_stack runs the same kernels in the same order from C++, so its result is
// bitwise that of LlamaModel._forward_fused, when every token attends through paged_attention.

// What a linear's four slots in the weight list hold, by kind.
enum LinearKind : int64_t { kBf16 = 0, kInt8 = 1, kInt4Q8 = 2, kInt4 = 3 };

at::Tensor stack_linear(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& w, size_t at_slot,
                        int64_t kind, int64_t group) {
  const auto& bias = w[at_slot + 3];
  switch (kind) {
    case kBf16: return linear_bf16(x, *w[at_slot], bias);
    case kInt8: return linear_int8(x, *w[at_slot], *w[at_slot + 1], bias);
    case kInt4Q8: return linear_int4_q8(x, *w[at_slot], *w[at_slot + 1], *w[at_slot + 2], group, bias);
    case kInt4: return linear_int4(x, *w[at_slot], *w[at_slot + 1], *w[at_slot + 2], group, bias);
    default: TORCH_CHECK(false, "decode_stack: unknown linear kind ", kind);
  }
}

// The new tokens' K and V (columns [q_size, q_size + 2 kv_size) of qkv) into their cache slots.
void write_kv(const at::Tensor& qkv, int64_t q_size, int64_t kv_size, at::Tensor& k_cache, at::Tensor& v_cache,
              const int64_t* slots) {
  const int64_t tokens = qkv.size(0), stride = qkv.size(1);
  const int64_t capacity = k_cache.numel() / kv_size;
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr());
  auto* kc = reinterpret_cast<uint16_t*>(k_cache.data_ptr());
  auto* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "decode_stack: cache slot ", slots[t], " out of range");
    std::memcpy(kc + slots[t] * kv_size, src + t * stride + q_size, kv_size * sizeof(uint16_t));
    std::memcpy(vc + slots[t] * kv_size, src + t * stride + q_size + kv_size, kv_size * sizeof(uint16_t));
  }
}

// The same into int8 caches, as attention.quantize_int8 stores them (bitwise): per token and KV
// head, scale = max(max |x|, 1e-8) / 127 in fp32 and q = round_half_even(x / scale), clamped to 127.
void write_kv_int8(const at::Tensor& qkv, int64_t q_size, int64_t kv_heads, int64_t dim, at::Tensor& k_cache,
                   at::Tensor& v_cache, at::Tensor& k_scale, at::Tensor& v_scale, const int64_t* slots) {
  const int64_t tokens = qkv.size(0), stride = qkv.size(1), kv_size = kv_heads * dim;
  const int64_t capacity = k_cache.numel() / kv_size;
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat && k_scale.is_contiguous() &&
              v_scale.is_contiguous() && k_scale.numel() == capacity * kv_heads && v_scale.numel() == capacity * kv_heads,
              "decode_stack: fp32 scales, one per slot and KV head");
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr());
  int8_t* caches[2] = {k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>()};
  float* scales[2] = {k_scale.data_ptr<float>(), v_scale.data_ptr<float>()};
  std::vector<float> x(dim);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "decode_stack: cache slot ", slots[t], " out of range");
    for (int which = 0; which < 2; ++which) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const uint16_t* row = src + t * stride + q_size + which * kv_size + h * dim;
        float peak = 0.f;
        for (int64_t i = 0; i < dim; ++i) {
          uint32_t bits = uint32_t(row[i]) << 16;
          std::memcpy(&x[i], &bits, sizeof(float));
          peak = std::max(peak, std::fabs(x[i]));
        }
        const float scale = std::max(peak, 1e-8f) / 127.f;
        int8_t* out = caches[which] + slots[t] * kv_size + h * dim;
        for (int64_t i = 0; i < dim; ++i)
          out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / scale))));
        scales[which][slots[t] * kv_heads + h] = scale;
      }
    }
  }
}

// input_ids, positions [T]; weights: per layer input_norm, post_norm, then qkv, o_proj, gate_up,
// down as four slots each (kind-dependent tensors, then the bias), kinds and groups one per
// linear; caches one K and one V per layer (bf16, or int8 with one K and one V scale tensor per
// layer in k_scales, v_scales; empty for bf16). Returns the final norm's output [T, hidden].
//
// Sparse decodes (Quest): tokens [sparse_start, sparse_end) are one-token decodes whose
// sequences attend in each layer over at most budget_blocks blocks, picked by quest_choose_rows
// from that layer's summaries (one [KVH, blocks, 2D] bf16 tensor per layer; empty, with
// sparse_start == sparse_end, where no decode is sparse). RoPE keeps their true positions; the
// attention reads a per-layer copy of their table rows and the position of their last key there.
at::Tensor decode_stack(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& embed,
                        const at::Tensor& cos_table, const at::Tensor& sin_table,
                        const c10::List<c10::optional<at::Tensor>>& weight_list, at::IntArrayRef kinds,
                        at::IntArrayRef groups, const at::Tensor& final_norm, at::TensorList k_caches,
                        at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                        const at::Tensor& seq_of_token, int64_t heads, int64_t kv_heads, int64_t head_dim,
                        double eps, int64_t window, double scale, at::TensorList k_scales, at::TensorList v_scales,
                        at::TensorList summaries, int64_t sparse_start, int64_t sparse_end, int64_t budget_blocks) {
  const int threads = at::get_num_threads();
  // The layers, run by the leader (or alone, with one thread).
  auto run_layers = [&]() -> at::Tensor {
    const int64_t layers = static_cast<int64_t>(k_caches.size());
    TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == layers && static_cast<int64_t>(kinds.size()) == 4 * layers &&
                static_cast<int64_t>(groups.size()) == 4 * layers &&
                static_cast<int64_t>(weight_list.size()) == 20 * layers,
                "decode_stack: per layer 20 weight slots, 4 kinds and groups, one K and one V cache");
    const bool quantized = !k_scales.empty();
    TORCH_CHECK(!quantized || (static_cast<int64_t>(k_scales.size()) == layers &&
                               static_cast<int64_t>(v_scales.size()) == layers),
                "decode_stack: int8 caches need one K and one V scale tensor per layer");
    TORCH_CHECK(input_ids.dim() == 1 && positions.sizes() == input_ids.sizes() && slot_mapping.sizes() == input_ids.sizes() &&
                seq_of_token.sizes() == input_ids.sizes(), "decode_stack: input_ids, positions, slots, seq_of_token [T]");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), "decode_stack: int64 slots");
    std::vector<c10::optional<at::Tensor>> w;
    w.reserve(weight_list.size());
    for (size_t i = 0; i < weight_list.size(); ++i) w.push_back(weight_list.get(i));
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, tokens = input_ids.size(0);
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    at::Tensor residual = embed.index_select(0, input_ids);
    const at::Tensor cos = cos_table.index_select(0, positions), sin = sin_table.index_select(0, positions);
    at::Tensor delta;
    // Quest: the tables and positions the attention reads, the sparse rows rewritten per layer.
    const bool sparse = sparse_end > sparse_start;
    at::Tensor tables = block_tables, attention_positions = positions;
    std::vector<int64_t> sparse_rows, sparse_lens;
    if (sparse) {
      TORCH_CHECK(static_cast<int64_t>(summaries.size()) == layers && window == 0 && sparse_start >= 0 &&
                  sparse_end <= tokens && block_tables.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  seq_of_token.scalar_type() == at::kLong, "decode_stack: sparse decodes need one summaries tensor per "
                  "layer, full attention, int64 tables and positions, and tokens within the step");
      tables = block_tables.contiguous().clone();
      attention_positions = positions.contiguous().clone();
      const int64_t* seq = seq_of_token.contiguous().data_ptr<int64_t>();
      int64_t* at_pos = attention_positions.data_ptr<int64_t>();
      const int64_t block_size = k_caches[0].size(1);
      for (int64_t t = sparse_start; t < sparse_end; ++t) {
        sparse_rows.push_back(seq[t]);
        sparse_lens.push_back(at_pos[t] + 1);
        at_pos[t] = quest_context(at_pos[t] + 1, budget_blocks, block_size) - 1;
      }
    }
    const at::Tensor whole_tables = sparse ? block_tables.contiguous() : block_tables;
    for (int64_t layer = 0; layer < layers; ++layer) {
      const size_t base = 20 * layer;
      const int64_t* kind = kinds.data() + 4 * layer;
      const int64_t* group = groups.data() + 4 * layer;
      at::Tensor x = delta.defined() ? rms_norm(delta, *w[base], eps, residual) : rms_norm(residual, *w[base], eps, {});
      at::Tensor qkv = stack_linear(x, w, base + 4, kind[0], group[0]);
      if (w[base + 2].has_value()) {  // Qwen3: an RMSNorm over each query and key head before rotary
        for (const auto& [offset, count, weight] : {std::make_tuple(int64_t{0}, heads, *w[base + 2]),
                                                    std::make_tuple(q_size, kv_heads, *w[base + 3])}) {
          at::Tensor part = qkv.narrow(1, offset, count * head_dim);
          part.copy_(rms_norm(part.contiguous().view({tokens * count, head_dim}), weight, eps, {})
                         .view({tokens, count * head_dim}));
        }
      }
      rope_(qkv, cos, sin, heads + kv_heads, head_dim);
      at::Tensor k_cache = k_caches[layer], v_cache = v_caches[layer];
      TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == (quantized ? at::kChar : at::kBFloat16) &&
                  qkv.size(1) == q_size + 2 * kv_size, "decode_stack: contiguous bf16 (or int8, with scales) caches "
                  "and a fused qkv");
      c10::optional<at::Tensor> k_scale, v_scale;
      if (quantized) {
        at::Tensor ks = k_scales[layer], vs = v_scales[layer];
        write_kv_int8(qkv, q_size, kv_heads, head_dim, k_cache, v_cache, ks, vs, slots);
        k_scale = ks;
        v_scale = vs;
      } else {
        write_kv(qkv, q_size, kv_size, k_cache, v_cache, slots);
      }
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, heads, head_dim});
      if (sparse) {
        const at::Tensor& layer_summaries = summaries[layer];
        TORCH_CHECK(layer_summaries.dim() == 3 && layer_summaries.scalar_type() == at::kBFloat16 &&
                    layer_summaries.is_contiguous() && layer_summaries.size(0) == kv_heads &&
                    layer_summaries.size(2) == 2 * head_dim, "decode_stack: bf16 summaries [KVH, blocks, 2D]");
        quest_choose_rows(reinterpret_cast<const uint16_t*>(qkv.data_ptr()) + sparse_start * qkv.stride(0),
                          qkv.stride(0), sparse_end - sparse_start, heads, kv_heads, head_dim, float(scale),
                          reinterpret_cast<const uint16_t*>(layer_summaries.data_ptr()), layer_summaries.size(1),
                          whole_tables.data_ptr<int64_t>(), whole_tables.size(1), sparse_rows.data(),
                          sparse_lens.data(), budget_blocks, k_cache.size(1), tables.data_ptr<int64_t>(),
                          tables.size(1));
      }
      at::Tensor attn = paged_attention(q, k_cache, v_cache, tables, seq_of_token, attention_positions, window, scale,
                                        k_scale, v_scale);
      x = rms_norm(stack_linear(attn, w, base + 8, kind[1], group[1]), *w[base + 1], eps, residual);
      delta = stack_linear(silu_mul(stack_linear(x, w, base + 12, kind[2], group[2])), w, base + 16, kind[3], group[3]);
    }
    return delta.defined() ? rms_norm(delta, final_norm, eps, residual) : rms_norm(residual, final_norm, eps, {});
  };
  if (threads <= 1 || at::in_parallel_region()) return run_layers();
  Team team(threads);
  at::Tensor out;
  std::exception_ptr error;
#pragma omp parallel num_threads(team.threads())
  {
    if (omp_get_thread_num() == 0) {
      current_team = &team;
      try {
        out = run_layers();
      } catch (...) {
        error = std::current_exception();
      }
      current_team = nullptr;
      team.stop();
    } else {
      team.work(omp_get_thread_num());
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

