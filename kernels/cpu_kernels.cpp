// Kernels for a decode step's few rows on the CPU (kernels/cpu_kernels.py builds and loads this file):
// bfloat16 projections, paged attention and the KV write, RMS norm, rope, the MLP's activation, LoRA and a
// greedy step's argmax, where torch's ops cost more in dispatch (several small ops each, a few microseconds
// apiece) than in work, and decode_layers, every layer of a pre-norm decoder in one call and one parallel region.
//
// quiver_cpu::linear(x [M, K] bf16, w [NB, KP, 64, 2] bf16, n, bias [n] or None) -> y [M, n] bf16:
//   y[m, j] = round_bf16(sum_k x[m, k] * W[j, k] + bias[j]), products and sums in float32,
//   where W[j, k] = w[j / 64, k / 2, j % 64, k % 2] (zero beyond n rows and K columns; 2 * KP >= K).
// That blocked layout is oneDNN's own for packed bfloat16 weights on AVX512-BF16 CPUs (server/model/packed.py
// reads it in place, no second copy): 64 output rows' pairs of inputs side by side, so one 64-byte load
// holds 16 rows x 2 inputs and one dot-product instruction adds them into 16 row sums, with no horizontal
// sums, the weight read as one forward stream per 64 rows. At a decode step's few rows a projection only
// streams its weight, so this reaches more of the memory bandwidth than oneDNN's GEMM does at those sizes;
// the threads share its blocks (each starts on an equal run of them: BlockQueue). Without AVX512-BF16 a plain
// loop computes the same (tests run it on any CPU; serving then keeps oneDNN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 64;  // output rows per block
constexpr int kMaxRows = 4;     // x rows per pass over a block (4 x 4 accumulators in registers)

inline float to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {
  at::BFloat16 b(f);  // round to nearest even, as torch rounds
  uint16_t u;
  std::memcpy(&u, &b, sizeof u);
  return u;
}

// acc[i][0..63] = sum_p x_i[2p..2p+1] . w[p][0..63][0..1] over p < KP, for R rows x_i (pairs as uint32)
template <int R>
void block_sums(const uint32_t* x, int64_t ldx, const uint32_t* w, int64_t KP, float (*acc)[kBlock]) {
#if defined(__AVX512BF16__)
  __m512 a[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) a[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p, w += kBlock) {
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + 16 * j);
    for (int i = 0; i < R; ++i) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * ldx + p]));
      for (int j = 0; j < 4; ++j) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc[i] + 16 * j, a[i][j]);
#else
  for (int i = 0; i < R; ++i) std::fill(acc[i], acc[i] + kBlock, 0.f);
  for (int64_t p = 0; p < KP; ++p, w += kBlock) {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w);
    for (int i = 0; i < R; ++i) {
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(x + i * ldx + p);
      const float x0 = to_float(xp[0]), x1 = to_float(xp[1]);
      for (int64_t j = 0; j < kBlock; ++j) acc[i][j] += x0 * to_float(wp[2 * j]) + x1 * to_float(wp[2 * j + 1]);
    }
  }
#endif
}

// block_sums<1> through 256-bit loads and sums (the 64-byte rows in halves): the same sums lane for lane, but a
// single row's pass streams its weight faster this way on AMD's AVX-512 CPUs (SmolLM2's projections one after
// another: 3-13% more GB/s at one row; none at two rows, where the 512-bit form's fewer instructions win)
void row_sums(const uint32_t* x, int64_t, const uint32_t* w, int64_t KP, float (*acc)[kBlock]) {
#if defined(__AVX512BF16__)
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < KP; ++p, w += kBlock) {
    const __m256bh xv = (__m256bh)_mm256_set1_epi32(static_cast<int>(x[p]));
    for (int j = 0; j < 8; ++j)
      a[j] = _mm256_dpbf16_ps(a[j], xv, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * j)));
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc[0] + 8 * j, a[j]);
#else
  block_sums<1>(x, 0, w, KP, acc);
#endif
}

using BlockSums = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float (*)[kBlock]);
constexpr BlockSums kPasses[kMaxRows] = {row_sums, block_sums<2>, block_sums<3>, block_sums<4>};

// A projection's blocks, handed out to its threads: thread t starts on its own contiguous range (an equal share of
// the blocks, so that each streams forward through memory), and one that runs out takes the last block of the
// range with most left, so that the threads finish within a block of each other whatever share of the memory
// each gets. A block is always summed whole, by one thread: the same bits whoever sums it, at any thread count.
class BlockQueue {
 public:
  explicit BlockQueue(int64_t threads) : ranges_(threads) {}
  // thread t of n: its range of a projection of NB blocks (a range not yet set reads as empty: nothing to take)
  void start(int64_t t, int64_t n, int64_t NB) {
    ranges_[t].v.store(pack(NB * t / n, NB * (t + 1) / n), std::memory_order_release);
  }
  // thread t's next block: the first of its own range, else the last of the fullest range; -1 when none is left
  int64_t take(int64_t t, int64_t n) {
    for (uint64_t v = ranges_[t].v.load(std::memory_order_acquire); first(v) < last(v);)
      if (ranges_[t].v.compare_exchange_weak(v, pack(first(v) + 1, last(v)), std::memory_order_acq_rel))
        return first(v);
    for (;;) {
      int64_t victim = -1, most = 0;
      uint64_t v = 0;
      for (int64_t u = 0; u < n; ++u)
        if (const uint64_t w = ranges_[u].v.load(std::memory_order_acquire); last(w) - first(w) > most)
          victim = u, most = last(w) - first(w), v = w;
      if (victim < 0) return -1;
      if (ranges_[victim].v.compare_exchange_strong(v, pack(first(v), last(v) - 1), std::memory_order_acq_rel))
        return last(v) - 1;
    }
  }

 private:
  static uint64_t pack(int64_t first, int64_t last) { return static_cast<uint64_t>(first) << 32 | static_cast<uint64_t>(last); }
  static int64_t first(uint64_t v) { return static_cast<int64_t>(v >> 32); }
  static int64_t last(uint64_t v) { return static_cast<int64_t>(v & 0xffffffffu); }
  struct alignas(64) Range {
    std::atomic<uint64_t> v{0};
  };
  std::vector<Range> ranges_;
};

// Thread t's blocks of y = x W^T (x [M, 2 * KP] as pairs, W [NB, KP, 64, 2] as pairs): each block's sums for all
// M rows (4 at a time, the block read again from cache past 4) to write(b, m, rows, acc [rows][64])
template <typename Write>
void sum_blocks(BlockQueue& queue, int64_t t, int64_t n, const uint32_t* X, int64_t M, int64_t KP, const uint32_t* W,
                Write&& write) {
  alignas(64) float acc[kMaxRows][kBlock];
  for (int64_t b; (b = queue.take(t, n)) >= 0;)
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m));
      kPasses[rows - 1](X + m * KP, KP, W + b * KP * kBlock, KP, acc);
      write(b, m, rows, acc[0]);
    }
}

