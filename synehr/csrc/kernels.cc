// CPU kernels of synehr's training step for XLA's CPU backend (float32, AVX2 + FMA), called from JAX through the XLA
// FFI (synehr.model): causal grouped-query attention over packed variable-length segments (`segment_attention`),
// SwiGLU's forward and backward passes (`swiglu`) and a matrix transpose (`transpose2d`).
//
// Attention.
// Layout: the N tokens of a batch in one flat sequence (the real tokens of `unpad_batch`, row after row, then
// padding). q [N, H, Dh], k and v [N, K, Dh], H = G * K (query head h reads key/value head h / G). start [N] int32:
// token i attends to the keys start[i] .. i (its segment so far); start[i] > i marks a padding token (output 0).
// Every token of a segment has the segment's first token as its start.
//
// One task per (segment, key/value head), the longest first, so that each task owns the key and value gradients it
// accumulates. Forward, block by block of up to 32 queries: the G heads' queries of the block as one [M, Dh] matrix,
// scores against the segment's keys up to the block's last token, softmax per row (the log-sum-exp kept for the
// backward pass), then the weighted values. Backward: the probabilities recomputed block by block from the kept
// log-sum-exp (FlashAttention-2's backward pass). Every product runs through one register-blocked 6 x 16 kernel.
// Tasks are shared out over XLA's intra-op thread pool, the calling thread included.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kQueryBlock = 32;  // queries per forward task and backward step

inline long round16(long n) { return (n + 15) & ~15L; }

// C[R x 16] (+)= A(R x kd) B(kd x 16); A(r, p) = A[r * sar + p * sap], B row-major (stride ldb). The accumulators
// are named variables, not an array: GCC keeps an array of them in memory, storing every one at every step.
template <int R>
inline void kernel(int kd, const float* A, long sar, long sap, const float* B, long ldb, float* C, long ldc, bool acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0, e0 = a0, e1 = a0, f0 = a0, f1 = a0;
#define SYNEHR_ROWS(X) X(0, a0, a1) X(1, b0, b1) X(2, c0, c1) X(3, d0, d1) X(4, e0, e1) X(5, f0, f1)
#define SYNEHR_LOAD(r, x0, x1) if constexpr (R > r) if (acc) { x0 = _mm256_loadu_ps(C + r * ldc); x1 = _mm256_loadu_ps(C + r * ldc + 8); }
  SYNEHR_ROWS(SYNEHR_LOAD)
  const float* ap = A;
  for (int p = 0; p < kd; ++p, ap += sap) {
    const __m256 y0 = _mm256_loadu_ps(B + p * ldb), y1 = _mm256_loadu_ps(B + p * ldb + 8);
#define SYNEHR_FMA(r, x0, x1) if constexpr (R > r) { const __m256 w = _mm256_broadcast_ss(ap + r * sar); \
    x0 = _mm256_fmadd_ps(w, y0, x0); x1 = _mm256_fmadd_ps(w, y1, x1); }
    SYNEHR_ROWS(SYNEHR_FMA)
  }
#define SYNEHR_STORE(r, x0, x1) if constexpr (R > r) { _mm256_storeu_ps(C + r * ldc, x0); _mm256_storeu_ps(C + r * ldc + 8, x1); }
  SYNEHR_ROWS(SYNEHR_STORE)
#undef SYNEHR_STORE
#undef SYNEHR_FMA
#undef SYNEHR_LOAD
#undef SYNEHR_ROWS
}

// C[M x N] (+)= A(M x kd) B(kd x N) for N a multiple of 16.
void gemm(int M, int N, int kd, const float* A, long sar, long sap, const float* B, long ldb, float* C, long ldc, bool acc) {
  for (int i = 0; i < M; i += 6) {
    const float* a = A + i * sar;
    float* c = C + i * ldc;
    for (int j = 0; j < N; j += 16) {
      switch (std::min(6, M - i)) {
        case 6: kernel<6>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
        case 5: kernel<5>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
        case 4: kernel<4>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
        case 3: kernel<3>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
        case 2: kernel<2>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
        default: kernel<1>(kd, a, sar, sap, B + j, ldb, c + j, ldc, acc); break;
      }
    }
  }
}

