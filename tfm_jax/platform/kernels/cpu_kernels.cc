// Native CPU kernels for tfm_jax (XLA FFI custom calls), fp32:
//
//  * tfm_gemm      C = op(A) op(B) through the BLAS's cblas_sgemm (single-threaded inside the
//                  call; rows split over XLA's intra-op thread pool), so the weight-gradient GEMMs
//                  contract the token axis without a materialised transpose.
//  * tfm_attn_fwd  causal GQA attention, query blocks x all keys up to the block end, exact
//    tfm_attn_bwd  softmax per block (same blocks and masking as layers/attention.py's XLA
//                  path), the G query heads of one kv head in one GEMM per block; forward saves
//                  the row max and row sum, backward recomputes the probabilities
//                  (FlashAttention's recipe) and owns dK/dV per (batch, kv head).
//  * tfm_swiglu_*  silu(g) * u and its VJP, one pass each.
//  * tfm_rms_*     RMSNorm over the last axis and its VJP (dscale as per-chunk partial sums).
//
// Layouts are the model's own: q (B, T, H, D), k/v (B, T, Hkv, D), k_valid (B, T) as 1/0
// floats; the attention gathers a group's query rows into a contiguous tile and reads K/V as
// strided GEMM operands (ld = heads * D), so nothing is transposed.
// The library links no BLAS: cpu.py loads one at run time (OpenBLAS, MKL, ...) and hands its
// cblas_sgemm over with tfm_set_sgemm(fn, ilp64), so one build serves every BLAS. Until that is
// done every handler returns an error instead of calling a null pointer.
// Built and loaded by tfm_jax/kernels/cpu.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
// cblas_sgemm with 32-bit (LP64) or 64-bit (ILP64) integer arguments; the enums stay int.
using SgemmLP64 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t,
                           const float*, int32_t, float, float*, int32_t);
using SgemmILP64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*,
                            int64_t, const float*, int64_t, float, float*, int64_t);
static std::atomic<void*> g_sgemm{nullptr};
static std::atomic<bool> g_ilp64{false};

// Installs the BLAS (called by cpu.py before any kernel runs, and again to switch BLAS between
// calls, e.g. by benchmarks/blas_compare.py; never while a kernel is running).
extern "C" int tfm_set_sgemm(void* fn, int ilp64) {
  g_ilp64.store(ilp64 != 0);
  g_sgemm.store(fn);
  return fn != nullptr;
}

static inline void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k,
                               float alpha, const float* a, int lda, const float* b, int ldb,
                               float beta, float* c, int ldc) {
  void* fn = g_sgemm.load(std::memory_order_relaxed);
  if (g_ilp64.load(std::memory_order_relaxed))
    reinterpret_cast<SgemmILP64>(fn)(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta,
                                     c, ldc);
  else
    reinterpret_cast<SgemmLP64>(fn)(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c,
                                    ldc);
}

static inline bool NoBlas() { return g_sgemm.load() == nullptr; }
static ffi::Error NoBlasError() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "tfm_jax CPU kernels: no BLAS installed (tfm_set_sgemm was not called)");
}

static const int kRow = 101, kN = 111, kT = 112;
static const float kNegInf = -1e30f;