// y [M, n] = round(acc + bias) for the block's columns, rows m..m + rows
inline void write_block(uint16_t* Y, int64_t n, const float* bias, int64_t b, int64_t m, int rows, const float* acc) {
  const int64_t col = b * kBlock, cols = std::min(kBlock, n - col);
  for (int i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      Y[(m + i) * n + col + j] = to_bf16(bias ? acc[i * kBlock + j] + bias[col + j] : acc[i * kBlock + j]);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && w.size(2) == kBlock && w.size(3) == 2,
              "quiver_cpu::linear: x [M, K], w [NB, KP, 64, 2]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "quiver_cpu::linear: bfloat16 only");
  TORCH_CHECK(w.is_contiguous(), "quiver_cpu::linear: w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0), KP = w.size(1);
  TORCH_CHECK(2 * KP >= K && NB * kBlock >= n && n > 0, "quiver_cpu::linear: w too small for x or n");
  // x as pairs, zero-padded to 2 * KP columns (the padded weight columns are zero, but 0 * NaN is not)
  at::Tensor xp = x.contiguous();
  if (K != 2 * KP) {
    xp = at::zeros({M, 2 * KP}, x.options());
    xp.narrow(1, 0, K).copy_(x);
  }
  at::Tensor y = at::empty({M, n}, x.options());
  at::Tensor bf;
  const float* B = nullptr;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    B = bf.data_ptr<float>();
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), NB);
  BlockQueue queue(threads);
  const uint32_t* X = reinterpret_cast<const uint32_t*>(xp.data_ptr<at::BFloat16>());
  const uint32_t* W = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      queue.start(t, threads, NB);
      sum_blocks(queue, t, threads, X, M, KP, W, [&](int64_t b, int64_t m, int rows, const float* acc) {
        write_block(Y, n, B, b, m, rows, acc);
      });
    }
  });
  return y;
}

// e^x for x <= 0 (a softmax's shifted scores) to within 2 float32 ulps (Cephes' expf: 2^n times a degree-7
// polynomial of the remainder), inline so that loops over keys vectorise; 0 below -87.3 (and for -inf)
inline float exp_nonpositive(float x) {
  const bool zero = x < -87.3f;
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return zero ? 0.f : y * scale;
}

// a . b over D floats
inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// dst[0..D) = src[0..D) as float32
template <typename T>
inline void to_floats(const T* src, float* dst, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; d + 16 <= D; d += 16) {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
      _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
    }
  }
#endif
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

#if defined(__AVX512F__)
// 16 lanes of bfloat16 as float32, and back rounded to nearest even (NaN kept a NaN), as c10::BFloat16 rounds
// (templates only so that discarded branches of a dispatch on other types still compile)
template <typename T>
inline __m512 load_bf16(const T* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512i bf16_bits(__m512 v) {  // each lane's bfloat16, in its low 16 bits
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}
template <typename T>
inline void store_bf16(T* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
// v rounded to bfloat16 and back, in registers (an intermediate eager torch rounds to the dtype)
inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
// -v lane by lane (the sign bit flipped, as unary minus does; 0 - v would turn -0 into +0)
inline __m512 negate(__m512 v) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
}
// e^x on 16 lanes to within 2 float32 ulps (exp_nonpositive's polynomial; 2^n applied by scalef, so large x
// overflow to inf and small ones fall to 0 as expf does)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, x), x, _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}
#endif

// f(j, row) for every key j the mask allows, row = that key's (or value's) D entries as float32: the NB
// blocks of bs entries walked through the row's table (key j = n * bs + o, no division per key)
template <typename T, typename F>
inline void allowed_rows(const T* cache, const int64_t* table, const bool* allowed, int64_t NB, int64_t bs,
                         int64_t D, float* row, F&& f) {
  for (int64_t n = 0, j = 0; n < NB; ++n) {
    const T* block = cache + table[n] * bs * D;
    for (int64_t o = 0; o < bs; ++o, ++j) {
      if (!allowed[j]) continue;
      to_floats(block + o * D, row, D);
      f(j, row);
    }
  }
}

// The G query heads of one KV head, one query of one row: each key and value read once for all of them.
template <typename T, int G>
void attend_heads(const T* q, const T* kc, const T* vc, const int64_t* table, const bool* allowed, int64_t NB,
                  int64_t bs, int64_t D, float scale, float softcap, float* scores, T* out) {
  const int64_t L = NB * bs;
  float qf[G][256], acc[G][256] = {}, row[256], m[G], total[G] = {};
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY;
    to_floats(q + h * D, qf[h], D);
  }
  allowed_rows(kc, table, allowed, NB, bs, D, row, [&](int64_t j, const float* k) {
    for (int h = 0; h < G; ++h) {
      float sc = static_cast<float>(static_cast<T>(dot(qf[h], k, D))) * scale;
      if (softcap > 0.f) sc = softcap * std::tanh(sc / softcap);
      scores[h * L + j] = sc;
      m[h] = std::max(m[h], sc);
    }
  });
  for (int h = 0; h < G; ++h) {
    float* sc = scores + h * L;
    for (int64_t j = 0; j < L; ++j) sc[j] = exp_nonpositive(allowed[j] ? sc[j] - m[h] : -INFINITY);
    float lanes[16] = {};
    int64_t j = 0;
    for (; j + 16 <= L; j += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += sc[j + l];
    for (; j < L; ++j) total[h] += sc[j];
    for (int l = 0; l < 16; ++l) total[h] += lanes[l];
  }
  allowed_rows(vc, table, allowed, NB, bs, D, row, [&](int64_t j, const float* v) {
    for (int h = 0; h < G; ++h) {
      const float p = static_cast<float>(static_cast<T>(scores[h * L + j] / total[h]));
      for (int64_t d = 0; d < D; ++d) acc[h][d] += p * v[d];
    }
  });
  for (int h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<T>(acc[h][d]);
}

// Paged attention's tasks: a task takes one query of one row and up to 4 of the heads of one KV head (the others
// in more tasks), each key and value read once for them, in place through the block table
template <typename T>
struct PagedAttention {
  const T *q, *k, *v;  // q [B, Q, H, D]; caches [KV, NBLK, bs, D]
  const int64_t* tables;  // [B, NB]
  const bool* allowed;    // [B, Q, NB * bs]
  T* out;                 // [B, Q, H, D], a query's heads out_row apart
  int64_t out_row, Q, H, D, KV, NBLK, bs, NB;
  float scale, softcap;

  int64_t per() const {
    const int64_t g = H / KV;
    return g % 4 == 0 ? 4 : g % 3 == 0 ? 3 : g % 2 == 0 ? 2 : 1;
  }
  int64_t tasks(int64_t B) const { return B * Q * KV * (H / KV / per()); }
  // the task's query (b * Q + i) and KV head
  std::pair<int64_t, int64_t> of(int64_t task) const {
    const int64_t turns = H / KV / per();
    return {task / (KV * turns), (task / turns) % KV};
  }
  void run(int64_t task, float* scores) const {  // scores: 4 * NB * bs floats
    const int64_t p = per(), turns = H / KV / p, g = H / KV;
    const auto [bq, kvh] = of(task);
    const int64_t first = kvh * g + (task % turns) * p, kv_base = kvh * NBLK * bs * D, L = NB * bs;
    const T* qh = q + (bq * H + first) * D;
    T* oh = out + bq * out_row + first * D;
    auto go = [&](auto heads) {
      attend_heads<T, decltype(heads)::value>(qh, k + kv_base, v + kv_base, tables + (bq / Q) * NB, allowed + bq * L, NB,
                                              bs, D, scale, softcap, scores, oh);
    };
    switch (p) {
      case 1: go(std::integral_constant<int, 1>()); break;
      case 2: go(std::integral_constant<int, 2>()); break;
      case 3: go(std::integral_constant<int, 3>()); break;
      default: go(std::integral_constant<int, 4>()); break;
    }
  }
};

// quiver_cpu::paged_attention(q [B, Q, H, D], k_cache, v_cache [KV, NBLK, bs, D], block_tables [B, NB] int64,
//                             allowed [B, Q, NB * bs] bool, scale, softcap) -> [B, Q, H, D]
//   out[b, i, h] = sum_j p_j V_b[h / g, j],  p = softmax_j(cap(scale * q[b, i, h] . K_b[h / g, j])) over j with
//   allowed[b, i, j], K_b[., j] = k_cache[., block_tables[b, j / bs], j % bs], g = H / KV, cap(s) = softcap ·
//   tanh(s / softcap) when softcap > 0. kernels.torch_ops.few_query_attention's maths and roundings: q . k
//   summed in float32 and rounded to the cache's dtype, the softmax in float32, the probabilities rounded to
//   the cache's dtype before they meet V, the sum in float32 (exp to within 2 float32 ulps: exp_nonpositive).
//   Tasks as PagedAttention's, masked keys skipped.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& allowed, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "quiver_cpu::paged_attention: q [B, Q, H, D], contiguous caches [KV, NBLK, bs, D]");
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t KV = k_cache.size(0), NBLK = k_cache.size(1), bs = k_cache.size(2), NB = block_tables.size(1);
  const int64_t L = NB * bs;
  TORCH_CHECK(D <= 256 && H % KV == 0 && k_cache.size(3) == D && allowed.size(2) == L,
              "quiver_cpu::paged_attention: head dim <= 256, H a multiple of KV, allowed [B, Q, NB * bs]");
  at::Tensor qc = q.contiguous(), tables = block_tables.to(at::kLong).contiguous(), mask = allowed.contiguous();
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const PagedAttention<scalar_t> att{qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                       tables.data_ptr<int64_t>(), mask.data_ptr<bool>(), out.data_ptr<scalar_t>(),
                                       H * D, Q, H, D, KV, NBLK, bs, NB, static_cast<float>(scale), static_cast<float>(softcap)};
    // a short context's few tasks cost less run here than handed to another thread
    at::parallel_for(0, att.tasks(B), std::max<int64_t>(1, 2048 / L), [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(4 * L);
      for (int64_t t = t0; t < t1; ++t) att.run(t, scores.data());
    });
  });
  return out;
}

