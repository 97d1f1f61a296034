// The fused kernels' thread team and parallel_range, shared by both builds (cpu_kernels.cpp,
// AVX-512; cpu_kernels_portable.cpp, AVX2/NEON). Included inside each file's anonymous namespace,
// after <atomic>, <exception>, <mutex>, <thread> and ATen/Parallel.h.

// ---- a team of threads for one call: work claimed chunk by chunk ----------------------------
// at::parallel_for gives each thread a fixed share and ends at a barrier, so a thread whose core
// another process holds (the server's front end, the load generator) stalls every loop of the step
// until the OS runs it again. decode_stack instead runs one OpenMP region for the whole step: its
// first thread (the leader) walks the layers and publishes each parallel loop as a job, cut in
// small chunks. Each thread owns a contiguous span of the chunks and takes them from its front, half
// of what is left at a time, so its share of a weight is one stream; a thread done with its span
// takes the chunks left in another's one by one from the back. So a thread that is not running
// leaves its share to the others, and the leader waits only for chunks already claimed. (Taking
// chunks one at a time from one shared counter, as before, a thread's successive chunks lay apart,
// each began a new stream and each claim was a locked instruction that drains the loads in
// flight: a one-stream decode stack took 1.03-1.05x as long; BENCHMARKS.md section 11.)
// Chunking never changes results: each output is computed by one thread, in the same order.
class Team {
 public:
  static constexpr int kMaxThreads = 64;

  // A job: chunks of [begin, end), `call(ctx, b0, b1)` on each.
  struct Job {
    std::atomic<int64_t> begin{0}, end{0}, chunk{1}, chunks{0};
    std::atomic<const void*> ctx{nullptr};
    std::atomic<void (*)(const void*, int64_t, int64_t)> call{nullptr};
    // Thread t's span of chunk indices, [front, back), tagged with the job's generation:
    // generation (40 bits) << 24 | front (12 bits) << 12 | back (12 bits). A job has at most
    // 8 * threads + 1 chunks (see run).
    // One cache line per thread: a thread claims from its span and counts the chunks it ran without
    // taking a line from the others.
    struct alignas(64) Span {
      std::atomic<uint64_t> value;
      std::atomic<int64_t> done;  // chunks this thread ran (written by it alone)
    };
    Span span[kMaxThreads];
  };

  template <typename F>
  void run(int64_t begin, int64_t end, int64_t grain, const F& f) {
    if (begin >= end) return;
    const int64_t total = end - begin;
    // A few chunks per thread at least (so a late thread's share can be taken), never below the grain.
    const int64_t chunk = std::max<int64_t>(grain, (total + 8 * threads_ - 1) / (8 * threads_));
    const int64_t chunks = (total + chunk - 1) / chunk;
    TORCH_CHECK(chunks < (int64_t{1} << 12), "Team: too many chunks");
    const uint64_t generation = ++generation_;
    Job& job = jobs_[generation & 1];
    job.begin.store(begin, std::memory_order_relaxed);
    job.end.store(end, std::memory_order_relaxed);
    job.chunk.store(chunk, std::memory_order_relaxed);
    job.chunks.store(chunks, std::memory_order_relaxed);
    job.ctx.store(&f, std::memory_order_relaxed);
    job.call.store([](const void* ctx, int64_t b0, int64_t b1) { (*static_cast<const F*>(ctx))(b0, b1); },
                   std::memory_order_relaxed);
    for (int64_t t = 0; t < threads_; ++t) job.span[t].done.store(0, std::memory_order_relaxed);
    for (int64_t t = 0; t < threads_; ++t)
      job.span[t].value.store(pack(generation, chunks * t / threads_, chunks * (t + 1) / threads_), std::memory_order_relaxed);
    published_.store(generation, std::memory_order_release);  // publishes the job's fields
    while (take_one(0)) {
    }
    for (int spins = 0; chunks_done(job) < chunks; ++spins) pause(spins);
    if (failed_.load(std::memory_order_acquire)) std::rethrow_exception(error_);
  }

  // Thread `self`'s loop (not the leader's): take chunks of whatever job is published until the leader stops.
  void work(int64_t self) {
    for (int spins = 0; !stopped_.load(std::memory_order_acquire);) {
      if (take_one(self)) {
        spins = 0;
      } else {
        pause(spins++);
      }
    }
  }

