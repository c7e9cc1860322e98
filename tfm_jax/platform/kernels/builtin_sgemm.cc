// tfm_builtin_sgemm: the project's own single-threaded fp32 GEMM, with cblas_sgemm's LP64
// signature, so cpu.py can hand it to tfm_set_sgemm like any BLAS (backend.cpu_blas=builtin).
//
//   C (m, n) = alpha op(A) op(B) + beta C,  op(A) (m, k), op(B) (k, n), any ld >= the width.
//
// GotoBLAS/BLIS structure: K is cut into KC-deep blocks; per block op(B) is packed into panels of
// NR columns (k-major, zero-padded) and op(A), MC rows at a time, into panels of MR rows
// (k-major); a register-blocked micro-kernel then keeps an MR x NR tile of C in MR * NR / W
// vector accumulators and, per k, loads NR/W vectors of the B panel and broadcasts MR values of
// the A panel into FMAs. Packing turns every transpose case into the same unit-stride loop. Where
// op(B) has at most two panels (the k/v projections, the attention tiles), op(A) is read in place
// instead: packing it would cost more than the reuse saves.
//
// Determinism: each C element is one FMA chain over its K block's k in ascending order, started
// from 0, then C = alpha * acc + beta * C (first block) or C + alpha * acc (later blocks), and the
// K blocks are a function of K alone (KBlocks). Edge tiles run the same chain (zero padding only
// ever fills lanes that are not stored), so a row's result does not depend on M, N, the row
// chunking of the callers or the ISA variant below (AVX-512 and AVX2 give identical bits).
//
// Compile-time ISA (the library is built with -march=native):
//   AVX-512F: MR = 14, NR = 32 (28 zmm accumulators, 2 B vectors, 1 broadcast)
//   AVX2+FMA: MR = 6,  NR = 16 (12 ymm accumulators, 2 B vectors, 1 broadcast)
//   neither : tfm_builtin_sgemm_isa() returns "" and cpu.py does not offer the builtin.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace tfm_sgemm {