// quiver_cpu::rms_norm(x [..., N], w [N], eps, offset, fp32_product) -> x's shape and dtype:
//   n = x / sqrt(mean(x^2) + eps) in float32; fp32_product: round(n * (offset + w)), else
//   round(round(offset + w) * round(n)) (rounding to x's dtype): server/model/llama.py rms_norm's maths and
//   roundings in one pass per row instead of six ops.
template <typename T>
void norm_row(const T* xr, const T* W, T* yr, int64_t N, float eps, float off, bool fp32_product) {
  alignas(64) float lanes[16] = {};
  float sq = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  constexpr bool vec = std::is_same_v<T, c10::BFloat16>;
  if constexpr (vec) {
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= N; j += 16) {
      const __m512 v = load_bf16(xr + j);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    _mm512_store_ps(lanes, acc);
  }
#endif
  for (; j + 16 <= N; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += static_cast<float>(xr[j + l]) * static_cast<float>(xr[j + l]);
  for (; j < N; ++j) sq += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
  for (int l = 0; l < 16; ++l) sq += lanes[l];
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(N) + eps);
  j = 0;
#if defined(__AVX512F__)
  if constexpr (vec) {
    const __m512 vinv = _mm512_set1_ps(inv), voff = _mm512_set1_ps(off);
    for (; j + 16 <= N; j += 16) {
      const __m512 n = _mm512_mul_ps(load_bf16(xr + j), vinv), wj = _mm512_add_ps(voff, load_bf16(W + j));
      store_bf16(yr + j, fp32_product ? _mm512_mul_ps(n, wj) : _mm512_mul_ps(round_bf16(n), round_bf16(wj)));
    }
  }
#endif
  for (; j < N; ++j) {
    const float n = static_cast<float>(xr[j]) * inv, wj = static_cast<float>(W[j]);
    yr[j] = fp32_product ? static_cast<T>(n * (off + wj))
                         : static_cast<T>(static_cast<float>(static_cast<T>(off + wj)) * static_cast<float>(static_cast<T>(n)));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset, bool fp32_product) {
  const int64_t N = x.size(-1), rows = x.numel() / N;
  TORCH_CHECK(w.numel() == N && w.scalar_type() == x.scalar_type(), "quiver_cpu::rms_norm: w [N] in x's dtype");
  at::Tensor xc = x.contiguous(), wc = w.contiguous(), out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* W = wc.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        norm_row(X + r * N, W, Y + r * N, N, static_cast<float>(eps), static_cast<float>(offset), fp32_product);
    });
  });
  return out;
}

// quiver_cpu::rope(x [T, H, D], cos, sin [T, R] in x's dtype, R <= D even) -> [T, H, D] contiguous:
//   out[..., j] = round(round(x[j] cos[j]) + round(rot[j] sin[j])) for j < R, rot = (-x[R/2..R), x[0..R/2)),
//   out[..., j] = x[j] beyond R: server/model/rope.py apply_rope (rotate-half, partial rotary) in one op.
template <typename T>
void rope_row(const T* xr, const T* c, const T* s, T* y, int64_t D, int64_t R) {
  const int64_t half = R / 2;
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; half % 16 == 0 && j < R; j += 16) {
      const __m512 x = load_bf16(xr + j), rot = j < half ? negate(load_bf16(xr + j + half)) : load_bf16(xr + j - half);
      store_bf16(y + j, _mm512_add_ps(round_bf16(_mm512_mul_ps(x, load_bf16(c + j))),
                                      round_bf16(_mm512_mul_ps(rot, load_bf16(s + j)))));
    }
  }