  void stop() { stopped_.store(true, std::memory_order_release); }
  explicit Team(int64_t threads) : threads_(std::min<int64_t>(threads, kMaxThreads)) {}
  int64_t threads() const { return threads_; }

 private:
  int64_t chunks_done(const Job& job) const {
    int64_t done = 0;
    for (int64_t t = 0; t < threads_; ++t) done += job.span[t].done.load(std::memory_order_acquire);
    return done;
  }

  static constexpr uint64_t kTagMask = (uint64_t{1} << 40) - 1;
  static uint64_t pack(uint64_t generation, int64_t front, int64_t back) {
    return (generation & kTagMask) << 24 | static_cast<uint64_t>(front) << 12 | static_cast<uint64_t>(back);
  }

  // Claim chunks of the published job, from the front of `self`'s span or else one from the back of
  // another's, and run them; false when none is left to claim. A span's generation tag makes a claim
  // on a job that is no longer the published one fail: every span of a finished job is empty, and
  // the next job's spans carry another tag.
  bool take_one(int64_t self) {
    const uint64_t generation = published_.load(std::memory_order_acquire);
    if (generation == 0) return false;
    Job& job = jobs_[generation & 1];
    const uint64_t tag = generation & kTagMask;
    for (int64_t k = 0; k < threads_; ++k) {
      const int64_t owner = (self + k) % threads_;
      std::atomic<uint64_t>& span = job.span[owner].value;
      uint64_t value = span.load(std::memory_order_acquire);
      for (;;) {
        const int64_t front = static_cast<int64_t>(value >> 12 & 0xFFF), back = static_cast<int64_t>(value & 0xFFF);
        if (value >> 24 != tag || front >= back) break;  // another job's, or nothing left here
        // The job's fields are this generation's while its span is not empty (see above).
        const int64_t begin = job.begin.load(std::memory_order_relaxed), end = job.end.load(std::memory_order_relaxed);
        const int64_t chunk = job.chunk.load(std::memory_order_relaxed);
        const void* ctx = job.ctx.load(std::memory_order_relaxed);
        auto call = job.call.load(std::memory_order_relaxed);
        const bool own = owner == self;
        // Its owner takes half of what is left of its span (one claim for several chunks), another
        // thread one chunk from the back.
        const int64_t first = own ? front : back - 1;
        const int64_t count = own ? std::max<int64_t>(1, (back - front) / 2) : 1;
        if (!span.compare_exchange_weak(value, own ? pack(generation, front + count, back) : pack(generation, front, back - 1),
                                        std::memory_order_acq_rel, std::memory_order_acquire))
          continue;  // raced: `value` holds the span as it is now
        const int64_t b0 = begin + first * chunk;
        try {
          call(ctx, b0, std::min(end, b0 + count * chunk));
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex_);
          if (!failed_.load(std::memory_order_relaxed)) {
            error_ = std::current_exception();
            failed_.store(true, std::memory_order_release);
          }
        }
        std::atomic<int64_t>& done = job.span[self].done;
        done.store(done.load(std::memory_order_relaxed) + count, std::memory_order_release);
        return true;
      }
    }
    return false;
  }

  static void pause(int spins) {
    if (spins < 2048) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();  // _mm_pause without <immintrin.h>
#elif defined(__aarch64__)
      asm volatile("yield");
#endif
    } else {
      std::this_thread::yield();  // long wait: a claimed chunk's thread is not running; let it
    }
  }

  const int64_t threads_;
  Job jobs_[2];
  uint64_t generation_ = 0;  // the leader's: jobs published so far
  std::atomic<uint64_t> published_{0};  // the generation of the job threads may claim from
  std::atomic<bool> stopped_{false};
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

thread_local Team* current_team = nullptr;  // set on the leader while decode_stack runs

// The kernels' parallel loops: through the team inside decode_stack, else at::parallel_for.
template <typename F>
inline void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (current_team != nullptr) {
    current_team->run(begin, end, grain, f);
  } else {
    at::parallel_for(begin, end, grain, f);
  }
}