constexpr int kKcMax = 256;   // K block depth: a B micro-panel (KC x NR) stays in L1
// K blocks of equal depth (the last ones one shorter) covering k: a function of k only.
static inline int KBlocks(int k) { return (k + kKcMax - 1) / kKcMax; }
static inline int KBlockStart(int k, int nb, int i) {
  int base = k / nb, extra = k % nb;                 // the first `extra` blocks get base + 1
  return i * base + std::min(i, extra);
}

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
constexpr int W = 16, MR = 14, NR = 32;
using V = __m512;
static inline V Zero() { return _mm512_setzero_ps(); }
static inline V Load(const float* p) { return _mm512_load_ps(p); }
static inline V Bcast(const float* p) { return _mm512_set1_ps(*p); }
static inline V Set1(float x) { return _mm512_set1_ps(x); }
static inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline __mmask16 Mask(int n) { return (__mmask16)((1u << n) - 1u); }
static inline V LoadN(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
static inline void StoreN(float* p, V v, int n) { _mm512_mask_storeu_ps(p, Mask(n), v); }

// In-register transpose of a W x W tile: r[i][j] -> r[j][i].
static inline void Transpose(V r[W]) {
  V t[W], u[W];
  for (int i = 0; i < W; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < W; g += 4) {   // u[g + j], lane L: column 4L + j of rows g..g+3
    __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]),
            t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; ++j) {      // gather lane L of u[j], u[4+j], u[8+j], u[12+j]
    V p = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88),
      q = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    V p2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88),
      q2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(p, p2, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(p, p2, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(q, q2, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(q, q2, 0xDD);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
constexpr int W = 8, MR = 6, NR = 16;
using V = __m256;
static inline V Zero() { return _mm256_setzero_ps(); }
static inline V Load(const float* p) { return _mm256_load_ps(p); }
static inline V Bcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline V Set1(float x) { return _mm256_set1_ps(x); }
static inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline __m256i Mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline V LoadN(const float* p, int n) { return _mm256_maskload_ps(p, Mask(n)); }
static inline void StoreN(float* p, V v, int n) {
  if (n == W) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, Mask(n), v);
}

static inline void Transpose(V r[W]) {
  V t[W], u[W];
  for (int i = 0; i < W; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < W; g += 4) {
    __m256d t0 = _mm256_castps_pd(t[g]), t1 = _mm256_castps_pd(t[g + 1]),
            t2 = _mm256_castps_pd(t[g + 2]), t3 = _mm256_castps_pd(t[g + 3]);
    u[g] = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
    u[g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
    u[g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
    u[g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}
#else
constexpr const char* kIsa = "";
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int MC = MR * 12;    // rows of op(A) packed at a time (an MC x KC block stays in L2)
constexpr int NC = 2048;       // columns of op(B) packed at a time (a multiple of NR)
static_assert(NC % NR == 0 && NR % W == 0, "panel widths");

// Panels of S columns from a row-major source, k-major: panel q holds columns [q S, q S + S) as
// dst[q * rows * S + p * S + j] = src[p * ld + q * S + j] for p < rows, j < S (zero beyond w).
// Row by row over all panels, so the source is read as whole rows (prefetch-friendly).
static void PackRows(const float* src, int64_t ld, int rows, int w, float* dst, int S) {
  int panels = (w + S - 1) / S;
  for (int p = 0; p < rows; ++p) {
    const float* s = src + p * ld;
    float* d = dst + (int64_t)p * S;
    for (int q = 0; q < panels; ++q, d += (int64_t)rows * S)
      for (int j = 0; j < S; j += W) {
        int c = q * S + j;
        StoreN(d + j, c < w ? LoadN(s + c, std::min(std::min(W, S - j), w - c)) : Zero(),
               std::min(W, S - j));
      }
  }
}

// dst[c * S + r] = src[r * ld + c] for r < rows, c < cols; zero for rows <= r < S. A transpose
// in W x W register tiles.
static void PackCols(const float* src, int64_t ld, int rows, int cols, float* dst, int S) {
  V t[W];
  for (int r0 = 0; r0 < S; r0 += W) {
    int lanes = std::min(W, S - r0);
    for (int c0 = 0; c0 < cols; c0 += W) {
      int cw = std::min(W, cols - c0);
      for (int i = 0; i < W; ++i)
        t[i] = r0 + i < rows ? LoadN(src + (r0 + i) * ld + c0, cw) : Zero();
      Transpose(t);
      for (int c = 0; c < cw; ++c) StoreN(dst + (int64_t)(c0 + c) * S + r0, t[c], lanes);
    }
  }
}

// The micro-kernel: C[0:R, 0:nv] (ldc) from A and a packed B panel (kc x NR, k-major); NV =
// vectors of B used (NV * W >= nv). A element (i, p) is at a[p * as + i] (kRowsA false: a packed
// panel, as = MR, or a transposed A read in place, as = lda) or at a[i * as + p] (kRowsA true: a
// row-major A read in place). first: apply beta, else add.
template <int R, int NV, bool kRowsA>
static void Tile(int kc, const float* __restrict a, int64_t as, const float* __restrict b,
                 float* c, int64_t ldc, int nv, float alpha, float beta, bool first) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Zero();
  float* cr = c;
  for (int i = 0; i < R; ++i, cr += ldc)      // the tile's C lines, needed by the epilogue
    for (int v = 0; v < NV * W; v += 16) _mm_prefetch((const char*)(cr + v), _MM_HINT_T0);
  for (int p = 0; p < kc; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + p * NR + v * W);
    for (int i = 0; i < R; ++i) {
      V ai = Bcast(kRowsA ? a + i * as + p : a + p * as + i);
      for (int v = 0; v < NV; ++v) acc[i][v] = Fma(ai, bv[v], acc[i][v]);
    }
  }
  // Epilogue, fully unrolled so that the accumulators never leave the registers; one C pointer
  // walks the rows.
  int lanes[NV];
  for (int v = 0; v < NV; ++v) lanes[v] = std::max(0, std::min(W, nv - v * W));
  V va = Set1(alpha), vb = Set1(beta);
  cr = c;
  if (first && beta == 0.f && alpha == 1.f) {                   // C = acc, C is not read
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i, cr += ldc)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) StoreN(cr + v * W, acc[i][v], lanes[v]);
  } else if (first && beta == 0.f) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i, cr += ldc)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) StoreN(cr + v * W, Mul(va, acc[i][v]), lanes[v]);
  } else if (first) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i, cr += ldc)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        StoreN(cr + v * W, Fma(va, acc[i][v], Mul(vb, LoadN(cr + v * W, lanes[v]))), lanes[v]);
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i, cr += ldc)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        StoreN(cr + v * W, Fma(va, acc[i][v], LoadN(cr + v * W, lanes[v])), lanes[v]);
  }
}