#endif
  for (; j < R; ++j) {
    const float rot = j < half ? -static_cast<float>(xr[j + half]) : static_cast<float>(xr[j - half]);
    const float a = static_cast<float>(static_cast<T>(static_cast<float>(xr[j]) * static_cast<float>(c[j])));
    const float b = static_cast<float>(static_cast<T>(rot * static_cast<float>(s[j])));
    y[j] = static_cast<T>(a + b);
  }
  for (j = R; j < D; ++j) y[j] = xr[j];
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) <= x.size(2) && cos.size(1) % 2 == 0 && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(), "quiver_cpu::rope: x [T, H, D], cos, sin [T, R <= D] in x's dtype");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), R = cos.size(1);
  at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous(), out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* C = cc.data_ptr<scalar_t>();
    const scalar_t* S = sc.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, T * H, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) rope_row(X + i * D, C + (i / H) * R, S + (i / H) * R, Y + i * D, D, R);
    });
  });
  return out;
}

#if defined(__AVX512F__)
// sum_k x[k] * a[k] over K bfloat16 pairs, in float32
template <typename T>
inline float dot_bf16(const T* x, const T* a, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
#if defined(__AVX512BF16__)
  for (; k + 32 <= K; k += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(a + k));
#endif
  for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(load_bf16(x + k), load_bf16(a + k), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; k < K; ++k) sum += static_cast<float>(x[k]) * static_cast<float>(a[k]);
  return sum;
}

// y[c] = round(y[c] + sum_j u[j] * b[j * ldb + c]) for c < cols: 16 columns at a time down all R rows of b
template <typename T>
inline void expand_bf16(const float* u, int64_t R, const T* b, int64_t ldb, T* y, int64_t cols) {
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < R; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(u[j]), load_bf16(b + j * ldb + c), acc);
    store_bf16(y + c, _mm512_add_ps(load_bf16(y + c), acc));
  }
  for (; c < cols; ++c) {
    float acc = 0.f;
    for (int64_t j = 0; j < R; ++j) acc = std::fma(u[j], static_cast<float>(b[j * ldb + c]), acc);  // as the lanes
    y[c] = static_cast<T>(static_cast<float>(y[c]) + acc);
  }
}
#endif

// quiver_cpu::lora_add_(y [M, N], x [M, K], a [L, S*R, K], b [L, S*R, N], slots [M] int64, offsets [S+1], rank R):
//   for every row m with s = slots[m] >= 0 and every slice i (columns offsets[i]..offsets[i+1]):
//   u = a[s, iR..iR+R) x[m] (float32), y[m, cols] = round(y[m, cols] + u . b[s, iR..iR+R), cols)) — y += B_s A_s x
//   with B block-diagonal, as kernels.torch_ops.lora_apply defines it, in float32 and rounded once into y (as
//   TorchOps' few-row path). One op per projection for a decode step's few rows, each row its own adapter,
//   reading the slot buffers in place (no float32 copies, no zero blocks of B).
void lora_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& slots,
              at::IntArrayRef offsets, int64_t rank) {
  TORCH_CHECK(y.is_contiguous() && a.is_contiguous() && b.is_contiguous() && y.scalar_type() == x.scalar_type() &&
              a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
              "quiver_cpu::lora_add_: contiguous y, a, b in x's dtype");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), SR = a.size(1), S = offsets.size() - 1;
  TORCH_CHECK(a.size(2) == K && b.size(1) == SR && b.size(2) == N && S * rank == SR && slots.numel() == M,
              "quiver_cpu::lora_add_: shapes");
  at::Tensor xc = x.contiguous(), sl = slots.to(at::kLong).contiguous();
  const int64_t* slot_of = sl.data_ptr<int64_t>();
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_add", [&] {
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* A = a.data_ptr<scalar_t>();
    const scalar_t* Bm = b.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    // a task: one row's slice; a few tasks (a decode step's one row) cost less run here than handed out
    at::parallel_for(0, M * S, 4, [&](int64_t t0, int64_t t1) {
      std::vector<float> xf(K), row(std::max(K, N)), u(rank), acc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / S, i = t % S, s = slot_of[m];
        if (s < 0) continue;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          const scalar_t* ab = A + (s * SR + i * rank) * K;
          for (int64_t j = 0; j < rank; ++j) u[j] = dot_bf16(X + m * K, ab + j * K, K);
          expand_bf16(u.data(), rank, Bm + s * SR * N + i * rank * N + off[i], N, Y + m * N + off[i],
                      off[i + 1] - off[i]);
          continue;
        }
#endif
        to_floats(X + m * K, xf.data(), K);
        for (int64_t j = 0; j < rank; ++j) {
          to_floats(A + (s * SR + i * rank + j) * K, row.data(), K);
          u[j] = dot(xf.data(), row.data(), K);
        }
        const int64_t lo = off[i], cols = off[i + 1] - lo;
        acc.assign(cols, 0.f);
        for (int64_t j = 0; j < rank; ++j) {
          to_floats(Bm + (s * SR + i * rank + j) * N + lo, row.data(), cols);
          const float uj = u[j];
          for (int64_t c = 0; c < cols; ++c) acc[c] += uj * row[c];
        }
        scalar_t* yr = Y + m * N + lo;
        for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<scalar_t>(static_cast<float>(yr[c]) + acc[c]);
      }
    });
  });
}

// quiver_cpu::write_kv_(k_cache, v_cache [KV, NBLK, bs, D], k, v [T, KV, D], slot_mapping [T] int64):
//   k_cache[:, s / bs, s % bs] = k[t] (and v) for s = slot_mapping[t]: torch_ops.write_kv in one op.
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.scalar_type() == k_cache.scalar_type() &&
              v.scalar_type() == v_cache.scalar_type() && k.dim() == 3 && v.dim() == 3,
              "quiver_cpu::write_kv_: contiguous caches, k and v [T, KV, D] in their dtype");
  const int64_t KV = k_cache.size(0), slots = k_cache.size(1) * k_cache.size(2), D = k_cache.size(3), T = k.size(0);
  at::Tensor sl = slot_mapping.to(at::kLong).contiguous();
  const int64_t* S = sl.data_ptr<int64_t>();
  for (const auto& [cache, src] : {std::pair<at::Tensor*, const at::Tensor*>{&k_cache, &k}, {&v_cache, &v}}) {
    at::Tensor sc = src->contiguous();
    const int64_t bytes = D * sc.element_size();
    const char* from = static_cast<const char*>(sc.data_ptr());
    char* to = static_cast<char*>(cache->data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(S[t] >= 0 && S[t] < slots, "quiver_cpu::write_kv_: slot out of range");
      for (int64_t h = 0; h < KV; ++h) std::memcpy(to + (h * slots + S[t]) * bytes, from + (t * KV + h) * bytes, bytes);
    }
  }
}