// exp(x), x clamped to [-87, 88]: Cody-Waite reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial, then the
// exponent added to 2^n (relative error ~2e-7).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// row[0:c] = exp(row[0:c] - shift) in place, returning their sum; row[c:width] = 0.
float exp_row(float* row, int c, long width, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(row + j), s));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float tail[8] = {0}, sum = 0;
  if (j < c) {
    float buf[8];
    for (int t = 0; t < 8; ++t) buf[t] = j + t < c ? row[j + t] - shift : -87.0f;
    _mm256_storeu_ps(tail, exp_ps(_mm256_loadu_ps(buf)));
    for (int t = 0; t < c - j; ++t) { row[j + t] = tail[t]; sum += tail[t]; }
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float v : lanes) sum += v;
  std::memset(row + c, 0, sizeof(float) * (width - c));
  return sum;
}

float row_max(const float* row, int c) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= c; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
  float lanes[8], out = -INFINITY;
  _mm256_storeu_ps(lanes, m);
  for (float v : lanes) out = std::max(out, v);
  for (; j < c; ++j) out = std::max(out, row[j]);
  return out;
}

// Attention dropout. Weight (query token i, query head h, key token j; flat indices) is kept when a hash of them
// and the 64-bit seed is at or above rate * 2^32, and then scaled by 1 / (1 - rate): the same weights are dropped
// in the forward and the backward pass, and however the tasks fall on the threads.
struct Dropout {
  uint32_t s0 = 0, s1 = 0, threshold = 0;
  float scale = 1.0f;
  bool on = false;
};

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

inline __m256i mix32v(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// z[0:c] = the dropout factors (0 or 1 / (1 - rate)) of query token `tok`, head `head`, keys key0 .. key0 + c - 1;
// z has room for c rounded up to 8.
void keep_factors(const Dropout& dr, long tok, long head, long H, long key0, long c, float* z) {
  const uint32_t row = mix32(static_cast<uint32_t>(tok * H + head) ^ dr.s0) ^ dr.s1;
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000U)), golden = _mm256_set1_epi32(static_cast<int>(0x9E3779B9U));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(dr.threshold ^ 0x80000000U)), base = _mm256_set1_epi32(static_cast<int>(row));
  const __m256 scale = _mm256_set1_ps(dr.scale);
  __m256i j = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(key0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (long t = 0; t < c; t += 8, j = _mm256_add_epi32(j, _mm256_set1_epi32(8))) {
    const __m256i h = mix32v(_mm256_add_epi32(base, _mm256_mullo_epi32(j, golden)));
    const __m256i dropped = _mm256_cmpgt_epi32(thr, _mm256_xor_si256(h, flip));  // h < threshold, unsigned
    _mm256_storeu_ps(z + t, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), scale));
  }
}

Dropout dropout_of(ffi::AnyBuffer seed, float rate) {
  Dropout dr;
  if (rate <= 0.0f) return dr;
  const uint32_t* sd = seed.typed_data<uint32_t>();
  dr.s0 = sd[0]; dr.s1 = sd[1];
  dr.threshold = static_cast<uint32_t>(std::min(4294967295.0, static_cast<double>(rate) * 4294967296.0));
  dr.scale = 1.0f / (1.0f - rate);
  dr.on = true;
  return dr;
}

struct Dims {
  long N, H, K, G, Dh, Dp;  // Dp: Dh rounded up to 16 (the width of every packed head)
  float scale;
};

struct Task { long s0, s1, kh; };  // one segment [s0, s1) and key/value head