using TileFn = void (*)(int, const float*, int64_t, const float*, float*, int64_t, int, float,
                       float, bool);

template <int... Rs>
struct Tiles {   // [rows A is read in place][NV == NR / W][R - 1]
  static constexpr TileFn fn[2][2][sizeof...(Rs)] = {
      {{&Tile<Rs + 1, 1, false>...}, {&Tile<Rs + 1, NR / W, false>...}},
      {{&Tile<Rs + 1, 1, true>...}, {&Tile<Rs + 1, NR / W, true>...}}};
};
template <int N, int... Rs>
struct MakeTiles : MakeTiles<N - 1, N - 1, Rs...> {};
template <int... Rs>
struct MakeTiles<0, Rs...> {
  using type = Tiles<Rs...>;
};
using TileTable = MakeTiles<MR>::type;   // [R - 1]: the kernel for an R-row tile

// Grow-only, 64-byte aligned, per thread (XLA's pool threads live as long as the process).
struct Buffer {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      p = static_cast<float*>(std::aligned_alloc(64, (want * sizeof(float) + 63) / 64 * 64));
      n = p ? want : 0;
    }
    return p;
  }
  ~Buffer() { std::free(p); }
};

static void Blocked(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc) {
  static thread_local Buffer abuf, bbuf;
  int nkb = KBlocks(k);
  float* Ap = abuf.get((size_t)MC * kKcMax);
  float* Bp = bbuf.get((size_t)kKcMax * std::min(NC, (n + NR - 1) / NR * NR));
  if (!Ap || !Bp) {
    std::fprintf(stderr, "tfm_builtin_sgemm: out of memory for the packing buffers\n");
    std::abort();
  }
  for (int jc = 0; jc < n; jc += NC) {
    int nc = std::min(NC, n - jc);
    // At most two panels of B: each element of op(A) is used at most twice, so op(A) is read in
    // place rather than packed (a transposed A as the tile's k-major rows, a row-major A row by
    // row); measured faster for the k/v projections and the attention tiles.
    bool inplace = nc <= 2 * NR;
    for (int kb = 0; kb < nkb; ++kb) {
      int pc = KBlockStart(k, nkb, kb), kc = KBlockStart(k, nkb, kb + 1) - pc;
      bool first = kb == 0;
      // op(B)[pc:pc+kc, jc:jc+nc] -> panels of NR columns, each kc x NR
      if (!tb) PackRows(B + (int64_t)pc * ldb + jc, ldb, kc, nc, Bp, NR);
      else
        for (int j0 = 0; j0 < nc; j0 += NR)
          PackCols(B + (int64_t)(jc + j0) * ldb + pc, ldb, std::min(NR, nc - j0), kc,
                   Bp + (int64_t)j0 * kc, NR);
      if (inplace) {
        for (int i0 = 0; i0 < m; i0 += MR) {
          const float* ap = ta ? A + (int64_t)pc * lda + i0 : A + (int64_t)i0 * lda + pc;
          for (int j0 = 0; j0 < nc; j0 += NR) {
            int w = std::min(NR, nc - j0);
            TileTable::fn[!ta][w > W][std::min(MR, m - i0) - 1](
                kc, ap, lda, Bp + (int64_t)j0 * kc, C + (int64_t)i0 * ldc + jc + j0, ldc, w,
                alpha, beta, first);
          }
        }
        continue;
      }
      for (int ic = 0; ic < m; ic += MC) {
        int mc = std::min(MC, m - ic);
        // op(A)[ic:ic+mc, pc:pc+kc] -> panels of MR rows, each kc x MR
        if (ta) PackRows(A + (int64_t)pc * lda + ic, lda, kc, mc, Ap, MR);
        else
          for (int i0 = 0; i0 < mc; i0 += MR)
            PackCols(A + (int64_t)(ic + i0) * lda + pc, lda, std::min(MR, mc - i0), kc,
                     Ap + (int64_t)i0 * kc, MR);
        // B panel outer (it stays in L1), A panels inner (from the L2-resident packed block)
        for (int j0 = 0; j0 < nc; j0 += NR) {
          int w = std::min(NR, nc - j0);
          const TileFn* table = TileTable::fn[0][w > W];
          const float* bp = Bp + (int64_t)j0 * kc;
          for (int i0 = 0; i0 < mc; i0 += MR)
            table[std::min(MR, mc - i0) - 1](kc, Ap + (int64_t)i0 * kc, MR, bp,
                                             C + (int64_t)(ic + i0) * ldc + jc + j0, ldc, w,
                                             alpha, beta, first);
        }
      }
    }
  }
}
#endif

}  // namespace tfm_sgemm