// quiver_cpu::act_mul(gate_up [T, 2I], kind) -> [T, I]: act(gate) * up, gate = gate_up[:, :I], up = gate_up[:, I:],
//   act silu (kind 0) or tanh-approximated gelu (kind 1), each rounded to the dtype as eager torch rounds them.
template <typename T>
void act_row(const T* gate, const T* up, T* y, int64_t I, int64_t kind) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; kind == 0 && j + 16 <= I; j += 16) {  // silu
      const __m512 g = load_bf16(gate + j);
      const __m512 a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(negate(g))));
      store_bf16(y + j, _mm512_mul_ps(round_bf16(a), load_bf16(up + j)));
    }
  }
#endif
  for (; j < I; ++j) {
    const float g = static_cast<float>(gate[j]);
    const float a = kind == 0 ? g / (1.f + std::exp(-g))
                              : 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    y[j] = static_cast<T>(static_cast<float>(static_cast<T>(a)) * static_cast<float>(up[j]));
  }
}

at::Tensor act_mul(const at::Tensor& gate_up, int64_t kind) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && (kind == 0 || kind == 1),
              "quiver_cpu::act_mul: gate_up [T, 2I], kind 0 (silu) or 1 (gelu tanh)");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor gu = gate_up.contiguous(), out = at::empty({T, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "act_mul", [&] {
    const scalar_t* G = gu.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) act_row(G + t * 2 * I, G + t * 2 * I + I, Y + t * I, I, kind);
    });
  });
  return out;
}

// x[0..n) = round(x + y), as x + y rounds
template <typename T>
inline void add_row(T* x, const T* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 16 <= n; i += 16) store_bf16(x + i, _mm512_add_ps(load_bf16(x + i), load_bf16(y + i)));
#endif
  for (; i < n; ++i) x[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

#if defined(__AVX512BF16__)
struct alignas(64) Flag {  // a count one thread publishes, on a cache line of its own
  std::atomic<int64_t> count{0};
};

// A barrier for a team that spins on one flag (a step's dozens of waits each cost what a cache line's trip
// between cores costs), yielding after a while so that a member the OS has descheduled still gets to run.
class SpinBarrier {
 public:
  void reset(int n) { n_ = n; }
  void wait(int& sense) {
    sense ^= 1;
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      flag_.store(sense, std::memory_order_release);
      return;
    }
    for (int spins = 0; flag_.load(std::memory_order_acquire) != sense; ++spins)
      if (spins < 20000) _mm_pause(); else std::this_thread::yield();
  }

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> flag_{0};
  int n_ = 1;
};