// exp(x) for x <= ~88, written so that GCC vectorises loops over it (no libm call): 2^n * p(f)
// with n = round(x / ln2), f = x - n ln2 (Cody-Waite), p a degree-6 polynomial (rel. error
// ~2e-7, like expf). x < -87.3 (including the -1e30 mask value) gives exactly 0.
static inline float fast_exp(float x) {
  float xc = std::min(std::max(x, -87.3f), 88.0f);   // NaN stays NaN
  float n = std::nearbyint(xc * 1.44269504088896341f);
  float f = xc - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// Runs fn(i) for i in [0, n) on the calling thread and the XLA intra-op pool. Tasks are claimed
// from an atomic counter, so the caller never blocks on a task that has not started.
static void ParallelFor(ffi::ThreadPool& pool, int n, std::function<void(int)> fn) {
  struct State {
    std::atomic<int> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto f = std::make_shared<std::function<void(int)>>(std::move(fn));
  auto work = [st, f, n]() {
    int i;
    while ((i = st->next.fetch_add(1)) < n) {
      (*f)(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> l(st->mu);
        st->cv.notify_all();
      }
    }
  };
  int helpers = std::min<int>(n - 1, (int)pool.num_threads());
  for (int i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> l(st->mu);
  st->cv.wait(l, [&] { return st->done.load() == n; });
}

struct Dims {
  int B, T, H, K, D, G;
};

// One query block of one GQA group: the G query heads that share kv head kh, rows ordered
// (g, t) so that every GEMM of the block covers the whole group (M = G * rows).
struct Block {
  int t0, rows, end, M;
};

// Copies rows [t0, t0 + rows) of the group's G heads of x (B, T, H, D) into dst (M, D).
static void Gather(const float* x, const Dims& d, int b, int kh, const Block& blk, float* dst) {
  for (int g = 0; g < d.G; ++g)
    for (int i = 0; i < blk.rows; ++i)
      std::memcpy(dst + ((int64_t)g * blk.rows + i) * d.D,
                  x + ((int64_t)b * d.T + blk.t0 + i) * d.H * d.D + (int64_t)(kh * d.G + g) * d.D,
                  sizeof(float) * d.D);
}

// S (M, end) = scale * Qs K[:end]^T with masked entries set to -1e30 (finite, as in the XLA
// path): key > query, or the key's segment kseg[j] differs from the query's qseg[t] (a padded
// key has segment -1; without packed documents every query and valid key has segment 1).
static void Scores(const float* Qs, const float* kb, const float* kseg, const float* qseg,
                   const Dims& d, const Block& blk, float scale, float* S) {
  cblas_sgemm(kRow, kN, kT, blk.M, blk.end, d.D, scale, Qs, d.D, kb, d.K * d.D, 0.f, S, blk.end);
  for (int r = 0; r < blk.M; ++r) {
    float* s = S + (int64_t)r * blk.end;
    int t = blk.t0 + r % blk.rows;
    for (int j = 0; j < blk.end; ++j)
      if (j > t || kseg[j] != qseg[t]) s[j] = kNegInf;
  }
}

static ffi::Error AttnFwd(ffi::ThreadPool pool, F32 q, F32 k,
                          F32 v, F32 kvalid, F32 qsegs,
                          F32Out o, F32Out stats,
                          int64_t block) {
  if (NoBlas()) return NoBlasError();
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{(int)qd[0], (int)qd[1], (int)qd[2], (int)kd[2], (int)qd[3], (int)(qd[2] / kd[2])};
  float scale = 1.0f / std::sqrt((float)d.D);
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(),
              *KV = kvalid.typed_data(), *QS = qsegs.typed_data();
  float *O = o->typed_data(), *L = stats->typed_data();
  int64_t bht = (int64_t)d.B * d.H * d.T;
  int nb = (d.T + block - 1) / block, ldk = d.K * d.D;
  // One task per (batch, kv head); stats = (row max, row sum) of each query row.
  ParallelFor(pool, d.B * d.K, [&](int task) {
    int b = task / d.K, kh = task % d.K;
    const float* kb = Kp + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    const float* vb = V + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    std::vector<float> S((size_t)d.G * block * d.T), Qs((size_t)d.G * block * d.D),
        Os((size_t)d.G * block * d.D);
    for (int bi = 0; bi < nb; ++bi) {
      int t0 = bi * block, rows = std::min<int>(d.T, t0 + block) - t0;
      Block blk{t0, rows, t0 + rows, d.G * rows};
      Gather(Q, d, b, kh, blk, Qs.data());
      Scores(Qs.data(), kb, KV + (int64_t)b * d.T, QS + (int64_t)b * d.T, d, blk, scale,
             S.data());
      std::vector<float> inv(blk.M);
      for (int r = 0; r < blk.M; ++r) {
        float* s = S.data() + (int64_t)r * blk.end;
        float m = kNegInf, l = 0.f;
        for (int j = 0; j < blk.end; ++j) m = std::max(m, s[j]);
        for (int j = 0; j < blk.end; ++j) {
          s[j] = fast_exp(s[j] - m);
          l += s[j];
        }
        inv[r] = 1.f / l;
        int g = r / rows, i = r % rows;
        int64_t li = ((int64_t)b * d.H + kh * d.G + g) * d.T + t0 + i;
        L[li] = m;
        L[li + bht] = l;
      }
      // Unnormalised P V, then each output row scaled by 1 / l (D values instead of end).
      cblas_sgemm(kRow, kN, kN, blk.M, d.D, blk.end, 1.f, S.data(), blk.end, vb, ldk, 0.f,
                  Os.data(), d.D);
      for (int r = 0; r < blk.M; ++r) {
        int g = r / rows, i = r % rows;
        float* dst = O + ((int64_t)b * d.T + t0 + i) * d.H * d.D + (int64_t)(kh * d.G + g) * d.D;
        const float* src = Os.data() + (int64_t)r * d.D;
        for (int c = 0; c < d.D; ++c) dst[c] = src[c] * inv[r];
      }
    }
  });
  return ffi::Error::Success();
}

static ffi::Error AttnBwd(ffi::ThreadPool pool, F32 q, F32 k,
                          F32 v, F32 kvalid, F32 qsegs,
                          F32 o, F32 stats,
                          F32 dout, F32Out dq,
                          F32Out dk, F32Out dv,
                          int64_t block) {
  if (NoBlas()) return NoBlasError();
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{(int)qd[0], (int)qd[1], (int)qd[2], (int)kd[2], (int)qd[3], (int)(qd[2] / kd[2])};
  float scale = 1.0f / std::sqrt((float)d.D);
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(),
              *KV = kvalid.typed_data(), *QS = qsegs.typed_data(), *O = o.typed_data(),
              *L = stats.typed_data(), *DO = dout.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  int64_t bht = (int64_t)d.B * d.H * d.T;
  int nb = (d.T + block - 1) / block, ldk = d.K * d.D;
  // One task per (batch, kv head): it owns dK/dV of that head (no races).
  ParallelFor(pool, d.B * d.K, [&](int task) {
    int b = task / d.K, kh = task % d.K;
    float* dkb = DK + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    float* dvb = DV + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    for (int t = 0; t < d.T; ++t) {
      std::memset(dkb + (int64_t)t * ldk, 0, sizeof(float) * d.D);
      std::memset(dvb + (int64_t)t * ldk, 0, sizeof(float) * d.D);
    }
    const float* kb = Kp + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    const float* vb = V + (int64_t)b * d.T * ldk + (int64_t)kh * d.D;
    size_t tile = (size_t)d.G * block * d.T, rowbuf = (size_t)d.G * block * d.D;
    std::vector<float> S(tile), dP(tile), Qs(rowbuf), Os(rowbuf), dOs(rowbuf), dQs(rowbuf);
    std::vector<float> delta(d.G * block);
    for (int bi = 0; bi < nb; ++bi) {
      int t0 = bi * block, rows = std::min<int>(d.T, t0 + block) - t0;
      Block blk{t0, rows, t0 + rows, d.G * rows};
      Gather(Q, d, b, kh, blk, Qs.data());
      Gather(O, d, b, kh, blk, Os.data());
      Gather(DO, d, b, kh, blk, dOs.data());
      Scores(Qs.data(), kb, KV + (int64_t)b * d.T, QS + (int64_t)b * d.T, d, blk, scale,
             S.data());
      for (int r = 0; r < blk.M; ++r) {
        int g = r / rows, i = r % rows;
        int64_t li = ((int64_t)b * d.H + kh * d.G + g) * d.T + t0 + i;
        float m = L[li], inv = 1.f / L[li + bht];
        float* s = S.data() + (int64_t)r * blk.end;
        for (int j = 0; j < blk.end; ++j) s[j] = fast_exp(s[j] - m) * inv;   // P
        const float *oi = Os.data() + (int64_t)r * d.D, *doi = dOs.data() + (int64_t)r * d.D;
        float acc = 0.f;
        for (int c = 0; c < d.D; ++c) acc += oi[c] * doi[c];
        delta[r] = acc;                                                       // rowsum(dO * O)
      }
      // dV[:end] += P^T dO ; dP = dO V^T
      cblas_sgemm(kRow, kT, kN, blk.end, d.D, blk.M, 1.f, S.data(), blk.end, dOs.data(), d.D,
                  1.f, dvb, ldk);
      cblas_sgemm(kRow, kN, kT, blk.M, blk.end, d.D, 1.f, dOs.data(), d.D, vb, ldk, 0.f,
                  dP.data(), blk.end);
      for (int r = 0; r < blk.M; ++r) {
        float* s = S.data() + (int64_t)r * blk.end;
        const float* dp = dP.data() + (int64_t)r * blk.end;
        float dl = delta[r];
        for (int j = 0; j < blk.end; ++j) s[j] = s[j] * (dp[j] - dl) * scale;   // dS * scale
      }
      // dQ = dS K ; dK[:end] += dS^T Q
      cblas_sgemm(kRow, kN, kN, blk.M, d.D, blk.end, 1.f, S.data(), blk.end, kb, ldk, 0.f,
                  dQs.data(), d.D);
      cblas_sgemm(kRow, kT, kN, blk.end, d.D, blk.M, 1.f, S.data(), blk.end, Qs.data(), d.D,
                  1.f, dkb, ldk);
      for (int r = 0; r < blk.M; ++r) {
        int g = r / rows, i = r % rows;
        std::memcpy(DQ + ((int64_t)b * d.T + t0 + i) * d.H * d.D + (int64_t)(kh * d.G + g) * d.D,
                    dQs.data() + (int64_t)r * d.D, sizeof(float) * d.D);
      }
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_attn_fwd, AttnFwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()
        .Attr<int64_t>("block"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_attn_bwd, AttnBwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
        .Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Attr<int64_t>("block"));

// Column chunk of tfm_gemm with fewer than 32 rows (a multiple of 64: whole BLAS tiles).
static constexpr int kGemvCols = 128;

// C (m, n) = op(A) @ op(B); A stored (m, k), or (k, m) if ta; B stored (k, n), or (n, k) if tb.
static ffi::Error Gemm(ffi::ThreadPool pool, F32 a, F32 b,
                       F32Out c, bool ta, bool tb) {
  if (NoBlas()) return NoBlasError();
  auto ad = a.dimensions(), bd = b.dimensions();
  int m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1], n = tb ? bd[0] : bd[1];
  int lda = ad[1], ldb = bd[1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  // One row chunk per pool thread (more chunks measured 1-4 % slower in the full step), each a
  // multiple of 64 rows: the BLAS then sees the same row tiling and tail whatever the pool size,
  // so every output row is computed the same way (OpenBLAS rounds rows in a tail tile
  // differently; bitwise resume across processes with other pool sizes relies on this).
  if (m < 32 && n > kGemvCols && pool.num_threads() > 1) {
    // Few rows (KV-cache decode: one per sequence): split the columns instead, in fixed
    // chunks of kGemvCols, so both the work and the result are independent of the pool size.
    int parts = (n + kGemvCols - 1) / kGemvCols;
    ParallelFor(pool, parts, [=](int i) {
      int c0 = i * kGemvCols, c1 = std::min(n, c0 + kGemvCols);
      const float* Bp = tb ? B + (int64_t)c0 * ldb : B + c0;
      cblas_sgemm(kRow, ta ? kT : kN, tb ? kT : kN, m, c1 - c0, k, 1.0f, A, lda, Bp, ldb, 0.0f,
                  C + c0, n);
    });
    return ffi::Error::Success();
  }
  int parts = std::max<int>(1, std::min<int>((int)pool.num_threads(), m / 32));
  int chunk = ((m + parts - 1) / parts + 63) / 64 * 64;
  parts = (m + chunk - 1) / chunk;
  auto rows = [=](int i) {
    int r0 = i * chunk, r1 = std::min(m, r0 + chunk);
    if (r1 <= r0) return;
    const float* Ap = ta ? A + r0 : A + (int64_t)r0 * lda;
    cblas_sgemm(kRow, ta ? kT : kN, tb ? kT : kN, r1 - r0, n, k, 1.0f, Ap, lda, B, ldb, 0.0f,
                C + (int64_t)r0 * n, n);
  };
  if (parts == 1) {
    rows(0);
  } else {
    ParallelFor(pool, parts, rows);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_gemm, Gemm,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Ret<F32>().Attr<bool>("ta").Attr<bool>("tb"));

// SwiGLU elementwise, h = silu(g) * u with silu(g) = g * sigmoid(g), and its VJP
//   du = dh * g * s,  dg = dh * u * s * (1 + g * (1 - s)),  s = sigmoid(g),
// in one pass each, split over the pool (XLA materialised sigmoid(g) as a separate pass).
static int64_t NumElements(F32& x) {
  int64_t n = 1;
  for (auto dim : x.dimensions()) n *= dim;
  return n;
}

static inline float Sigmoid(float g) { return 1.0f / (1.0f + fast_exp(-g)); }

static void Elementwise(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t, int64_t)> f) {
  const int64_t kChunk = 1 << 16;
  int parts = (int)std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  ParallelFor(pool, parts, [&](int i) { f(i * kChunk, std::min(n, (i + 1) * kChunk)); });
}

static ffi::Error SwigluFwd(ffi::ThreadPool pool, F32 g, F32 u,
                            F32Out h) {
  const float *G = g.typed_data(), *U = u.typed_data();
  float* H = h->typed_data();
  Elementwise(pool, NumElements(g), [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) H[i] = G[i] * Sigmoid(G[i]) * U[i];
  });
  return ffi::Error::Success();
}

static ffi::Error SwigluBwd(ffi::ThreadPool pool, F32 g, F32 u,
                            F32 dh, F32Out dg,
                            F32Out du) {
  const float *G = g.typed_data(), *U = u.typed_data(), *DH = dh.typed_data();
  float *DG = dg->typed_data(), *DU = du->typed_data();
  Elementwise(pool, NumElements(g), [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      float x = G[i], sg = Sigmoid(x), d = DH[i];
      DU[i] = d * x * sg;
      DG[i] = d * U[i] * sg * (1.0f + x * (1.0f - sg));
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_swiglu_fwd, SwigluFwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_swiglu_bwd, SwigluBwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());

// RMSNorm over the last axis: y = x * rstd * scale, rstd = 1 / sqrt(mean(x^2) + eps); x (N, d).
// Backward: dx = rstd * (dy * scale - xhat * mean(dy * scale * xhat)), xhat = x * rstd;
// dscale as per-chunk partial sums (P, d), summed by the caller (no atomics).
static ffi::Error RmsFwd(ffi::ThreadPool pool, F32 x, F32 scale,
                         F32Out y, float eps) {
  auto xd = x.dimensions();
  int64_t n = xd[0], d = xd[1];
  const float *X = x.typed_data(), *W = scale.typed_data();
  float* Y = y->typed_data();
  int parts = (int)std::max<int64_t>(1, std::min<int64_t>(n / 64, 64));
  int64_t chunk = (n + parts - 1) / parts;
  ParallelFor(pool, parts, [=](int c) {
    for (int64_t r = c * chunk; r < std::min(n, (c + 1) * chunk); ++r) {
      const float* xr = X + r * d;
      float ss = 0.f;
      for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
      float rstd = 1.0f / std::sqrt(ss / d + eps);
      float* yr = Y + r * d;
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * rstd * W[j];
    }
  });
  return ffi::Error::Success();
}

static ffi::Error RmsBwd(ffi::ThreadPool pool, F32 x, F32 scale,
                         F32 dy, F32Out dx,
                         F32Out dscale_parts, float eps) {
  auto xd = x.dimensions();
  int64_t n = xd[0], d = xd[1];
  int parts = (int)dscale_parts->dimensions()[0];
  const float *X = x.typed_data(), *W = scale.typed_data(), *DY = dy.typed_data();
  float *DX = dx->typed_data(), *DW = dscale_parts->typed_data();
  int64_t chunk = (n + parts - 1) / parts;
  ParallelFor(pool, parts, [=](int c) {
    float* dw = DW + (int64_t)c * d;
    for (int64_t j = 0; j < d; ++j) dw[j] = 0.f;
    for (int64_t r = c * chunk; r < std::min(n, (c + 1) * chunk); ++r) {
      const float *xr = X + r * d, *dyr = DY + r * d;
      float ss = 0.f;
      for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
      float rstd = 1.0f / std::sqrt(ss / d + eps);
      float dot = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        float xh = xr[j] * rstd;
        dot += dyr[j] * W[j] * xh;
        dw[j] += dyr[j] * xh;
      }
      float m = dot / d;
      float* dxr = DX + r * d;
      for (int64_t j = 0; j < d; ++j) dxr[j] = rstd * (dyr[j] * W[j] - xr[j] * rstd * m);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_rms_fwd, RmsFwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Ret<F32>().Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_rms_bwd, RmsBwd,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>().Attr<float>("eps"));

// KV-cache decode attention: new queries q (B, T, H, D) at absolute positions pos (B, T) against
// the cache k/v (B, S, Hkv, D); query t of row b sees slots s <= pos[b, t] and nothing beyond, so
// a row reads only its filled part of the cache (the XLA path reads and masks all S slots). One
// task per (batch, kv head): its G*T queries (the G heads sharing the kv head, rows i = t*G + g)
// take the cache in chunks of kDecodeChunk slots, two GEMMs per chunk (scores = Q K^T, reading K
// in place with ld = Hkv*D; then P V), with an online softmax between chunks (running max and
// sum, as in FlashAttention), so no (T, S) score matrix is formed whatever T is.
static const int kDecodeChunk = 512;

static ffi::Error DecodeAttn(ffi::ThreadPool pool, F32 q, F32 k, F32 v,
                             ffi::Buffer<ffi::S32> pos, F32Out o) {
  if (NoBlas()) return NoBlasError();
  auto qd = q.dimensions(), kd = k.dimensions();
  const int B = (int)qd[0], T = (int)qd[1], H = (int)qd[2], D = (int)qd[3];
  const int S = (int)kd[1], K = (int)kd[2], G = H / K, nq = G * T;
  const int ldk = K * D;
  const float scale = 1.0f / std::sqrt((float)D);
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data();
  const int32_t* P = pos.typed_data();
  float* O = o->typed_data();
  ParallelFor(pool, B * K, [&](int task) {
    const int b = task / K, kh = task % K;
    std::vector<float> Qs((size_t)nq * D), acc((size_t)nq * D, 0.f), pv((size_t)nq * D),
        m(nq, kNegInf), l(nq, 0.f), s((size_t)nq * kDecodeChunk);
    std::vector<int> last(nq);
    int end = 0;
    for (int t = 0; t < T; ++t) {
      const int p = std::min(P[(int64_t)b * T + t], S - 1);
      end = std::max(end, p + 1);
      for (int g = 0; g < G; ++g) {
        const int i = t * G + g;
        last[i] = p;
        std::memcpy(&Qs[(size_t)i * D], Q + (((int64_t)b * T + t) * H + kh * G + g) * D,
                    sizeof(float) * D);
      }
    }
    const float* kb = Kp + (int64_t)b * S * ldk + (int64_t)kh * D;
    const float* vb = V + (int64_t)b * S * ldk + (int64_t)kh * D;
    for (int c0 = 0; c0 < end; c0 += kDecodeChunk) {
      const int n = std::min(kDecodeChunk, end - c0);
      cblas_sgemm(kRow, kN, kT, nq, n, D, scale, Qs.data(), D, kb + (int64_t)c0 * ldk, ldk, 0.f,
                  s.data(), n);
      for (int i = 0; i < nq; ++i) {
        float* si = &s[(size_t)i * n];
        const int vis = std::min(n, last[i] - c0 + 1);      // slots c0 .. last[i] of this chunk
        float mx = m[i];
        for (int j = 0; j < vis; ++j) mx = std::max(mx, si[j]);
        const float corr = fast_exp(m[i] - mx);
        float sum = 0.f;
        for (int j = 0; j < vis; ++j) {
          si[j] = fast_exp(si[j] - mx);
          sum += si[j];
        }
        for (int j = std::max(vis, 0); j < n; ++j) si[j] = 0.f;
        l[i] = l[i] * corr + sum;
        m[i] = mx;
        float* ai = &acc[(size_t)i * D];
        for (int c = 0; c < D; ++c) ai[c] *= corr;
      }
      cblas_sgemm(kRow, kN, kN, nq, D, n, 1.f, s.data(), n, vb + (int64_t)c0 * ldk, ldk, 0.f,
                  pv.data(), D);
      for (size_t x = 0; x < acc.size(); ++x) acc[x] += pv[x];
    }
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < G; ++g) {
        const int i = t * G + g;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        float* dst = O + (((int64_t)b * T + t) * H + kh * G + g) * D;
        for (int c = 0; c < D; ++c) dst[c] = acc[(size_t)i * D + c] * inv;
      }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(tfm_decode_attn, DecodeAttn,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<F32>().Arg<F32>().Arg<F32>().Arg<ffi::Buffer<ffi::S32>>().Ret<F32>());