// "avx512", "avx2", or "" where this build has no builtin sgemm (cpu.py then does not offer it).
extern "C" const char* tfm_builtin_sgemm_isa() { return tfm_sgemm::kIsa; }

// out[0..4] = MR, NR, KC (max K block), MC, NC; all 0 without a builtin sgemm.
extern "C" void tfm_builtin_sgemm_blocking(int* out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  int v[5] = {tfm_sgemm::MR, tfm_sgemm::NR, tfm_sgemm::kKcMax, tfm_sgemm::MC, tfm_sgemm::NC};
#else
  int v[5] = {0, 0, 0, 0, 0};
#endif
  std::memcpy(out, v, sizeof(v));
}

// cblas_sgemm (LP64). Column-major calls are the row-major product of the transposes (C^T =
// op(B)^T op(A)^T). Bad arguments are reported on stderr, like a BLAS's xerbla, and C is left
// untouched.
extern "C" void tfm_builtin_sgemm(int layout, int transa, int transb, int m, int n, int k,
                                  float alpha, const float* A, int lda, const float* B, int ldb,
                                  float beta, float* C, int ldc) {
  if (layout == 102)
    return tfm_builtin_sgemm(101, transb, transa, n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  auto trans_ok = [](int t) { return t == 111 || t == 112 || t == 113; };
  bool ta = transa != 111, tb = transb != 111;
  int bad = layout != 101 ? 1 : !trans_ok(transa) ? 2 : !trans_ok(transb) ? 3 : m < 0 ? 4
            : n < 0 ? 5 : k < 0 ? 6 : lda < std::max(1, ta ? m : k) ? 9
            : ldb < std::max(1, tb ? k : n) ? 11 : ldc < std::max(1, n) ? 14 : 0;
  if (bad) {
    std::fprintf(stderr, "tfm_builtin_sgemm: parameter %d had an illegal value (layout %d, "
                 "trans %d/%d, m %d n %d k %d, lda %d ldb %d ldc %d); C left unchanged\n",
                 bad, layout, transa, transb, m, n, k, lda, ldb, ldc);
    return;
  }
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == 0.f) {                         // C = beta C (C not read when beta = 0)
    for (int i = 0; i < m; ++i) {
      float* c = C + (int64_t)i * ldc;
      for (int j = 0; j < n; ++j) c[j] = beta == 0.f ? 0.f : beta * c[j];
    }
    return;
  }
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  tfm_sgemm::Blocked(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
#else
  std::fprintf(stderr, "tfm_builtin_sgemm: this build has no builtin sgemm (needs AVX2+FMA or "
               "AVX-512F); C left unchanged\n");
#endif
}