// Every cache line of the keys and values that attention task t0..t1 read, requested from memory (into this
// core's caches) at once: a row's blocks lie scattered and were last read a step ago, so attention walking them
// one by one would wait out the memory's latency block after block. Asked at the start of each layer, they
// arrive while the layer's first projection streams.
template <typename T>
void prefetch_tasks(const PagedAttention<T>& att, int64_t t0, int64_t t1) {
  const int64_t L = att.NB * att.bs, block = att.bs * att.D;
  for (int64_t t = t0, last = -1; t < t1; ++t) {
    const auto [bq, kvh] = att.of(t);
    const int64_t key = (bq / att.Q) * att.KV + kvh;  // one row's blocks of one KV head, once
    if (key == last) continue;
    last = key;
    const int64_t b = bq / att.Q;
    const bool* mask = att.allowed + (b * att.Q + att.Q - 1) * L;  // the row's last query: the most keys
    for (int64_t n = 0; n < att.NB; ++n) {
      const int64_t blk = att.tables[b * att.NB + n];
      if (blk < 0 || blk >= att.NBLK || std::none_of(mask + n * att.bs, mask + (n + 1) * att.bs, [](bool a) { return a; }))
        continue;
      for (const T* cache : {att.k, att.v}) {
        const char* from = reinterpret_cast<const char*>(cache + (kvh * att.NBLK + blk) * block);
        for (int64_t byte = 0; byte < block * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(from + byte);
      }
    }
  }
}
#endif

// quiver_cpu::decode_plan: a model's per-layer tensors as decode_layers reads them, checked and resolved to
// pointers once at load (passing and checking several hundred tensors cost a batch-1 step about 0.1 ms each
// step); held, with references to every tensor, until decode_plan_free. Returns the plan's id.
//   norms [2L] (attention-in, MLP-in per layer); weights [4L] blocked (qkv, o, gate_up, down per layer) with
//   widths [4] and biases [4L] (None where a projection has none); k_caches, v_caches [L]; lora_a [4L] slot
//   buffers [S, SR, K] (empty: no LoRA) and lora_b the same in 64-column blocks [S, NB, SR, 64]
//   (B[s, j, c] = lora_b[s, c / 64, j, c % 64], block-diagonal: slice k's columns from rows k * rank..),
//   lora_slices [4] slices per group, lora_offsets the groups' column bounds one after another; final_norm
//   [hidden]; the model's norm, attention and activation settings.
#if defined(__AVX512BF16__)
struct DecodePlan {
  using bf = at::BFloat16;
  std::vector<at::Tensor> keep;  // every tensor the pointers below point into
  int64_t L = 0, H = 0, nh = 0, nkv = 0, d = 0, act = 0, NBLK = 0, bs = 0, rank = 0, slots = 0;
  int64_t widths[4] = {}, K[4] = {}, KP[4] = {}, NB[4] = {}, SR[4] = {};
  float eps = 0.f, offset = 0.f, scale = 0.f;
  bool fp32_product = false, lora = false;
  std::vector<const uint32_t*> W;
  std::vector<const bf*> norms, A, Bm;
  std::vector<const float*> bias;
  std::vector<bf*> kc, vc;
  std::vector<std::vector<int64_t>> offsets = std::vector<std::vector<int64_t>>(4);
  const bf* final_norm = nullptr;
};

std::mutex plans_lock;
std::unordered_map<int64_t, std::shared_ptr<const DecodePlan>> plans;
int64_t next_plan = 0;
#endif

int64_t decode_plan(at::TensorList norms, at::TensorList weights, at::IntArrayRef widths,
                    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_caches,
                    at::TensorList v_caches, at::TensorList lora_a, at::TensorList lora_b, at::IntArrayRef lora_slices,
                    at::IntArrayRef lora_offsets, int64_t lora_rank, double eps, double norm_offset, bool fp32_product,
                    int64_t nh, int64_t nkv, int64_t d, int64_t act, double scale, const at::Tensor& final_norm) {
#if defined(__AVX512BF16__)
  using bf = at::BFloat16;
  auto plan = std::make_shared<DecodePlan>();
  DecodePlan& P = *plan;
  const int64_t L = k_caches.size();
  P.L = L, P.nh = nh, P.nkv = nkv, P.d = d, P.act = act, P.rank = lora_rank, P.fp32_product = fp32_product;
  P.eps = static_cast<float>(eps), P.offset = static_cast<float>(norm_offset), P.scale = static_cast<float>(scale);
  P.lora = !lora_a.empty();
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * L) && weights.size() == static_cast<size_t>(4 * L) &&
              biases.size() == static_cast<size_t>(4 * L) && widths.size() == 4 && L > 0 && v_caches.size() == k_caches.size() &&
              (!P.lora || (lora_a.size() == static_cast<size_t>(4 * L) && lora_b.size() == lora_a.size())),
              "quiver_cpu::decode_plan: per-layer lists of the wrong length");
  P.H = final_norm.numel();
  const int64_t H = P.H;
  TORCH_CHECK(d <= 256 && nh % nkv == 0 && widths[0] == (nh + 2 * nkv) * d && widths[1] == H && widths[3] == H &&
              widths[2] % 2 == 0, "quiver_cpu::decode_plan: projections of the model's shape");
  const int64_t K[4] = {H, nh * d, H, widths[2] / 2};  // each group's input width
  for (int g = 0; g < 4; ++g) {
    P.widths[g] = widths[g], P.K[g] = K[g], P.KP[g] = weights[g].size(1), P.NB[g] = weights[g].size(0);
    TORCH_CHECK(2 * P.KP[g] >= K[g] && P.NB[g] * kBlock >= widths[g], "quiver_cpu::decode_plan: weights too small");
  }
  TORCH_CHECK(P.KP[0] == P.KP[2], "quiver_cpu::decode_plan: qkv and gate_up read the same normed x");
  auto keep = [&](const at::Tensor& t) { P.keep.push_back(t); return t.data_ptr<bf>(); };
  for (const at::Tensor& w : norms) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.numel() == H,
                "quiver_cpu::decode_plan: bfloat16 norm weights [hidden]");
    P.norms.push_back(keep(w));
  }
  TORCH_CHECK(final_norm.is_contiguous() && final_norm.scalar_type() == at::kBFloat16,
              "quiver_cpu::decode_plan: a bfloat16 final norm [hidden]");
  P.final_norm = keep(final_norm);
  for (int64_t i = 0; i < 4 * L; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(0) == P.NB[i % 4] &&
                w.size(1) == P.KP[i % 4], "quiver_cpu::decode_plan: blocked bfloat16 weights, the same per layer");
    P.W.push_back(reinterpret_cast<const uint32_t*>(keep(w)));
    const auto b = biases.get(i);
    if (b.has_value()) P.keep.push_back(b->to(at::kFloat).contiguous());
    P.bias.push_back(b.has_value() ? P.keep.back().data_ptr<float>() : nullptr);
  }
  P.NBLK = k_caches[0].size(1), P.bs = k_caches[0].size(2);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(k_caches[l].is_contiguous() && v_caches[l].is_contiguous() && k_caches[l].scalar_type() == at::kBFloat16 &&
                v_caches[l].scalar_type() == at::kBFloat16 && k_caches[l].sizes() == at::IntArrayRef({nkv, P.NBLK, P.bs, d}) &&
                v_caches[l].sizes() == k_caches[l].sizes(), "quiver_cpu::decode_plan: bfloat16 caches [KV, NBLK, bs, D]");
    P.kc.push_back(keep(k_caches[l]));
    P.vc.push_back(keep(v_caches[l]));
  }
  if (P.lora) {
    for (int64_t g = 0, at = 0; g < 4; at += lora_slices[g] + 1, ++g) {
      P.offsets[g].assign(lora_offsets.begin() + at, lora_offsets.begin() + at + lora_slices[g] + 1);
      P.SR[g] = lora_a[g].size(1);
    }
    for (int64_t i = 0; i < 4 * L; ++i) {
      TORCH_CHECK(lora_a[i].is_contiguous() && lora_b[i].is_contiguous() && lora_a[i].scalar_type() == at::kBFloat16 &&
                  lora_b[i].scalar_type() == at::kBFloat16 && lora_a[i].size(1) == P.SR[i % 4] &&
                  lora_a[i].size(2) == K[i % 4] && lora_b[i].dim() == 4 && lora_b[i].size(1) == P.NB[i % 4] &&
                  lora_b[i].size(2) == P.SR[i % 4] && lora_b[i].size(3) == kBlock &&
                  lora_b[i].size(0) == lora_a[0].size(0) && lora_a[i].size(0) == lora_a[0].size(0),
                  "quiver_cpu::decode_plan: LoRA slot buffers");
      P.A.push_back(keep(lora_a[i]));
      P.Bm.push_back(keep(lora_b[i]));
    }
    P.slots = lora_a[0].size(0);
  }
  std::lock_guard<std::mutex> guard(plans_lock);
  plans[next_plan] = plan;
  return next_plan++;
#else
  TORCH_CHECK(false, "quiver_cpu::decode_plan: built without AVX512-BF16");
#endif
}

void decode_plan_free(int64_t id) {
#if defined(__AVX512BF16__)
  std::lock_guard<std::mutex> guard(plans_lock);
  plans.erase(id);
#endif
}