// Rows [t0, t1) of head group `kh` of x [N, heads, Dh], as packed rows (t, g) -> (t - t0) * G + g of width Dp
// (times `mul`); heads = G * K for queries, K (and G = 1) for keys and values.
void pack_rows(const float* x, long heads, long group, long kh, long t0, long t1, const Dims& d, float mul, float* out) {
  for (long t = t0; t < t1; ++t)
    for (long g = 0; g < group; ++g) {
      const float* src = x + (t * heads + kh * group + g) * d.Dh;
      float* dst = out + ((t - t0) * group + g) * d.Dp;
      for (long c = 0; c < d.Dh; ++c) dst[c] = src[c] * mul;
      for (long c = d.Dh; c < d.Dp; ++c) dst[c] = 0.0f;
    }
}

// Keys [t0, t1) of key/value head kh transposed: out[c * ld + j] (width ld >= t1 - t0, zero beyond).
void pack_transposed(const float* x, long t0, long t1, long kh, const Dims& d, long ld, float* out) {
  for (long c = 0; c < d.Dh; ++c) std::memset(out + c * ld + (t1 - t0), 0, sizeof(float) * (ld - (t1 - t0)));
  for (long t = t0; t < t1; ++t) {
    const float* src = x + (t * d.K + kh) * d.Dh;
    for (long c = 0; c < d.Dh; ++c) out[c * ld + (t - t0)] = src[c];
  }
}

float* scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Run task(i) for i in [0, n) on the pool's threads and this one; return when all are done.
void parallel_for(ffi::ThreadPool& pool, long n, const std::function<void(long)>& task) {
  struct State {
    std::atomic<long> next{0}, done{0};
    long n;
    const std::function<void(long)>* task;
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->task = &task;
  auto work = [](State* s) {
    for (long i; (i = s->next.fetch_add(1)) < s->n;) { (*s->task)(i); s->done.fetch_add(1); }
  };
  const long helpers = std::min<long>(pool.num_threads(), n) - 1;
  for (long h = 0; h < helpers; ++h) pool.Schedule([st, work] { work(st.get()); });
  work(st.get());
  while (st->done.load() < n) std::this_thread::yield();
}

// Everything both passes check and derive: shapes, dropout, and one task per (segment, key/value head) of `start`,
// longest first (a segment is a run of real tokens whose start is its first token; start[i] > i is padding).
ffi::Error plan(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, const ffi::AnyBuffer& start,
                const ffi::AnyBuffer& seed, float rate, Dims* d, Dropout* dr, std::vector<Task>* tasks) {
  auto qd = q.dimensions(), kd = k.dimensions(), sd = start.dimensions();
  if (q.element_type() != ffi::F32 || k.element_type() != ffi::F32 || v.element_type() != ffi::F32 || start.element_type() != ffi::S32)
    return ffi::Error::InvalidArgument("segment_attention: q, k, v must be float32 and start int32");
  if (qd.size() != 3 || kd.size() != 3 || sd.size() != 1 || kd[0] != qd[0] || sd[0] != qd[0] || kd[2] != qd[2] || qd[1] % kd[1])
    return ffi::Error::InvalidArgument("segment_attention: expected q [N, H, Dh], k and v [N, K, Dh] with K dividing H, start [N]");
  if (seed.element_type() != ffi::U32 || seed.element_count() != 2 || !(rate >= 0.0f && rate < 1.0f))
    return ffi::Error::InvalidArgument("segment_attention: expected a uint32 seed [2] and a dropout rate in [0, 1)");
  d->N = qd[0]; d->H = qd[1]; d->K = kd[1]; d->G = d->H / d->K; d->Dh = qd[2]; d->Dp = round16(d->Dh);
  d->scale = 1.0f / std::sqrt(static_cast<float>(d->Dh));
  *dr = dropout_of(seed, rate);
  const int32_t* S0 = start.typed_data<int32_t>();
  for (long i = 0; i < d->N;) {
    const long s = S0[i];
    if (s > i) { ++i; continue; }  // padding
    if (s != i) return ffi::Error::InvalidArgument("segment_attention: start must give each segment's tokens its first token's index");
    long j = i + 1;
    while (j < d->N && S0[j] == s) ++j;
    for (long kh = 0; kh < d->K; ++kh) tasks->push_back({i, j, kh});
    i = j;
  }
  std::stable_sort(tasks->begin(), tasks->end(), [](const Task& x, const Task& y) { return x.s1 - x.s0 > y.s1 - y.s0; });
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer start,
                   ffi::AnyBuffer seed, float rate, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse) {
  Dims d;
  Dropout dr;
  std::vector<Task> tasks;
  if (auto e = plan(q, k, v, start, seed, rate, &d, &dr, &tasks); e.failure()) return e;
  const float *Q = q.typed_data<float>(), *Kx = k.typed_data<float>(), *Vx = v.typed_data<float>();
  const int32_t* S0 = start.typed_data<int32_t>();
  float *O = o->typed_data<float>(), *LSE = lse->typed_data<float>();
  for (long i = 0; i < d.N; ++i)
    if (S0[i] > i) {  // padding: zero output, log-sum-exp 0
      std::memset(O + i * d.H * d.Dh, 0, sizeof(float) * d.H * d.Dh);
      std::fill(LSE + i * d.H, LSE + (i + 1) * d.H, 0.0f);
    }
  parallel_for(pool, tasks.size(), [&](long ti) {
    static thread_local std::vector<float> buf, zbuf;
    const Task& t = tasks[ti];
    const long n = t.s1 - t.s0, np = round16(n), Mb = kQueryBlock * d.G;
    float* z = scratch(zbuf, np);
    float* kt = scratch(buf, d.Dp * np + n * d.Dp + Mb * np + 2 * Mb * d.Dp);
    float *vp = kt + d.Dp * np, *s = vp + n * d.Dp, *qb = s + Mb * np, *ob = qb + Mb * d.Dp;
    pack_transposed(Kx, t.s0, t.s1, t.kh, d, np, kt);
    pack_rows(Vx, d.K, 1, t.kh, t.s0, t.s1, d, 1.0f, vp);
    for (long a = t.s0; a < t.s1; a += kQueryBlock) {
      const long b = std::min(t.s1, a + kQueryBlock), m = b - t.s0, mp = round16(m), M = (b - a) * d.G;
      pack_rows(Q, d.H, d.G, t.kh, a, b, d, d.scale, qb);
      gemm(M, mp, d.Dh, qb, d.Dp, 1, kt, np, s, mp, false);  // scores of the block's queries against the keys up to its end
      for (long r = 0; r < M; ++r) {
        const long tok = a + r / d.G, c = tok - t.s0 + 1;
        float* row = s + r * mp;
        const float mx = row_max(row, c), sum = exp_row(row, c, mp, mx), inv = 1.0f / sum;
        for (long j = 0; j < c; ++j) row[j] *= inv;
        LSE[tok * d.H + t.kh * d.G + r % d.G] = mx + std::log(sum);
        if (dr.on) {
          keep_factors(dr, tok, t.kh * d.G + r % d.G, d.H, t.s0, c, z);
          for (long j = 0; j < c; ++j) row[j] *= z[j];
        }
      }
      gemm(M, d.Dp, m, s, mp, 1, vp, d.Dp, ob, d.Dp, false);
      for (long r = 0; r < M; ++r) {
        const long tok = a + r / d.G;
        std::memcpy(O + (tok * d.H + t.kh * d.G + r % d.G) * d.Dh, ob + r * d.Dp, sizeof(float) * d.Dh);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer start,
                    ffi::AnyBuffer seed, ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout, float rate,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv) {
  Dims d;
  Dropout dr;
  std::vector<Task> tasks;
  if (auto e = plan(q, k, v, start, seed, rate, &d, &dr, &tasks); e.failure()) return e;
  const float *Q = q.typed_data<float>(), *Kx = k.typed_data<float>(), *Vx = v.typed_data<float>();
  const float *O = o.typed_data<float>(), *LSE = lse.typed_data<float>(), *dO = dout.typed_data<float>();
  const int32_t* S0 = start.typed_data<int32_t>();
  float *dQ = dq->typed_data<float>(), *dK = dk->typed_data<float>(), *dV = dv->typed_data<float>();
  for (long i = 0; i < d.N; ++i)
    if (S0[i] > i) {  // padding: zero gradients
      std::memset(dQ + i * d.H * d.Dh, 0, sizeof(float) * d.H * d.Dh);
      std::memset(dK + i * d.K * d.Dh, 0, sizeof(float) * d.K * d.Dh);
      std::memset(dV + i * d.K * d.Dh, 0, sizeof(float) * d.K * d.Dh);
    }
  parallel_for(pool, tasks.size(), [&](long ti) {
    static thread_local std::vector<float> buf, zbuf;
    const Task& t = tasks[ti];
    const long n = t.s1 - t.s0, np = round16(n), Mb = kQueryBlock * d.G;
    float* z = scratch(zbuf, np);
    float* kt = scratch(buf, 2 * d.Dp * np + 3 * n * d.Dp + 2 * Mb * np + 3 * Mb * d.Dp + Mb);
    float *vt = kt + d.Dp * np, *kp = vt + d.Dp * np, *gk = kp + n * d.Dp, *gv = gk + n * d.Dp, *p = gv + n * d.Dp;
    float *ds = p + Mb * np, *qb = ds + Mb * np, *gob = qb + Mb * d.Dp, *gq = gob + Mb * d.Dp, *dd = gq + Mb * d.Dp;
    pack_transposed(Kx, t.s0, t.s1, t.kh, d, np, kt);
    pack_transposed(Vx, t.s0, t.s1, t.kh, d, np, vt);
    pack_rows(Kx, d.K, 1, t.kh, t.s0, t.s1, d, 1.0f, kp);
    std::memset(gk, 0, sizeof(float) * 2 * n * d.Dp);  // gk and gv
    for (long a = t.s0; a < t.s1; a += kQueryBlock) {
      const long b = std::min(t.s1, a + kQueryBlock), m = b - t.s0, mp = round16(m), M = (b - a) * d.G;
      pack_rows(Q, d.H, d.G, t.kh, a, b, d, d.scale, qb);
      pack_rows(dO, d.H, d.G, t.kh, a, b, d, 1.0f, gob);
      for (long r = 0; r < M; ++r) {  // dd = rowsum(dO * O)
        const long tok = a + r / d.G, h = t.kh * d.G + r % d.G;
        const float *x = O + (tok * d.H + h) * d.Dh, *y = dO + (tok * d.H + h) * d.Dh;
        float acc = 0;
        for (long c = 0; c < d.Dh; ++c) acc += x[c] * y[c];
        dd[r] = acc;
      }
      gemm(M, mp, d.Dh, qb, d.Dp, 1, kt, np, p, mp, false);  // scores
      gemm(M, mp, d.Dh, gob, d.Dp, 1, vt, np, ds, mp, false);  // dP = dO V^T
      for (long r = 0; r < M; ++r) {
        const long tok = a + r / d.G, c = tok - t.s0 + 1;
        float *pr = p + r * mp, *gd = ds + r * mp;
        exp_row(pr, c, mp, LSE[tok * d.H + t.kh * d.G + r % d.G]);
        if (dr.on) {  // with dropout: dV takes the kept weights, dS = P * (dP * factor - rowsum(dO * O))
          keep_factors(dr, tok, t.kh * d.G + r % d.G, d.H, t.s0, c, z);
          for (long j = 0; j < c; ++j) { gd[j] = pr[j] * (gd[j] * z[j] - dd[r]); pr[j] *= z[j]; }
        } else {
          for (long j = 0; j < c; ++j) gd[j] = pr[j] * (gd[j] - dd[r]);
        }
        std::memset(gd + c, 0, sizeof(float) * (mp - c));
      }
      gemm(M, d.Dp, m, ds, mp, 1, kp, d.Dp, gq, d.Dp, false);  // dQ (of the scaled queries) = dS K
      for (long r = 0; r < M; ++r) {
        const long tok = a + r / d.G;
        float* dst = dQ + (tok * d.H + t.kh * d.G + r % d.G) * d.Dh;
        for (long c = 0; c < d.Dh; ++c) dst[c] = gq[r * d.Dp + c] * d.scale;
      }
      gemm(m, d.Dp, M, ds, 1, mp, qb, d.Dp, gk, d.Dp, true);  // dK += dS^T Q
      gemm(m, d.Dp, M, p, 1, mp, gob, d.Dp, gv, d.Dp, true);  // dV += P^T dO
    }
    for (long j = 0; j < n; ++j) {
      std::memcpy(dK + ((t.s0 + j) * d.K + t.kh) * d.Dh, gk + j * d.Dp, sizeof(float) * d.Dh);
      std::memcpy(dV + ((t.s0 + j) * d.K + t.kh) * d.Dh, gv + j * d.Dp, sizeof(float) * d.Dh);
    }
  });
  return ffi::Error::Success();
}

// SwiGLU, silu(g) * u = g * sigmoid(g) * u, elementwise over any shape, and its backward pass (XLA's CPU code for the
// sigmoid runs at about a quarter of this speed): chunks of kChunk elements shared over the threads.
constexpr long kChunk = 1 << 15;

inline __m256 sigmoid_ps(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

ffi::Error swiglu_forward(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> y) {
  if (g.element_type() != ffi::F32 || u.element_type() != ffi::F32 || g.element_count() != u.element_count())
    return ffi::Error::InvalidArgument("swiglu: g and u must be float32 arrays of one shape");
  const float *G = g.typed_data<float>(), *U = u.typed_data<float>();
  float* Y = y->typed_data<float>();
  const long n = g.element_count();
  parallel_for(pool, (n + kChunk - 1) / kChunk, [&](long c) {
    const long a = c * kChunk, b = std::min(n, a + kChunk);
    long i = a;
    for (; i + 8 <= b; i += 8) {
      const __m256 gv = _mm256_loadu_ps(G + i);
      _mm256_storeu_ps(Y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid_ps(gv)), _mm256_loadu_ps(U + i)));
    }
    for (; i < b; ++i) Y[i] = G[i] * sigmoid(G[i]) * U[i];
  });
  return ffi::Error::Success();
}

// dg = dy * u * s * (1 + g * (1 - s)), du = dy * g * s, s = sigmoid(g).
ffi::Error swiglu_backward(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dg, ffi::Result<ffi::AnyBuffer> du) {
  if (g.element_type() != ffi::F32 || u.element_type() != ffi::F32 || dy.element_type() != ffi::F32 ||
      g.element_count() != u.element_count() || g.element_count() != dy.element_count())
    return ffi::Error::InvalidArgument("swiglu: g, u and dy must be float32 arrays of one shape");
  const float *G = g.typed_data<float>(), *U = u.typed_data<float>(), *DY = dy.typed_data<float>();
  float *DG = dg->typed_data<float>(), *DU = du->typed_data<float>();
  const long n = g.element_count();
  parallel_for(pool, (n + kChunk - 1) / kChunk, [&](long c) {
    const long a = c * kChunk, b = std::min(n, a + kChunk);
    const __m256 one = _mm256_set1_ps(1.0f);
    long i = a;
    for (; i + 8 <= b; i += 8) {
      const __m256 gv = _mm256_loadu_ps(G + i), s = sigmoid_ps(gv), d = _mm256_loadu_ps(DY + i);
      const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
      _mm256_storeu_ps(DG + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(U + i)), ds));
      _mm256_storeu_ps(DU + i, _mm256_mul_ps(d, _mm256_mul_ps(gv, s)));
    }
    for (; i < b; ++i) {
      const float s = sigmoid(G[i]);
      DG[i] = DY[i] * U[i] * s * (1 + G[i] * (1 - s));
      DU[i] = DY[i] * G[i] * s;
    }
  });
  return ffi::Error::Success();
}

// The transpose of a float32 matrix [R, C] -> [C, R] (a training step's weight gradients x^T g need one of every
// layer input, and XLA's CPU transposes of these sizes run at a few GB/s): 8 x 8 tiles through AVX2 registers,
// bands of 64 output rows shared over the threads.
inline void transpose8(const float* in, long ldi, float* out, long ldo) {
  __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ldi), r2 = _mm256_loadu_ps(in + 2 * ldi), r3 = _mm256_loadu_ps(in + 3 * ldi);
  __m256 r4 = _mm256_loadu_ps(in + 4 * ldi), r5 = _mm256_loadu_ps(in + 5 * ldi), r6 = _mm256_loadu_ps(in + 6 * ldi), r7 = _mm256_loadu_ps(in + 7 * ldi);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5), t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE), u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(out + ldo, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(out + 2 * ldo, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(out + 3 * ldo, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(out + 4 * ldo, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(out + 5 * ldo, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(out + 6 * ldo, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(out + 7 * ldo, _mm256_permute2f128_ps(u3, u7, 0x31));
}

ffi::Error transpose(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  auto dims = x.dimensions();
  if (x.element_type() != ffi::F32 || dims.size() != 2) return ffi::Error::InvalidArgument("transpose: expected a float32 matrix");
  const long R = dims[0], C = dims[1], band = 64;
  const float* X = x.typed_data<float>();
  float* Y = y->typed_data<float>();
  parallel_for(pool, (C + band - 1) / band, [&](long bi) {  // output rows [c0, c1) = input columns
    const long c0 = bi * band, c1 = std::min(C, c0 + band);
    for (long r = 0; r < R; r += 8)
      for (long c = c0; c < c1; c += 8) {
        if (r + 8 <= R && c + 8 <= c1) transpose8(X + r * C + c, C, Y + c * R + r, R);
        else
          for (long i = r; i < std::min(R, r + 8); ++i)
            for (long j = c; j < std::min(c1, c + 8); ++j) Y[j * R + i] = X[i * C + j];
      }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int synehr_cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// Bindings: XLA's thread pool, the buffer arguments (and attributes), then the buffer results.
#define SYNEHR_POOL ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
#define SYNEHR_ARG .Arg<ffi::AnyBuffer>()
#define SYNEHR_RET .Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(synehr_attention_fwd, forward,
                              SYNEHR_POOL SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG .Attr<float>("rate") SYNEHR_RET SYNEHR_RET);
XLA_FFI_DEFINE_HANDLER_SYMBOL(synehr_attention_bwd, backward,
                              SYNEHR_POOL SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG
                              .Attr<float>("rate") SYNEHR_RET SYNEHR_RET SYNEHR_RET);
XLA_FFI_DEFINE_HANDLER_SYMBOL(synehr_swiglu_fwd, swiglu_forward, SYNEHR_POOL SYNEHR_ARG SYNEHR_ARG SYNEHR_RET);
XLA_FFI_DEFINE_HANDLER_SYMBOL(synehr_swiglu_bwd, swiglu_backward, SYNEHR_POOL SYNEHR_ARG SYNEHR_ARG SYNEHR_ARG SYNEHR_RET SYNEHR_RET);
XLA_FFI_DEFINE_HANDLER_SYMBOL(synehr_transpose, transpose, SYNEHR_POOL SYNEHR_ARG SYNEHR_RET);