// quiver_cpu::decode_layers: every decoder layer of a pre-norm model (Llama's layout: x += o(attn(norm(x))),
// x += down(act(gate) * up)(norm(x))) over the embedded x [T, hidden] in one call, for a bfloat16 step of few
// rows whose attention is one in-order group, on a CPU with AVX512-BF16: the eager path's maths, roundings and
// order of sums, so its result bit for bit.
//   plan: decode_plan's id (the model's tensors); x [T, hidden]; cos, sin [T, R] (one rope for every layer);
//   slot_mapping [T]; block_tables [B, NB], allowed [B, Q, NB * bs] with B * Q = T; token_slots [T] (each row's
//   LoRA slot or -1; None where the plan has no LoRA). Returns the final norm of x after the last layer.
// One parallel region for the whole stack: torch's threads stay in it from the first layer to the last and
// meet at a spinning barrier after each phase (a projection, rope and the KV write, attention), where op by op
// each projection was a fork and a join and the small ops between ran on one thread while the others waited.
// The threads share each projection's blocks as quiver_cpu::linear's do (BlockQueue); the norms and the
// activation, a few hundred values, each thread computes for itself; LoRA's expand runs where a block is written.
at::Tensor decode_layers(int64_t plan_id, at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& allowed,
                         const std::optional<at::Tensor>& token_slots) {
#if defined(__AVX512BF16__)
  using bf = at::BFloat16;
  std::shared_ptr<const DecodePlan> plan;
  {
    std::lock_guard<std::mutex> guard(plans_lock);
    const auto found = plans.find(plan_id);
    TORCH_CHECK(found != plans.end(), "quiver_cpu::decode_layers: no plan ", plan_id);
    plan = found->second;
  }
  const DecodePlan& P = *plan;
  const int64_t L = P.L, T = x.size(0), H = P.H, B = block_tables.size(0), Q = T / B, nh = P.nh, nkv = P.nkv, d = P.d;
  const int64_t* widths = P.widths;
  const int64_t *K = P.K, *KP = P.KP, *NB = P.NB, *SR = P.SR;
  const bool lora = P.lora;
  TORCH_CHECK(lora == token_slots.has_value(), "quiver_cpu::decode_layers: token_slots with a plan that has LoRA "
              "buffers, and only then");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == H && B * Q == T && cos.size(0) == T &&
              cos.size(1) <= d && cos.size(1) % 2 == 0 && cos.sizes() == sin.sizes(),
              "quiver_cpu::decode_layers: a bfloat16 x [T, hidden] of the plan's model");
  const int64_t NBLK = P.NBLK, bs = P.bs, NBT = block_tables.size(1), ctx = NBT * bs;
  TORCH_CHECK(allowed.size(2) == ctx && slot_mapping.numel() == T, "quiver_cpu::decode_layers: attention metadata");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous(), mask = allowed.contiguous();
  const at::Tensor slot_map = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot_of_token = slot_map.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot_of_token[t] >= 0 && slot_of_token[t] < NBLK * bs, "quiver_cpu::decode_layers: slot out of range");
  const at::Tensor cs = cos.to(at::kBFloat16).contiguous(), sn = sin.to(at::kBFloat16).contiguous();
  const int64_t R = cs.size(1);
  int64_t u_size = 0;
  at::Tensor row_slots;
  const int64_t* slot_of = nullptr;
  if (lora) {
    for (int g = 0; g < 4; ++g) u_size = std::max(u_size, T * SR[g]);
    TORCH_CHECK(token_slots->numel() == T, "quiver_cpu::decode_layers: token_slots [T]");
    row_slots = token_slots->to(at::kLong).contiguous();
    slot_of = row_slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(slot_of[t] < P.slots, "quiver_cpu::decode_layers: LoRA slot out of range");
  }
  const std::vector<std::vector<int64_t>>& offsets = P.offsets;
  const int64_t lora_rank = P.rank, act = P.act;
  const float eps_f = P.eps, off_f = P.offset;
  const bool fp32_product = P.fp32_product;
  const int64_t threads = at::get_num_threads();
  at::Tensor out = x.contiguous().clone(), normed = at::empty_like(out);  // the residual stream, added into in place
  bf* X = out.data_ptr<bf>();
  // each thread's own input rows (the norm's, the activation's), zero-padded to the weights' 2 * KP columns
  const int64_t in_row = 2 * KP[0], act_row_len = 2 * KP[3];
  at::Tensor own_in = at::zeros({threads, T, in_row}, x.options()), own_act = at::zeros({threads, T, act_row_len}, x.options());
  at::Tensor att_in = at::zeros({T, 2 * KP[1]}, x.options());
  at::Tensor qkv = at::empty({T, widths[0]}, x.options()), gate_up = at::empty({T, widths[2]}, x.options());
  at::Tensor proj_out = at::empty({T, H}, x.options()), q_rot = at::empty({T, nh, d}, x.options());
  std::vector<float> u(u_size), scores(threads * 4 * ctx);
  std::vector<Flag> u_done(threads);  // the last projection (its count) whose share of u each thread has summed
  BlockQueue queue(threads);
  SpinBarrier barrier;

#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
    barrier.reset(static_cast<int>(nt));
    int sense = 0;
    int64_t count = 0;  // projections so far
    bf* in = own_in.data_ptr<bf>() + t * T * in_row;
    bf* act_in = own_act.data_ptr<bf>() + t * T * act_row_len;
    auto range = [&](int64_t n) { return std::pair<int64_t, int64_t>{n * t / nt, n * (t + 1) / nt}; };

    // y = x W_i^T (+ bias) [+ B_s A_s x], then after(col, cols, m, rows) on each block written; x: rows of
    // 2 * KP[g] values. Ends at the barrier: y whole for every thread.
    auto project = [&](int64_t i, const bf* xin, bf* y, auto&& after) {
      const int64_t g = i % 4, n = widths[g];
      queue.start(t, nt, NB[g]);
      const bf* A = lora ? P.A[i] : nullptr;
      const bf* Bm = lora ? P.Bm[i] : nullptr;
      ++count;
      bool u_whole = !lora;
      if (lora) {  // u[m, j] = A_s[j] . x[m], a share each; a thread expands once every share is in
        const auto [j0, j1] = range(T * SR[g]);
        for (int64_t j = j0; j < j1; ++j)
          if (const int64_t s = slot_of[j / SR[g]]; s >= 0)
            u[j] = dot_bf16(xin + (j / SR[g]) * 2 * KP[g], A + (s * SR[g] + j % SR[g]) * K[g], K[g]);
        u_done[t].count.store(count, std::memory_order_release);
      }
      uint16_t* Y = reinterpret_cast<uint16_t*>(y);
      auto write = [&](int64_t b, int64_t m, int rows, const float* acc) {
        write_block(Y, n, P.bias[i], b, m, rows, acc);
        const int64_t col = b * kBlock, cols = std::min(kBlock, n - col);
        for (int64_t r = m; lora && r < m + rows; ++r) {
          const int64_t s = slot_of[r];
          if (s < 0) continue;
          for (int64_t v = 0; !u_whole && v < nt; ++v)  // by the end of a first block, long since
            while (u_done[v].count.load(std::memory_order_acquire) != count) _mm_pause();
          u_whole = true;
          const std::vector<int64_t>& off = offsets[g];
          for (size_t k = 0; k + 1 < off.size(); ++k) {  // the slices these columns fall in
            const int64_t lo = std::max(col, off[k]), hi = std::min(col + cols, off[k + 1]);
            const bf* Bs = Bm + ((s * NB[g] + b) * SR[g] + k * lora_rank) * kBlock;  // the block's rows of slice k
            if (lo < hi) expand_bf16(&u[r * SR[g] + k * lora_rank], lora_rank, Bs + lo - col, kBlock, y + r * n + lo, hi - lo);
            // the next block's rows of B, requested now (the next block's projection takes longer than their
            // way from memory)
            if (std::max(col + kBlock, off[k]) < std::min(col + 2 * kBlock, off[k + 1]))
              for (int64_t j = 0; j < lora_rank * kBlock; j += 32) __builtin_prefetch(Bs + SR[g] * kBlock + j);
          }
        }
        after(col, cols, m, rows);
      };
      sum_blocks(queue, t, nt, reinterpret_cast<const uint32_t*>(xin), T, KP[g], P.W[i], write);
      barrier.wait(sense);
    };
    auto no_after = [](int64_t, int64_t, int64_t, int) {};
    auto add_to_x = [&](bf* y) {
      return [&, y](int64_t col, int64_t cols, int64_t m, int rows) {
        for (int64_t r = m; r < m + rows; ++r) add_row(X + r * H + col, y + r * H + col, cols);
      };
    };
    bf* QKV = qkv.data_ptr<bf>();
    bf* GU = gate_up.data_ptr<bf>();
    bf* PO = proj_out.data_ptr<bf>();
    bf* QR = q_rot.data_ptr<bf>();
    bf* ATT = att_in.data_ptr<bf>();
    const bf* C = cs.data_ptr<bf>();
    const bf* S = sn.data_ptr<bf>();
    float* my_scores = scores.data() + t * 4 * ctx;

    for (int64_t l = 0; l < L; ++l) {
      bf* kc = P.kc[l];
      bf* vc = P.vc[l];
      const PagedAttention<bf> att{QR, kc, vc, tables.data_ptr<int64_t>(), mask.data_ptr<bool>(), ATT, 2 * KP[1],
                                   Q, nh, d, nkv, NBLK, bs, NBT, P.scale, 0.f};
      const auto [a0, a1] = range(att.tasks(B));
      prefetch_tasks(att, a0, a1);
      for (int64_t r = 0; r < T; ++r)
        norm_row(X + r * H, P.norms[2 * l], in + r * in_row, H, eps_f, off_f, fp32_product);
      project(4 * l, in, QKV, no_after);
      // rope on q and k (k straight into the cache), v copied there: one head of one token a task
      const auto [h0, h1] = range(T * (nh + 2 * nkv));
      for (int64_t task = h0; task < h1; ++task) {
        const int64_t tok = task / (nh + 2 * nkv), h = task % (nh + 2 * nkv), slot = slot_of_token[tok];
        const bf* src = QKV + tok * widths[0] + h * d;
        if (h < nh)
          rope_row(src, C + tok * R, S + tok * R, QR + (tok * nh + h) * d, d, R);
        else if (h < nh + nkv)
          rope_row(src, C + tok * R, S + tok * R, kc + ((h - nh) * NBLK * bs + slot) * d, d, R);
        else
          std::memcpy(vc + ((h - nh - nkv) * NBLK * bs + slot) * d, src, d * sizeof(bf));
      }
      barrier.wait(sense);
      for (int64_t task = a0; task < a1; ++task) att.run(task, my_scores);
      barrier.wait(sense);
      project(4 * l + 1, ATT, PO, add_to_x(PO));
      for (int64_t r = 0; r < T; ++r)
        norm_row(X + r * H, P.norms[2 * l + 1], in + r * in_row, H, eps_f, off_f, fp32_product);
      project(4 * l + 2, in, GU, no_after);
      const int64_t I = widths[2] / 2;
      for (int64_t r = 0; r < T; ++r) act_row(GU + r * 2 * I, GU + r * 2 * I + I, act_in + r * act_row_len, I, act);
      project(4 * l + 3, act_in, PO, add_to_x(PO));
    }
    for (auto [r, r1] = range(T); r < r1; ++r)
      norm_row(X + r * H, P.final_norm, normed.data_ptr<bf>() + r * H, H, eps_f, off_f, fp32_product);
  }
  return normed;
#else
  TORCH_CHECK(false, "quiver_cpu::decode_layers: built without AVX512-BF16");
#endif
}

// quiver_cpu::greedy(logits [N, V] float32) -> (tokens [N] int64, finite [N] bool):
//   tokens[n] = the first j with logits[n, j] = max_j logits[n, j]; finite[n] = no logit of row n is inf or NaN
//   (then tokens[n] is unspecified). What a greedy step's sampler needs, in one pass and a short second one
//   where torch's argmax alone walks the row element by element.
std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "quiver_cpu::greedy: logits [N, V] float32");
  at::Tensor lc = logits.contiguous();
  const int64_t N = lc.size(0), V = lc.size(1);
  at::Tensor tokens = at::empty({N}, lc.options().dtype(at::kLong)), finite = at::empty({N}, lc.options().dtype(at::kBool));
  const float* L = lc.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  bool* fin = finite.data_ptr<bool>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = L + r * V;
      float m = -INFINITY;
      bool bad = false;
      int64_t j = 0;
#if defined(__AVX512F__)
      __m512 vm = _mm512_set1_ps(-INFINITY);
      __mmask16 vbad = 0;
      for (; j + 16 <= V; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        vbad |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN or infinite
        vm = _mm512_max_ps(vm, v);
      }
      m = _mm512_reduce_max_ps(vm);
      bad = vbad != 0;
#endif
      for (; j < V; ++j) {
        bad |= !std::isfinite(x[j]);
        m = std::max(m, x[j]);
      }
      fin[r] = !bad;
      tok[r] = 0;
      for (j = 0; j < V; ++j)
        if (x[j] == m) {
          tok[r] = j;
          break;
        }
    }
  });
  return {tokens, finite};
}

bool fast() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(quiver_cpu, m) {
  m.def("linear(Tensor x, Tensor w, int n, Tensor? bias) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor allowed, float scale, "
        "float softcap) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps, float offset, bool fp32_product) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor slots, int[] offsets, int rank) -> ()");
  m.def("write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def("act_mul(Tensor gate_up, int kind) -> Tensor");
  m.def("decode_plan(Tensor[] norms, Tensor[] weights, int[] widths, Tensor?[] biases, Tensor[] k_caches, "
        "Tensor[] v_caches, Tensor[] lora_a, Tensor[] lora_b, int[] lora_slices, int[] lora_offsets, int lora_rank, "
        "float eps, float norm_offset, bool fp32_product, int nh, int nkv, int d, int act, float scale, Tensor final_norm) "
        "-> int", &decode_plan);
  m.def("decode_plan_free(int plan) -> ()", &decode_plan_free);
  m.def("decode_layers(int plan, Tensor x, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_tables, "
        "Tensor allowed, Tensor? token_slots) -> Tensor");
  m.def("greedy(Tensor logits) -> (Tensor, Tensor)");
  m.def("fast() -> bool", &fast);
}

TORCH_LIBRARY_IMPL(quiver_cpu, CPU, m) {
  m.impl("linear", linear);
  m.impl("paged_attention", paged_attention);
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
  m.impl("lora_add_", lora_add);
  m.impl("write_kv_", write_kv);
  m.impl("act_mul", act_mul);
  m.impl("decode_layers", decode_layers);
  m.impl("greedy", greedy);
}
