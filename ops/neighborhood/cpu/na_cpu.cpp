// natzoo CPU kernels for fused neighborhood attention (forward and backward), loaded with ctypes.
//
// Supports: 1-D/2-D/3-D (lower ranks are padded to 3 axes of length 1), any kernel size (even included), stride,
// dilation, causal masking per axis, relative positional bias, the log-sum-exp output, float32 and float64 (the
// Python side computes float16/bfloat16 in float32). Inputs are contiguous [B, N, H, D] (N = flattened spatial
// tokens, row-major), rpb [H, 2k_0-1, 2k_1-1, 2k_2-1] in the compute dtype, lse [B, N, H].
// No Python or torch headers: plain C ABI, so one build serves every Python and torch version.
//
// Work unit: one (batch, head, dilation group). A dilation group is a plain (undilated) neighborhood problem on a
// sub-map, so every unit is solved by the same vector path:
//   * the unit's q (pre-scaled), k, v (and in the backward dO, lse) are packed transposed, [row][d][column], where a
//     row is a position of the leading axes and the column runs along the last axis; k and v rows carry zero pads;
//   * W consecutive queries of one row sit in the vector lanes (W = 16 floats / 8 doubles with AVX-512, half that
//     without). For a shift u, lane x meets key column x + u, so the keys of all lanes are one unaligned load: no
//     horizontal reductions and no gathers. A tile uses the shifts [umin, umax] its lanes need (kernel_size of them
//     inside the map, more at borders and with stride); a lane outside its own window is masked by a -inf bias;
//   * QB query rows are blocked together: each key row loaded once serves every query row of the block that uses it
//     (a row of the block that does not gets a scratch slot), so one loaded key vector feeds QB x NB FMAs.
// A unit whose inputs hold a NaN or an infinity is solved by the scalar path instead (one query at a time), which
// keeps the reference's semantics: a non-finite key or value row makes exactly the queries whose window holds it
// non-finite (a NaN logit or a non-finite output component turns the whole output row and its lse into NaN).
// Threads: the caller passes torch.get_num_threads(); units are split over that many threads: torch's own OpenMP
// threads when the build has -fopenmp (build.py adds it when torch's libgomp is loaded; the same runtime is then
// shared), else std::threads started and joined per call. Units own disjoint query and key tokens, so dk/dv writes
// never race; d_rpb gets one private copy per thread.
// Tested: tests/test_ops_reference.py (float64 oracle: outputs, lse, all gradients, gradcheck, low precision, NaN/inf
// against the reference) and tests/test_ops_cpu.py (fp32 layer shapes against the oracle, dispatch, build fallback,
// threads, torch.compile, export), with g++ 12.2 on x86-64 (Intel Xeon and AMD EPYC, AVX-512 and an AVX2 build),
// 2 cores. Not tried: clang, MSVC (the build needs a g++-compatible driver), ARM.
// Known limits: no attention dropout, no second-order gradients (the reference has both); a unit is one thread's
// work, so batch * heads * groups below the thread count leaves threads idle; maps whose last axis is shorter than
// the lane count waste lanes (a 7-wide map uses 7 of 16).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

// ----------------------------------------------------------------------------------------------------------------
// Geometry shared by both paths.

struct Axis {
    // Per coordinate i of one axis: first key (global coordinate), key count, and rpb index of that first key.
    std::vector<int64_t> start, count, rbase;
    int64_t length, kernel, dil, rdim;
};

Axis make_axis(int64_t length, int64_t kernel, int64_t stride, int64_t dil, bool causal) {
    Axis a;
    a.length = length;
    a.kernel = kernel;
    a.dil = dil;
    a.rdim = 2 * kernel - 1;
    a.start.resize(length);
    a.count.resize(length);
    a.rbase.resize(length);
    for (int64_t i = 0; i < length; ++i) {
        int64_t g = i % dil, ii = i / dil;
        int64_t glen = (length - g + dil - 1) / dil;
        int64_t s, e;
        if (causal) {
            int64_t leader = std::min((ii / stride) * stride + stride - 1, glen - 1);
            s = std::max<int64_t>(leader - kernel + 1, 0);
            e = ii + 1;
        } else {
            int64_t leader = std::min((ii / stride) * stride + stride / 2, glen - 1);
            s = std::min(std::max<int64_t>(leader - kernel / 2, 0), glen - kernel);
            e = s + kernel;
        }
        a.start[i] = g + dil * s;
        a.count[i] = e - s;
        a.rbase[i] = (kernel - 1) + (s - ii);
    }
    return a;
}

struct Geometry {
    Axis ax[3];
    int64_t B, H, D, N, window;
    // Element strides (batch, axis 0, axis 1, axis 2, head) of the inputs q, k, v and dO; head_dim is contiguous.
    // Outputs (out, lse, dq, dk, dv) and the lse inputs are contiguous [B, N, H, (D)].
    int64_t sq[5], sk[5], sv[5], sg[5];
};

// Element offset of (b, flat token, h) in an input of strides st.
inline int64_t in_off(const Geometry& g, const int64_t* st, int64_t b, int64_t tok, int64_t h) {
    int64_t x2 = tok % g.ax[2].length, x1 = (tok / g.ax[2].length) % g.ax[1].length;
    int64_t x0 = tok / (g.ax[2].length * g.ax[1].length);
    return b * st[0] + x0 * st[1] + x1 * st[2] + x2 * st[3] + h * st[4];
}

template <typename F>
void parallel(int64_t total, int nthreads, F fn) {
    // fn(lo, hi, thread) over up to `nthreads` contiguous ranges of [0, total). Built with OpenMP (the build does so
    // when torch's own libgomp is loaded; ours then binds to that same runtime), the ranges run on torch's OpenMP
    // threads, which are already awake after torch's last parallel op: threads of our own would compete with them
    // for the cores while they spin. Otherwise std::threads, started and joined here.
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, total));
    if (nt == 1) {
        fn(int64_t(0), total, 0);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel num_threads(int(nt))
    {
        int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        fn(total * t / n, total * (t + 1) / n, int(t));
    }
#else
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < nt; ++t) {
        int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
        pool.emplace_back([=, &fn] { fn(lo, hi, int(t)); });
    }
    fn(int64_t(0), total / nt, 0);  // the calling thread takes the first range (one thread fewer to start)
    for (auto& th : pool) th.join();
#endif
}

// ----------------------------------------------------------------------------------------------------------------
// Scalar path: one query at a time (units with non-finite inputs).

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t D) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
    return s;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// Logits of query token i of (b, h): fills s[0..count) (window order) with key tokens kt[] and rpb indices rix[];
// returns the key count. A NaN logit is left in place (the caller turns the row into NaN).
template <typename T>
int64_t logits(const Geometry& g, const T* q, const T* k, const T* rpb, T scale, int64_t b, int64_t h, int64_t i,
               T* s, int64_t* kt, int64_t* rix) {
    const Axis &a0 = g.ax[0], &a1 = g.ax[1], &a2 = g.ax[2];
    int64_t i2 = i % a2.length, i1 = (i / a2.length) % a1.length, i0 = i / (a2.length * a1.length);
    const T* qp = q + in_off(g, g.sq, b, i, h);
    const T* rp = rpb ? rpb + h * a0.rdim * a1.rdim * a2.rdim : nullptr;
    int64_t n = 0;
    for (int64_t m0 = 0; m0 < a0.count[i0]; ++m0) {
        int64_t x0 = a0.start[i0] + m0 * a0.dil, r0 = a0.rbase[i0] + m0;
        for (int64_t m1 = 0; m1 < a1.count[i1]; ++m1) {
            int64_t x1 = a1.start[i1] + m1 * a1.dil, r1 = a1.rbase[i1] + m1;
            int64_t row = (x0 * a1.length + x1) * a2.length;
            int64_t rrow = (r0 * a1.rdim + r1) * a2.rdim;
            for (int64_t m2 = 0; m2 < a2.count[i2]; ++m2) {
                int64_t tok = row + a2.start[i2] + m2 * a2.dil;
                int64_t r = rrow + a2.rbase[i2] + m2;
                T v = dot(qp, k + in_off(g, g.sk, b, tok, h), g.D) * scale;
                if (rp) v += rp[r];
                s[n] = v;
                kt[n] = tok;
                rix[n] = r;
                ++n;
            }
        }
    }
    return n;
}

template <typename T>
struct ScalarScratch {
    std::vector<T> s, dp, acc, qs;
    std::vector<int64_t> kt, rix;
    explicit ScalarScratch(const Geometry& g)
        : s(g.window), dp(g.window), acc(g.D), qs(g.D), kt(g.window), rix(g.window) {}
};

template <typename T>
void forward_query(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, T* out, T* lse,
                   int64_t b, int64_t h, int64_t i, ScalarScratch<T>& w) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    T* s = w.s.data();
    int64_t n = logits(g, q, k, rpb, scale, b, h, i, s, w.kt.data(), w.rix.data());
    T mx = -std::numeric_limits<T>::infinity();
    bool bad = false;
    for (int64_t j = 0; j < n; ++j) {
        bad |= std::isnan(s[j]);
        mx = std::max(mx, s[j]);
    }
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
    }
    std::fill(w.acc.begin(), w.acc.end(), T(0));
    T inv = T(1) / sum;
    for (int64_t j = 0; j < n; ++j) axpy(s[j] * inv, v + in_off(g, g.sv, b, w.kt[j], h), w.acc.data(), g.D);
    T* op = out + ((b * g.N + i) * g.H + h) * g.D;
    T check = 0;
    for (int64_t d = 0; d < g.D; ++d) check += w.acc[d] * T(0);  // NaN when any component is not finite
    bool nan_logit = bad;
    bad |= std::isnan(check) || std::isnan(mx) || std::isnan(sum);
    for (int64_t d = 0; d < g.D; ++d) op[d] = bad ? nan : w.acc[d];
    // lse as the reference's logsumexp: NaN for a NaN logit or a non-finite value row in the window (the reference
    // folds a value row's non-finiteness into its key's logit), +inf for a row holding a +inf logit, -inf for a row
    // of -inf logits; the output row is NaN in all three.
    T vcheck = 0;  // NaN when a value row of the window holds a NaN or an infinity
    for (int64_t j = 0; j < n; ++j) {
        const T* vp = v + in_off(g, g.sv, b, w.kt[j], h);
        for (int64_t d = 0; d < g.D; ++d) vcheck += vp[d] * T(0);
    }
    T l = mx + std::log(sum);
    if (nan_logit || std::isnan(vcheck)) l = nan;
    else if (std::isinf(mx)) l = mx;
    lse[(b * g.N + i) * g.H + h] = l;
}

template <typename T>
void backward_query(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, const T* lse,
                    const T* gout, const T* glse, T* dq, T* dk, T* dv, T* dri, int64_t b, int64_t h, int64_t i,
                    ScalarScratch<T>& w) {
    // dk, dv and dri (this thread's d_rpb) are accumulated; dq[row] is written.
    int64_t rsize = g.ax[0].rdim * g.ax[1].rdim * g.ax[2].rdim;
    int64_t row = (b * g.N + i) * g.H + h;
    T *s = w.s.data(), *dp = w.dp.data();
    int64_t n = logits(g, q, k, rpb, scale, b, h, i, s, w.kt.data(), w.rix.data());
    const T* gp = gout + in_off(g, g.sg, b, i, h);
    T l = lse[row], gl = glse ? glse[row] : T(0), delta = 0;
    for (int64_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - l);  // probabilities
        dp[j] = dot(gp, v + in_off(g, g.sv, b, w.kt[j], h), g.D);
        delta += s[j] * dp[j];
    }
    std::fill(w.acc.begin(), w.acc.end(), T(0));
    const T* qp = q + in_off(g, g.sq, b, i, h);
    for (int64_t d = 0; d < g.D; ++d) w.qs[d] = qp[d] * scale;
    for (int64_t j = 0; j < n; ++j) {
        int64_t kr = ((b * g.N + w.kt[j]) * g.H + h) * g.D;
        T ds = s[j] * (dp[j] - delta + gl);  // d loss / d logit
        axpy(ds, k + in_off(g, g.sk, b, w.kt[j], h), w.acc.data(), g.D);
        axpy(ds, w.qs.data(), dk + kr, g.D);
        axpy(s[j], gp, dv + kr, g.D);
        if (dri) dri[h * rsize + w.rix[j]] += ds;
    }
    T* dqp = dq + row * g.D;
    for (int64_t d = 0; d < g.D; ++d) dqp[d] = w.acc[d] * scale;
}

// ----------------------------------------------------------------------------------------------------------------
// Vector path.

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
constexpr int QB = 3, NB = 8, DB = 8;  // 24 accumulators + 3 queries + 1 key of the 32 vector registers
#else
constexpr int VBYTES = 32;
constexpr int QB = 2, NB = 5, DB = 5;  // 10 accumulators + 2 queries + 1 key of 16 (AVX2) vector registers
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
    typedef float V __attribute__((vector_size(VBYTES)));
    typedef int32_t I __attribute__((vector_size(VBYTES)));
};
template <>
struct Vec<double> {
    typedef double V __attribute__((vector_size(VBYTES)));
    typedef int64_t I __attribute__((vector_size(VBYTES)));
};

template <typename V>
inline V loadv(const void* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));  // one unaligned vector load
    return v;
}

template <typename V>
inline void storev(void* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

// exp(x) for x <= 0, 0 below -87 (float: a Cephes-style polynomial, about 1 ulp; the exact value there is < 2e-38,
// under the resolution of a softmax sum >= 1).
inline Vec<float>::V vexp(Vec<float>::V x) {
    using V = Vec<float>::V;
    using I = Vec<float>::I;
    V xc = x < -87.0f ? V{} - 87.0f : x;
    V t = xc * 1.44269504088896341f - 0.5f;  // xc <= 0: truncation of t rounds xc / ln2 to nearest
    I n = __builtin_convertvector(t, I);
    V nf = __builtin_convertvector(n, V);
    V r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    I bits = (n + 127) << 23;  // 2^n, n >= -126
    V scale;
    std::memcpy(&scale, &bits, sizeof(V));
    V res = p * scale;
    return x < -87.0f ? V{} : res;
}

// float64: the library exp per lane (the float64 path serves accuracy: tests, gradcheck).
inline Vec<double>::V vexp(Vec<double>::V x) {
    Vec<double>::V r;
    for (int l = 0; l < int(sizeof(r) / sizeof(double)); ++l) r[l] = std::exp(x[l]);
    return r;
}

// One axis of one dilation group, in group coordinates.
struct Sub {
    int64_t n, k, rdim;
    std::vector<int64_t> start, count, rbase;
};

Sub sub_axis(const Axis& a, int64_t grp) {
    Sub s;
    s.n = (a.length - grp + a.dil - 1) / a.dil;
    s.k = a.kernel;
    s.rdim = a.rdim;
    s.start.resize(s.n);
    s.count.resize(s.n);
    s.rbase.resize(s.n);
    for (int64_t ii = 0; ii < s.n; ++ii) {
        int64_t i = grp + a.dil * ii;
        s.start[ii] = (a.start[i] - grp) / a.dil;
        s.count[ii] = a.count[i];
        s.rbase[ii] = a.rbase[i];
    }
    return s;
}

// A 64-byte aligned, zero-initialised scratch array, kept by a thread across units.
template <typename T>
struct Buf {
    std::vector<T> raw;
    T* p = nullptr;
    size_t n = 0;
    T* get(size_t count, bool zero) {
        if (count > n || raw.empty()) {
            raw.assign(count + 64 / sizeof(T), T(0));
            uintptr_t a = reinterpret_cast<uintptr_t>(raw.data());
            p = reinterpret_cast<T*>((a + 63) & ~uintptr_t(63));
            n = count;
        } else if (zero) {
            std::fill(p, p + count, T(0));
        }
        return p;
    }
};

// The packed layout of one unit.
template <typename T>
struct Layout {
    static constexpr int W = VBYTES / sizeof(T);
    Sub s[3];
    int64_t grp[3];
    int64_t rows, tiles, lpad, pad, lp, d, dp;
    std::vector<int64_t> umin, nu, bias_off;  // per tile
    int64_t nu_max, nrb, slots;

    Layout(const Geometry& g, const int64_t* group, bool has_rpb) {
        for (int a = 0; a < 3; ++a) {
            grp[a] = group[a];
            s[a] = sub_axis(g.ax[a], group[a]);
        }
        rows = s[0].n * s[1].n;
        tiles = (s[2].n + W - 1) / W;
        lpad = tiles * W;
        pad = ((W + NB + W - 1) / W) * W;  // >= W - 1 columns left of a tile, W + NB - 1 right of the map
        lp = lpad + 2 * pad;
        d = g.D;
        dp = ((g.D + DB - 1) / DB) * DB;  // head_dim padded with zeros to whole d-blocks
        nrb = has_rpb ? s[0].rdim * s[1].rdim : 1;
        slots = s[0].k * s[1].k;
        nu_max = 0;
        int64_t off = 0;
        for (int64_t t = 0; t < tiles; ++t) {
            int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
            for (int64_t x = t * W; x < std::min<int64_t>((t + 1) * W, s[2].n); ++x) {
                lo = std::min(lo, s[2].start[x] - x);
                hi = std::max(hi, s[2].start[x] + s[2].count[x] - 1 - x);
            }
            umin.push_back(lo);
            nu.push_back(hi - lo + 1);
            bias_off.push_back(off);
            off += nrb * (hi - lo + 1) * W;
            nu_max = std::max(nu_max, hi - lo + 1);
        }
        bias_off.push_back(off);
        whole = true;  // every query attends to the whole sub-map: the dense path
        for (int a = 0; a < 3; ++a)
            for (int64_t i = 0; i < s[a].n; ++i) whole &= s[a].start[i] == 0 && s[a].count[i] == s[a].n;
    }
    bool whole;
    // Element offset of group coordinates (i0, i1, i2) of (b, h) in an input of strides st.
    int64_t off(const Geometry& g, const int64_t* st, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t i2) const {
        return b * st[0] + (grp[0] + g.ax[0].dil * i0) * st[1] + (grp[1] + g.ax[1].dil * i1) * st[2] +
               (grp[2] + g.ax[2].dil * i2) * st[3] + h * st[4];
    }
    // Global flat token of group coordinates (i0, i1, i2).
    int64_t token(const Geometry& g, int64_t i0, int64_t i1, int64_t i2) const {
        int64_t x0 = grp[0] + g.ax[0].dil * i0, x1 = grp[1] + g.ax[1].dil * i1, x2 = grp[2] + g.ax[2].dil * i2;
        return (x0 * g.ax[1].length + x1) * g.ax[2].length + x2;
    }
};

// W values p[l * stride] for lanes l < n, zero in the others. AVX-512 gathers them in one instruction; the index
// vector is 32-bit, so a stride beyond that range takes the lane loop.
template <typename T>
inline typename Vec<T>::V gather(const T* p, int64_t stride, int n) {
    typename Vec<T>::V v = {};
#if defined(__AVX512F__)
    if (stride * int64_t(64 / sizeof(T)) < (int64_t(1) << 31)) {
        if constexpr (std::is_same<T, float>::value) {
            __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int32_t(stride)));
            __m512 r = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16((1u << n) - 1), idx, p, 4);
            std::memcpy(&v, &r, sizeof(v));
        } else {
            __m256i idx =
                _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int32_t(stride)));
            __m512d r = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), __mmask8((1u << n) - 1), idx, p, 8);
            std::memcpy(&v, &r, sizeof(v));
        }
        return v;
    }
#endif
    for (int l = 0; l < n; ++l) v[l] = p[l * stride];
    return v;
}

// Stores the first n lanes of v to p (n < W: only those, the memory past them belongs to others).
template <typename T, typename V>
inline void store_first(T* p, V v, int64_t n) {
    if (n == int64_t(sizeof(V) / sizeof(T)))
        storev(p, v);
    else
        std::memcpy(p, &v, size_t(n) * sizeof(T));
}

#if defined(__AVX512F__)
// In-register transpose of 16 rows of 16 floats (r[i][j] -> r[j][i]): 32-bit, then 64-bit unpacks inside 128-bit
// lanes, then two rounds of 128-bit lane shuffles. 64 shuffles for 256 values, where 16 gathers touch 16 cache lines
// each.
inline void transpose16(__m512 (&r)[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // lane k: r_i[4k], r_i+1[4k], r_i[4k+1], r_i+1[4k+1]
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // lane k: the same for 4k+2, 4k+3
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + e] lane k: element 4k + e of rows i..i+3
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
        __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    // t[2e], t[2e+1]: elements (e, e+8) and (e+4, e+12) of rows 0..7; t[8 + ...] the same of rows 8..15
    for (int e = 0; e < 4; ++e) {
        t[2 * e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);
        t[2 * e + 1] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xdd);
        t[8 + 2 * e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        t[8 + 2 * e + 1] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xdd);
    }
    for (int e = 0; e < 4; ++e) {
        r[e] = _mm512_shuffle_f32x4(t[2 * e], t[8 + 2 * e], 0x88);
        r[e + 8] = _mm512_shuffle_f32x4(t[2 * e], t[8 + 2 * e], 0xdd);
        r[e + 4] = _mm512_shuffle_f32x4(t[2 * e + 1], t[8 + 2 * e + 1], 0x88);
        r[e + 12] = _mm512_shuffle_f32x4(t[2 * e + 1], t[8 + 2 * e + 1], 0xdd);
    }
}

// pack() of one tile of n <= 16 tokens (rows of D floats, `lane_stride` apart) into dst[d][16 columns].
inline void pack_tile(const float* sp, int64_t lane_stride, int n, int64_t D, float mul, float* dst, int64_t width,
                      Vec<float>::V& check) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        int nd = int(std::min<int64_t>(16, D - d0));
        __mmask16 m = __mmask16((1u << nd) - 1);
        __m512 r[16], chk = _mm512_setzero_ps();
        for (int l = 0; l < 16; ++l) {
            r[l] = l < n ? _mm512_maskz_loadu_ps(m, sp + l * lane_stride + d0) : _mm512_setzero_ps();
            chk = _mm512_add_ps(chk, _mm512_mul_ps(r[l], _mm512_setzero_ps()));
        }
        Vec<float>::V c;
        std::memcpy(&c, &chk, sizeof(c));
        check += c;
        transpose16(r);
        __m512 mv = _mm512_set1_ps(mul);
        for (int e = 0; e < nd; ++e) _mm512_storeu_ps(dst + (d0 + e) * width, _mm512_mul_ps(r[e], mv));
    }
}

// unpack_lanes() of one tile: buf[d][16 lanes] (d stride dstride) times mul[lane] to n token rows `row_stride` apart.
inline void unpack_tile(const float* buf, int64_t dstride, Vec<float>::V mul, int64_t D, float* dst, int64_t row_stride,
                        int n) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        int nd = int(std::min<int64_t>(16, D - d0));
        __m512 r[16];
        for (int e = 0; e < 16; ++e) r[e] = e < nd ? _mm512_loadu_ps(buf + (d0 + e) * dstride) : _mm512_setzero_ps();
        transpose16(r);
        __mmask16 m = __mmask16((1u << nd) - 1);
        for (int l = 0; l < n; ++l)
            _mm512_mask_storeu_ps(dst + l * row_stride + d0, m, _mm512_mul_ps(r[l], _mm512_set1_ps(mul[l])));
    }
}
#endif

// Asks for the cache lines of one token's row of D values, into L2 (prefetcht1). A model calls the op with its inputs
// out of the core's caches (the Linear layers between the calls evict them; the backward reads what the forward saved
// long before). A unit's rows are D values `H * D` apart, a stride the hardware prefetchers did not cover, so the
// packing loops waited on one miss after another. Measured on one AMD EPYC core, a 7x7 forward (16 heads) took 315 us
// after a 1024^3 matmul against 160 us warm, and 220 us with this (267 us prefetching into L1 with prefetcht0).
template <int RW = 0, typename T>
inline void prefetch_row(const T* p, int64_t D) {
    for (int64_t d = 0; d < D; d += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + d, RW, 2);
    __builtin_prefetch(p + D - 1, RW, 2);  // a row that does not start on a cache line spans one more
}

// prefetch_row() of every token of rows [first, first + count) (row = i0 * n1 + i1, clipped to the unit's rows) of
// (b, h) of an input.
template <typename T>
void prefetch_rows(const Geometry& g, const Layout<T>& L, const T* src, const int64_t* st, int64_t b, int64_t h,
                   int64_t first, int64_t count) {
    const int64_t lane_stride = g.ax[2].dil * st[3];
    for (int64_t r = first; r < std::min(first + count, L.rows); ++r) {
        const T* sp = src + L.off(g, st, b, h, r / L.s[1].n, r % L.s[1].n, 0);
        for (int64_t x = 0; x < L.s[2].n; ++x) prefetch_row(sp + x * lane_stride, g.D);
    }
}

// The same for writing, of the rows of a [B, N, H, D] output (out, dq): the stores of the unpacking otherwise wait on
// their lines one after another too.
template <typename T>
void prefetch_out_rows(const Geometry& g, const Layout<T>& L, T* dst, int64_t b, int64_t h, int64_t first,
                       int64_t count) {
    for (int64_t r = first; r < std::min(first + count, L.rows); ++r)
        for (int64_t x = 0; x < L.s[2].n; ++x)
            prefetch_row<1>(dst + ((b * g.N + L.token(g, r / L.s[1].n, r % L.s[1].n, x)) * g.H + h) * g.D, g.D);
}

// Packs rows [first, first + count) (row = i0 * n1 + i1) of (b, h) of a [B, *S, H, D] input into
// dst[row - first][d][pad + column] (times `mul`), lanes past the map as zeros; returns false when a value is not
// finite. Pads and d >= D are not written (zero since allocation).
template <typename T>
bool pack(const Geometry& g, const Layout<T>& L, const T* src, const int64_t* st, int64_t b, int64_t h, T mul, T* dst,
          int64_t width, int64_t pad, int64_t first, int64_t count) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    V check = V{};
    const int64_t lane_stride = g.ax[2].dil * st[3];  // between neighbouring columns of the group
    constexpr int64_t ahead = 2;  // rows in flight while one is packed
    prefetch_rows(g, L, src, st, b, h, first, std::min(ahead, count));
    for (int64_t r = first; r < first + count; ++r) {
        if (r + ahead < first + count) prefetch_rows(g, L, src, st, b, h, r + ahead, 1);
        int64_t i0 = r / L.s[1].n, i1 = r % L.s[1].n;
        T* row = dst + (r - first) * L.dp * width + pad;
        for (int64_t x0 = 0; x0 < L.s[2].n; x0 += W) {
            int n = int(std::min<int64_t>(W, L.s[2].n - x0));
            const T* sp = src + L.off(g, st, b, h, i0, i1, x0);
#if defined(__AVX512F__)
            if constexpr (std::is_same<T, float>::value) {
                pack_tile(sp, lane_stride, n, g.D, mul, row + x0, width, check);
                continue;
            }
#endif
            for (int64_t d = 0; d < g.D; ++d) {
                V v = gather(sp + d, lane_stride, n);
                check += v * T(0);  // NaN once any value is NaN or infinite
                storev(row + d * width + x0, v * mul);
            }
        }
    }
    for (int l = 0; l < W; ++l)
        if (std::isnan(check[l])) return false;
    return true;
}

// One value per (b, token, h) packed to dst[row][column]; false when a value is not finite.
template <typename T>
bool pack_lanes(const Geometry& g, const Layout<T>& L, const T* src, int64_t b, int64_t h, T* dst) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    V check = V{};
    for (int64_t i0 = 0; i0 < L.s[0].n; ++i0)
        for (int64_t i1 = 0; i1 < L.s[1].n; ++i1)
            for (int64_t x0 = 0; x0 < L.s[2].n; x0 += W) {
                int n = int(std::min<int64_t>(W, L.s[2].n - x0));
                V v = gather(src + (b * g.N + L.token(g, i0, i1, x0)) * g.H + h, g.ax[2].dil * g.H, n);
                check += v * T(0);
                storev(dst + (i0 * L.s[1].n + i1) * L.lpad + x0, v);
            }
    for (int l = 0; l < W; ++l)
        if (std::isnan(check[l])) return false;
    return true;
}

// Writes rows [d][lanes] of a packed buffer (d stride `dstride`, lanes from `col`) times `mul[lane]` to the [B, N, H,
// D] rows of the first n lanes (tokens `tok0` + l * dilation of the last axis).
template <typename T>
void unpack_lanes(const Geometry& g, const T* buf, int64_t dstride, typename Vec<T>::V mul, T* dst, int64_t b,
                  int64_t h, int64_t tok0, int n) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
        unpack_tile(buf, dstride, mul, g.D, dst + ((b * g.N + tok0) * g.H + h) * g.D, g.ax[2].dil * g.H * g.D, n);
        return;
    }
#endif
    for (int l = 0; l < n; ++l) {
        T* op = dst + ((b * g.N + tok0 + l * g.ax[2].dil) * g.H + h) * g.D;
        for (int64_t d = 0; d < g.D; d += W) {
            V v = gather(buf + d * dstride + l, dstride, int(std::min<int64_t>(W, g.D - d)));
            store_first(op + d, v * mul[l], std::min<int64_t>(W, g.D - d));
        }
    }
}

// Bias of every tile: bias[R][u][lane] = rpb[h][R][column] inside lane's window, -inf outside it and on lanes past
// the map (R = row-axes rpb index, or 0 without rpb). rpb is finite (checked once per call).
template <typename T>
void build_bias(const Layout<T>& L, const T* rpb, int64_t h, T* bias) {
    constexpr int W = Layout<T>::W;
    const T ninf = -std::numeric_limits<T>::infinity();
    const Sub& s2 = L.s[2];
    for (int64_t t = 0; t < L.tiles; ++t) {
        T* bt = bias + L.bias_off[t];
        for (int64_t R = 0; R < L.nrb; ++R)
            for (int64_t u = 0; u < L.nu[t]; ++u)
                for (int l = 0; l < W; ++l) {
                    int64_t x = t * W + l, key = x + L.umin[t] + u;
                    T val = ninf;
                    if (x < s2.n && key >= s2.start[x] && key < s2.start[x] + s2.count[x])
                        val = rpb ? rpb[(h * L.nrb + R) * s2.rdim + s2.rbase[x] + key - s2.start[x]] : T(0);
                    bt[(R * L.nu[t] + u) * W + l] = val;
                }
    }
}

// The kernels below take the NQ query rows of a block that use one key row (a contiguous range of the block, as
// windows only move forward): rows that do not use it cost nothing.

// acc[j][c] = sum_d q_j[d] . k[d][c + lanes] for NQ query rows and NS shifts, stored to out[j] + c * W.
// q_j: [d][lpad] (aligned), k: [d][lp] at the first shift's column.
template <typename T, int NQ, int NS>
inline void qk_block(const T* const* qrow, int64_t qstride, const T* krow, int64_t kstride, int64_t dp,
                     T* const* out) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
    V acc[NQ][NS];
    for (int j = 0; j < NQ; ++j)
        for (int c = 0; c < NS; ++c) acc[j][c] = V{};
    for (int64_t d = 0; d < dp; ++d) {
        V qv[NQ];
        for (int j = 0; j < NQ; ++j) qv[j] = loadv<V>(qrow[j] + d * qstride);
        const T* kp = krow + d * kstride;
        for (int c = 0; c < NS; ++c) {
            V kv = loadv<V>(kp + c);
            for (int j = 0; j < NQ; ++j) acc[j][c] += qv[j] * kv;
        }
    }
    for (int j = 0; j < NQ; ++j)
        for (int c = 0; c < NS; ++c) storev(out[j] + c * W, acc[j][c]);
}

template <typename T, int NQ>
inline void qk_shifts(const T* const* qrow, int64_t qstride, const T* krow, int64_t kstride, int64_t dp,
                      T* const* out, int64_t ns) {
    switch (ns) {
        case 1: qk_block<T, NQ, 1>(qrow, qstride, krow, kstride, dp, out); break;
        case 2: qk_block<T, NQ, 2>(qrow, qstride, krow, kstride, dp, out); break;
        case 3: qk_block<T, NQ, 3>(qrow, qstride, krow, kstride, dp, out); break;
        case 4: qk_block<T, NQ, 4>(qrow, qstride, krow, kstride, dp, out); break;
        case 5: qk_block<T, NQ, 5>(qrow, qstride, krow, kstride, dp, out); break;
        case 6: qk_block<T, NQ, 6>(qrow, qstride, krow, kstride, dp, out); break;
        case 7: if constexpr (NB >= 7) qk_block<T, NQ, 7>(qrow, qstride, krow, kstride, dp, out); break;
        default: if constexpr (NB >= 8) qk_block<T, NQ, 8>(qrow, qstride, krow, kstride, dp, out); break;
    }
}

// Logits of nq query rows (1..QB) for `nu` shifts, in chunks of at most NB shifts of near-equal size (13 = 7 + 6).
template <typename T>
inline void qk_rows(int nq, const T* const* qrow, int64_t qstride, const T* krow, int64_t kstride, int64_t dp,
                    T* const* out, int64_t nu) {
    constexpr int W = VBYTES / sizeof(T);
    int64_t chunks = (nu + NB - 1) / NB;
    for (int64_t c = 0, u0 = 0; c < chunks; ++c) {
        int64_t ns = (nu - u0) / (chunks - c);
        T* o[QB];
        for (int j = 0; j < nq; ++j) o[j] = out[j] + u0 * W;
        const T* kp = krow + u0;
        if (nq == 1) qk_shifts<T, 1>(qrow, qstride, kp, kstride, dp, o, ns);
        else if (nq == 2) qk_shifts<T, 2>(qrow, qstride, kp, kstride, dp, o, ns);
        else if constexpr (QB >= 3) qk_shifts<T, 3>(qrow, qstride, kp, kstride, dp, o, ns);
        u0 += ns;
    }
}

// acc[j][e] += sum_u p_j[u] * v[e][u + lanes] over nu shifts for rows [J0, J0 + NQ) of the block and DB consecutive
// d of one key row.
template <typename T, int J0, int NQ>
inline void pv_block(const T* const* prow, const T* vrow, int64_t vstride, int64_t nu,
                     typename Vec<T>::V (&acc)[QB][DB]) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
    for (int64_t u = 0; u < nu; ++u) {
        V pv[NQ];
        for (int j = 0; j < NQ; ++j) pv[j] = loadv<V>(prow[J0 + j] + u * W);
        for (int e = 0; e < DB; ++e) {
            V vv = loadv<V>(vrow + e * vstride + u);
            for (int j = 0; j < NQ; ++j) acc[J0 + j][e] += pv[j] * vv;
        }
    }
}

template <typename T>
inline void pv_rows(int j0, int nq, const T* const* prow, const T* vrow, int64_t vstride, int64_t nu,
                    typename Vec<T>::V (&acc)[QB][DB]) {
    switch (j0 * 4 + nq) {
        case 1: pv_block<T, 0, 1>(prow, vrow, vstride, nu, acc); break;
        case 2: pv_block<T, 0, 2>(prow, vrow, vstride, nu, acc); break;
        case 5: pv_block<T, 1, 1>(prow, vrow, vstride, nu, acc); break;
        default:
            if constexpr (QB >= 3) {
                if (j0 * 4 + nq == 3) pv_block<T, 0, 3>(prow, vrow, vstride, nu, acc);
                else if (j0 * 4 + nq == 6) pv_block<T, 1, 2>(prow, vrow, vstride, nu, acc);
                else pv_block<T, 2, 1>(prow, vrow, vstride, nu, acc);
            }
            break;
    }
}

// dst[d][u + lanes] += sum_j g_j[u] * x_j[d] over nu shifts and dp rows of d, NQ rows (the dk / dv scatter of one key
// row).
template <typename T, int NQ>
inline void scatter_block(const T* const* grow, const T* const* xrow, int64_t xstride, T* dst, int64_t dstride,
                          int64_t dp, int64_t nu) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
    for (int64_t u = 0; u < nu; ++u) {
        V gv[NQ];
        for (int j = 0; j < NQ; ++j) gv[j] = loadv<V>(grow[j] + u * W);
        for (int64_t d = 0; d < dp; ++d) {
            T* p = dst + d * dstride + u;
            V acc = loadv<V>(p);
            for (int j = 0; j < NQ; ++j) acc += gv[j] * loadv<V>(xrow[j] + d * xstride);
            storev(p, acc);
        }
    }
}

template <typename T>
inline void scatter_rows(int nq, const T* const* grow, const T* const* xrow, int64_t xstride, T* dst,
                         int64_t dstride, int64_t dp, int64_t nu) {
    if (nq == 1) scatter_block<T, 1>(grow, xrow, xstride, dst, dstride, dp, nu);
    else if (nq == 2) scatter_block<T, 2>(grow, xrow, xstride, dst, dstride, dp, nu);
    else if constexpr (QB >= 3) scatter_block<T, 3>(grow, xrow, xstride, dst, dstride, dp, nu);
}

// Per-thread scratch of the vector path.
template <typename T>
struct Work {
    std::array<int64_t, 6> layout{};  // of the last unit: the packed buffers' zeros stay valid while it is unchanged
    std::vector<int64_t> toks;    // whole-window units: their tokens
    Buf<T> qt, kt, vt, gt, lse, glse, dqt, dkt, dvt, bias, dbias, s, dps, o;
    Buf<T> wq, wkt, wv, wbias, ws, wg, wvt, wds, wtr;  // whole-window units (forward_whole, backward_whole)
    std::vector<int64_t> wbias_key;  // (head, sub-map) of the bias table in wbias
    bool fresh(const Layout<T>& L) {
        // head_dim itself, not only its padded dp: the rows d >= D must be zeros (D = 4 and 8 share dp = 8)
        std::array<int64_t, 6> key = {L.rows, L.d, L.dp, L.lpad, L.lp, L.pad};
        bool changed = key != layout;
        layout = key;
        return changed;
    }
};

// Scratch kept between calls (at most 8 idle sets; each is as large as the largest unit its thread met, about 2 MB
// for a 56x56 head of head_dim 32): fresh buffers every call would cost page faults and zeroing.
template <typename T>
struct WorkCache {
    std::mutex lock;
    std::vector<std::unique_ptr<Work<T>>> idle;
    std::unique_ptr<Work<T>> take() {
        std::lock_guard<std::mutex> guard(lock);
        if (idle.empty()) return std::unique_ptr<Work<T>>(new Work<T>());
        std::unique_ptr<Work<T>> w = std::move(idle.back());
        idle.pop_back();
        return w;
    }
    void give(std::unique_ptr<Work<T>> w) {
        std::lock_guard<std::mutex> guard(lock);
        if (idle.size() < 8) idle.push_back(std::move(w));
    }
};

template <typename T>
WorkCache<T>& work_cache() {
    static WorkCache<T> cache;
    return cache;
}

// A block of up to QB query rows (i0, i1..i1+QB-1) of a unit: which rows are real and the key-row union.
struct Block {
    int64_t i0, i1[QB], nreal, x1lo, x1hi;
    bool real[QB];
};

template <typename T>
Block make_block(const Layout<T>& L, int64_t i0, int64_t i1b) {
    Block blk;
    blk.i0 = i0;
    blk.nreal = 0;
    const Sub& s1 = L.s[1];
    blk.x1lo = s1.start[i1b];
    blk.x1hi = blk.x1lo;
    for (int j = 0; j < QB; ++j) {
        blk.i1[j] = i1b + j;
        blk.real[j] = i1b + j < s1.n;
        if (blk.real[j]) {
            ++blk.nreal;
            blk.x1hi = std::max(blk.x1hi, s1.start[i1b + j] + s1.count[i1b + j]);
        }
    }
    return blk;
}

// Slot (window position m0 * k1 + m1) of key row (x0 = start0 + m0, x1) for block row j, or -1 when j does not use it.
template <typename T>
inline int64_t slot_of(const Layout<T>& L, const Block& blk, int j, int64_t m0, int64_t x1) {
    if (!blk.real[j]) return -1;
    int64_t m1 = x1 - L.s[1].start[blk.i1[j]];
    if (m1 < 0 || m1 >= L.s[1].count[blk.i1[j]]) return -1;
    return m0 * L.s[1].k + m1;
}

// S[j][slot][u][lanes] = q_j . k over every key row of the block, tile t. Rows of the block that do not use a key
// row write to scratch.
template <typename T>
void block_logits(const Layout<T>& L, const Block& blk, int64_t t, const T* qt, const T* kt, T* sbuf) {
    constexpr int W = Layout<T>::W;
    const Sub &s0 = L.s[0], &s1 = L.s[1];
    int64_t x0 = t * W, nu = L.nu[t], slot_size = L.nu_max * W;
    const T* qrow[QB];
    for (int j = 0; j < QB; ++j)
        qrow[j] = qt + j * L.dp * L.lpad + x0;  // the block's own packed rows
    for (int64_t m0 = 0; m0 < s0.count[blk.i0]; ++m0) {
        int64_t kx0 = s0.start[blk.i0] + m0;
        for (int64_t x1 = blk.x1lo; x1 < blk.x1hi; ++x1) {
            const T* krow = kt + (kx0 * s1.n + x1) * L.dp * L.lp + L.pad + x0 + L.umin[t];
            int j0 = -1, nq = 0;  // the block rows using this key row
            T* out[QB];
            for (int j = 0; j < QB; ++j) {
                int64_t slot = slot_of(L, blk, j, m0, x1);
                if (slot < 0) continue;
                if (j0 < 0) j0 = j;
                out[nq++] = sbuf + (j * L.slots + slot) * slot_size;
            }
            if (nq) qk_rows(nq, qrow + j0, L.lpad, krow, L.lp, L.dp, out, nu);
        }
    }
}

// out_j[d][lanes] = sum over key rows, shifts of p_j * x (x = v for the output, k for dq), for block rows, tile t.
template <typename T>
void block_weighted_sum(const Layout<T>& L, const Block& blk, int64_t t, const T* pbuf, const T* xt,
                        T* obuf) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    const Sub &s0 = L.s[0], &s1 = L.s[1];
    int64_t x0 = t * W, nu = L.nu[t], slot_size = L.nu_max * W;
    for (int64_t db = 0; db < L.dp; db += DB) {
        V acc[QB][DB];
        for (int j = 0; j < QB; ++j)
            for (int e = 0; e < DB; ++e) acc[j][e] = V{};
        for (int64_t m0 = 0; m0 < s0.count[blk.i0]; ++m0) {
            int64_t kx0 = s0.start[blk.i0] + m0;
            for (int64_t x1 = blk.x1lo; x1 < blk.x1hi; ++x1) {
                const T* prow[QB];
                int j0 = -1, nq = 0;  // the block rows using this key row
                for (int j = 0; j < QB; ++j) {
                    int64_t slot = slot_of(L, blk, j, m0, x1);
                    // only the rows that use this key row are read
                    prow[j] = slot < 0 ? nullptr : pbuf + (j * L.slots + slot) * slot_size;
                    if (slot >= 0 && j0 < 0) j0 = j;
                    nq += slot >= 0;
                }
                if (nq)
                    pv_rows<T>(j0, nq, prow, xt + ((kx0 * s1.n + x1) * L.dp + db) * L.lp + L.pad + x0 + L.umin[t], L.lp,
                               nu, acc);
            }
        }
        for (int j = 0; j < QB; ++j)
            for (int e = 0; e < DB; ++e) storev(obuf + (j * L.dp + db + e) * W, acc[j][e]);
    }
}

// dst[key row][d][columns] += sum_j g_j * x_j over the block's key rows (dk: g = ds, x = q; dv: g = p, x = dO).
template <typename T>
void block_scatter(const Layout<T>& L, const Block& blk, int64_t t, const T* gbuf, const T* xt,
                   T* dst) {
    constexpr int W = Layout<T>::W;
    const Sub &s0 = L.s[0], &s1 = L.s[1];
    int64_t x0 = t * W, nu = L.nu[t], slot_size = L.nu_max * W;
    const T* xrow[QB];
    for (int j = 0; j < QB; ++j)
        xrow[j] = xt + j * L.dp * L.lpad + x0;  // the block's own packed rows
    for (int64_t m0 = 0; m0 < s0.count[blk.i0]; ++m0) {
        int64_t kx0 = s0.start[blk.i0] + m0;
        for (int64_t x1 = blk.x1lo; x1 < blk.x1hi; ++x1) {
            const T* grow[QB];
            int j0 = -1, nq = 0;  // the block rows using this key row
            for (int j = 0; j < QB; ++j) {
                int64_t slot = slot_of(L, blk, j, m0, x1);
                if (slot < 0) continue;
                if (j0 < 0) j0 = j;
                grow[nq++] = gbuf + (j * L.slots + slot) * slot_size;
            }
            if (nq)
                scatter_rows<T>(nq, grow, xrow + j0, L.lpad,
                                dst + (kx0 * s1.n + x1) * L.dp * L.lp + L.pad + x0 + L.umin[t], L.lp, L.dp, nu);
        }
    }
}

// Calls fn(slot_ptr, bias_ptr) for every real window slot of block row j, tile t (bias: that slot's [u][lanes]).
template <typename T, typename F>
inline void for_slots(const Layout<T>& L, const Block& blk, int j, int64_t t, T* sbuf, const T* bias, F fn) {
    constexpr int W = Layout<T>::W;
    const Sub &s0 = L.s[0], &s1 = L.s[1];
    int64_t i0 = blk.i0, i1 = blk.i1[j], slot_size = L.nu_max * W;
    const T* bt = bias + L.bias_off[t];
    for (int64_t m0 = 0; m0 < s0.count[i0]; ++m0)
        for (int64_t m1 = 0; m1 < s1.count[i1]; ++m1) {
            int64_t R = L.nrb == 1 ? 0 : (s0.rbase[i0] + m0) * s1.rdim + s1.rbase[i1] + m1;
            fn(sbuf + (j * L.slots + m0 * s1.k + m1) * slot_size, bt + R * L.nu[t] * W, R);
        }
}

// ----------------------------------------------------------------------------------------------------------------
// Whole-window units: every query of the unit attends to every key of it (kernel_size equals the sub-map on every
// axis, not causal; e.g. a 7x7 map with kernel 7, or DiNAT's dilated layers whose groups are 7x7 at 224 px). Lanes run
// over keys for the logits and over head_dim for the output, as dense attention: a 7x7 unit uses 49 of 64 lanes,
// where the row-segment path uses 7 of 16 lanes for 7 of its 13 shifts.

constexpr int RB = 6;  // query rows per block: 6 x 4 logit accumulators, 6 x 2 output accumulators

// c[r][j-th vector] = sum_i a[r][i] * b[i][j-th vector] for RB rows of a (broadcast) and CB vectors of b's rows:
// the logits (a = q, i = d, b = k^T) and the weighted sums (a = p, i = key, b = v) of whole-window units.
template <typename T, int CB>
inline void gemm_block(const T* a, int64_t astride, const T* b, int64_t bstride, int64_t inner, T* c, int64_t cstride) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
    V acc[RB][CB];
    for (int r = 0; r < RB; ++r)
        for (int j = 0; j < CB; ++j) acc[r][j] = V{};
    for (int64_t i = 0; i < inner; ++i) {
        V bv[CB];
        for (int j = 0; j < CB; ++j) bv[j] = loadv<V>(b + i * bstride + j * W);
        for (int r = 0; r < RB; ++r) {
            V av = V{} + a[r * astride + i];  // broadcast
            for (int j = 0; j < CB; ++j) acc[r][j] += av * bv[j];
        }
    }
    for (int r = 0; r < RB; ++r)
        for (int j = 0; j < CB; ++j) storev(c + r * cstride + j * W, acc[r][j]);
}

// c[0..rows)[0..cols) = a[rows][inner] b[inner][cols] (rows a multiple of RB, cols of W; b and c of row stride cols),
// in column blocks of up to 4 vectors.
template <typename T>
void gemm(const T* a, int64_t astride, const T* b, int64_t inner, int64_t cols, T* c, int64_t rows) {
    constexpr int W = VBYTES / sizeof(T);
    for (int64_t r = 0; r < rows; r += RB)
        for (int64_t j = 0; j < cols; j += 4 * W) switch (std::min<int64_t>(4, (cols - j) / W)) {
                case 4: gemm_block<T, 4>(a + r * astride, astride, b + j, cols, inner, c + r * cols + j, cols); break;
                case 3: gemm_block<T, 3>(a + r * astride, astride, b + j, cols, inner, c + r * cols + j, cols); break;
                case 2: gemm_block<T, 2>(a + r * astride, astride, b + j, cols, inner, c + r * cols + j, cols); break;
                default: gemm_block<T, 1>(a + r * astride, astride, b + j, cols, inner, c + r * cols + j, cols); break;
            }
}

// True when every x[0..n) is finite: four independent vector sums of x * 0 (NaN once a value is NaN or infinite).
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
    using V = typename Vec<T>::V;
    constexpr int W = VBYTES / sizeof(T);
    V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        a0 += loadv<V>(x + i) * T(0);
        a1 += loadv<V>(x + i + W) * T(0);
        a2 += loadv<V>(x + i + 2 * W) * T(0);
        a3 += loadv<V>(x + i + 3 * W) * T(0);
    }
    T tail = 0;
    for (; i < n; ++i) tail += x[i] * T(0);
    V all = a0 + a1 + a2 + a3;
    for (int l = 0; l < W; ++l) tail += all[l];
    return !std::isnan(tail);
}

// bias[query][key] of a whole-window unit: rpb at (rbase(query) + key coordinate) per axis, 0 without rpb, -inf on the
// padded keys (rpb is known to be finite: checked once per call). Consecutive units of one head (its dilation groups)
// share it, within one call.
template <typename T>
const T* whole_bias(const Layout<T>& L, const T* rpb, int64_t h, int64_t rows, int64_t kp, Work<T>& w) {
    const int64_t n0 = L.s[0].n, n1 = L.s[1].n, n2 = L.s[2].n, nt = n0 * n1 * n2;
    std::vector<int64_t> key = {h, n0, n1, n2, rpb != nullptr};
    T* bias = w.wbias.get(rows * kp, false);
    if (key != w.wbias_key) {
        const T ninf = -std::numeric_limits<T>::infinity();
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t c = rpb && i < nt ? nt : 0; c < kp; ++c) bias[i * kp + c] = c < nt ? T(0) : ninf;
        if (rpb)
            for (int64_t i0 = 0, i = 0; i0 < n0; ++i0)
                for (int64_t i1 = 0; i1 < n1; ++i1)
                    for (int64_t i2 = 0; i2 < n2; ++i2, ++i)
                        for (int64_t c0 = 0; c0 < n0; ++c0)
                            for (int64_t c1 = 0; c1 < n1; ++c1) {
                                // keys (c0, c1, 0..n2-1) read one contiguous run of rpb
                                const T* rp = rpb + ((h * L.s[0].rdim + L.s[0].rbase[i0] + c0) * L.s[1].rdim +
                                                     L.s[1].rbase[i1] + c1) * L.s[2].rdim + L.s[2].rbase[i2];
                                // a loop, not a memcpy call per short run (7 values for kernel 7)
                                T* bp = bias + i * kp + (c0 * n1 + c1) * n2;
                                for (int64_t c2 = 0; c2 < n2; ++c2) bp[c2] = rp[c2];
                            }
        w.wbias_key = key;
    }
    return bias;
}

// [token, x0, x1, x2] per token of a whole-window unit, in row-major order of its sub-map (global flat token, then
// its coordinates on the full map), built in `toks` (per-thread scratch).
template <typename T>
const std::vector<int64_t>& unit_token_table(const Geometry& g, const Layout<T>& L, std::vector<int64_t>& toks) {
    toks.resize(4 * L.s[0].n * L.s[1].n * L.s[2].n);
    for (int64_t i0 = 0, t = 0; i0 < L.s[0].n; ++i0)
        for (int64_t i1 = 0; i1 < L.s[1].n; ++i1)
            for (int64_t i2 = 0; i2 < L.s[2].n; ++i2, ++t) {
                toks[4 * t] = L.token(g, i0, i1, i2);
                toks[4 * t + 1] = L.grp[0] + g.ax[0].dil * i0;
                toks[4 * t + 2] = L.grp[1] + g.ax[1].dil * i1;
                toks[4 * t + 3] = L.grp[2] + g.ax[2].dil * i2;
            }
    return toks;
}

// Element offset of (b, token, h) in an input of strides st, from the token's entry of unit_token_table().
inline int64_t token_offset(const int64_t* entry, const int64_t* st, int64_t b, int64_t h) {
    return b * st[0] + entry[1] * st[1] + entry[2] * st[2] + entry[3] * st[3] + h * st[4];
}

template <typename T>
bool forward_whole(const Geometry& g, const Layout<T>& L, const T* q, const T* k, const T* v, const T* rpb, T scale,
                   T* out, T* lse, int64_t b, int64_t h, Work<T>& w) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    const int64_t nt = L.s[0].n * L.s[1].n * L.s[2].n;
    const int64_t kp = (nt + W - 1) / W * W;              // keys, padded to whole vectors
    const int64_t rows = (nt + RB - 1) / RB * RB;          // queries, padded to whole blocks
    const int64_t dv = (g.D + W - 1) / W * W;              // head_dim of the value rows, padded to whole vectors
    T* qb = w.wq.get(rows * g.D, true);                    // [query][d], times scale
    T* kt = w.wkt.get(g.D * kp, true);                     // [d][key]
    T* vb = w.wv.get(kp * dv, true);                       // [key][d]
    T* sb = w.ws.get(rows * kp, false);                    // [query][key]
    T* ob = w.o.get(rows * dv, false);                     // [query][d]
    const std::vector<int64_t>& toks = unit_token_table(g, L, w.toks);
    auto tok_off = [&](const int64_t* st, int64_t t) { return token_offset(&toks[4 * t], st, b, h); };
    for (int64_t t = 0; t < nt; ++t) {  // every row in flight before the copies below wait on the first
        for (const T* p : {q + tok_off(g.sq, t), k + tok_off(g.sk, t), v + tok_off(g.sv, t)}) prefetch_row(p, g.D);
        prefetch_row<1>(out + ((b * g.N + toks[4 * t]) * g.H + h) * g.D, g.D);
    }
    for (int64_t t = 0; t < nt; ++t) {
        const T *qp = q + tok_off(g.sq, t), *kq = k + tok_off(g.sk, t), *vp = v + tok_off(g.sv, t);
        for (int64_t d = 0; d < g.D; ++d) {
            qb[t * g.D + d] = qp[d];  // scaled below, once the check has seen the values as given
            vb[t * dv + d] = vp[d];
        }
        for (int64_t d = 0; d < g.D; ++d) kt[d * kp + t] = kq[d];
    }
    if (!all_finite(qb, nt * g.D) || !all_finite(kt, g.D * kp) || !all_finite(vb, kp * dv)) return false;
    for (int64_t i = 0; i < nt * g.D; ++i) qb[i] *= scale;
    const T* bias = whole_bias(L, rpb, h, rows, kp, w);
    gemm(qb, g.D, kt, g.D, kp, sb, rows);  // logits
    std::vector<T> inv(rows, T(0));
    for (int64_t i = 0; i < nt; ++i) {
        T* sp = sb + i * kp;
        const T* bp = bias + i * kp;
        V mx = V{} + std::numeric_limits<T>::lowest();
        for (int64_t c = 0; c < kp; c += W) {
            V sv = loadv<V>(sp + c) + loadv<V>(bp + c);
            storev(sp + c, sv);
            mx = mx > sv ? mx : sv;
        }
        T m = mx[0];
        for (int l = 1; l < W; ++l) m = std::max(m, mx[l]);
        V sum = V{};
        for (int64_t c = 0; c < kp; c += W) {
            V pv = vexp(loadv<V>(sp + c) - m);
            storev(sp + c, pv);
            sum += pv;
        }
        T total = 0;
        for (int l = 0; l < W; ++l) total += sum[l];
        inv[i] = T(1) / total;
        lse[(b * g.N + toks[4 * i]) * g.H + h] = m + std::log(total);
    }
    gemm(sb, kp, vb, nt, dv, ob, rows);
    for (int64_t i = 0; i < nt; ++i) {
        T* op = out + ((b * g.N + toks[4 * i]) * g.H + h) * g.D;
        for (int64_t d = 0; d < g.D; ++d) op[d] = ob[i * dv + d] * inv[i];
    }
    return true;
}

template <typename T>
bool forward_unit(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, T* out, T* lse,
                  int64_t b, int64_t h, const Layout<T>& L, Work<T>& w) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    if (L.whole) return forward_whole(g, L, q, k, v, rpb, scale, out, lse, b, h, w);
    // Pads, d >= D and one row past the last (queries of block rows past the map) are read as zeros, never as another
    // unit's values: zeroed when the layout changes (packing writes the rest).
    bool fresh = w.fresh(L);
    T* qt = w.qt.get(QB * L.dp * L.lpad, fresh);  // the current block's query rows (packed per block: stays in cache)
    T* kt = w.kt.get(L.rows * L.dp * L.lp, fresh);
    T* vt = w.vt.get(L.rows * L.dp * L.lp, fresh);
    T* bias = w.bias.get(L.bias_off[L.tiles], false);
    bool finite = pack(g, L, k, g.sk, b, h, T(1), kt, L.lp, L.pad, 0, L.rows) &&
                  pack(g, L, v, g.sv, b, h, T(1), vt, L.lp, L.pad, 0, L.rows);
    if (!finite) return false;
    build_bias(L, rpb, h, bias);
    int64_t slot_size = L.nu_max * W;
    T* sbuf = w.s.get(QB * L.slots * slot_size, false);
    T* obuf = w.o.get(QB * L.dp * W, false);
    const T lowest = std::numeric_limits<T>::lowest();
    for (int64_t i0 = 0; i0 < L.s[0].n; ++i0)
        for (int64_t i1b = 0; i1b < L.s[1].n; i1b += QB) {
            Block blk = make_block(L, i0, i1b);
            // A non-finite query: the scalar path redoes the unit (no output of it has been accumulated elsewhere).
            const int64_t r0 = i0 * L.s[1].n + i1b;
            if (!pack(g, L, q, g.sq, b, h, scale, qt, L.lpad, 0, r0, blk.nreal)) return false;
            prefetch_rows(g, L, q, g.sq, b, h, r0 + blk.nreal, QB);  // the next block's, while this one computes
            prefetch_out_rows(g, L, out, b, h, r0, blk.nreal);  // written at the end of this block
            for (int64_t t = 0; t < L.tiles; ++t) {
                int64_t nu = L.nu[t];
                block_logits(L, blk, t, qt, kt, sbuf);
                V inv[QB], lsev[QB];
                for (int j = 0; j < QB; ++j) {
                    if (!blk.real[j]) continue;
                    // Lanes past the map see only -inf: starting from `lowest` keeps their max finite.
                    V mx = V{} + lowest;
                    for_slots(L, blk, j, t, sbuf, bias, [&](T* sp, const T* bp, int64_t) {
                        for (int64_t u = 0; u < nu; ++u) {
                            V sv = loadv<V>(sp + u * W) + loadv<V>(bp + u * W);
                            storev(sp + u * W, sv);
                            mx = mx > sv ? mx : sv;
                        }
                    });
                    V sum = V{};
                    for_slots(L, blk, j, t, sbuf, bias, [&](T* sp, const T*, int64_t) {
                        for (int64_t u = 0; u < nu; ++u) {
                            V pv = vexp(loadv<V>(sp + u * W) - mx);
                            storev(sp + u * W, pv);
                            sum += pv;
                        }
                    });
                    inv[j] = T(1) / sum;
                    for (int l = 0; l < W; ++l) lsev[j][l] = mx[l] + std::log(sum[l]);
                }
                block_weighted_sum(L, blk, t, sbuf, vt, obuf);
                for (int j = 0; j < QB; ++j) {
                    if (!blk.real[j]) continue;
                    int64_t tok0 = L.token(g, i0, blk.i1[j], t * W);
                    int n = int(std::min<int64_t>(W, L.s[2].n - t * W));
                    unpack_lanes(g, obuf + j * L.dp * W, W, inv[j], out, b, h, tok0, n);
                    for (int l = 0; l < n; ++l) lse[(b * g.N + tok0 + l * g.ax[2].dil) * g.H + h] = lsev[j][l];
                }
            }
        }
    return true;
}

// The backward of a whole-window unit: P from the saved lse, dP = dO v^T, dS = P (dP - delta + dlse), then
// dq = dS k, dk = dS^T q, dv = P^T dO as dense products (the same two kernels as the forward).
template <typename T>
bool backward_whole(const Geometry& g, const Layout<T>& L, const T* q, const T* k, const T* v, const T* rpb, T scale,
                    const T* lse, const T* gout, const T* glse, T* dq, T* dk, T* dv, T* dri, int64_t b, int64_t h,
                    Work<T>& w) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    const int64_t n1 = L.s[1].n, n2 = L.s[2].n, nt = L.s[0].n * n1 * n2;
    const int64_t kp = (nt + W - 1) / W * W;              // keys (and queries as columns), padded to whole vectors
    const int64_t rows = (nt + RB - 1) / RB * RB;          // rows of every [token][...] operand
    const int64_t dw = (g.D + W - 1) / W * W;              // head_dim, padded to whole vectors
    T* qb = w.wq.get(rows * dw, true);                     // [query][d], times scale
    T* gb = w.wg.get(rows * dw, true);                     // [query][d] of dO
    T* kb = w.wv.get(rows * dw, true);                     // [key][d]
    T* kt = w.wkt.get(g.D * kp, true);                     // [d][key]
    T* vt = w.wvt.get(g.D * kp, true);                     // [d][key]
    T* pb = w.ws.get(rows * kp, false);                    // [query][key]: P
    T* db = w.wds.get(rows * kp, false);                   // [query][key]: dP, then dS
    T* tb = w.wtr.get(rows * kp, true);                    // [key][query]: dS^T, then P^T
    T* ob = w.o.get(rows * dw, false);                     // [row][d] results
    const std::vector<int64_t>& toks = unit_token_table(g, L, w.toks);
    auto tok_off = [&](const int64_t* st, int64_t t) { return token_offset(&toks[4 * t], st, b, h); };
    std::vector<T> lv(rows, T(0)), glv(rows, T(0));
    for (int64_t t = 0; t < nt; ++t) {  // as in forward_whole
        for (const T* p : {q + tok_off(g.sq, t), k + tok_off(g.sk, t), v + tok_off(g.sv, t), gout + tok_off(g.sg, t)})
            prefetch_row(p, g.D);
        for (T* p : {dq, dk, dv}) prefetch_row<1>(p + ((b * g.N + toks[4 * t]) * g.H + h) * g.D, g.D);
    }
    for (int64_t t = 0; t < nt; ++t) {
        const T *qp = q + tok_off(g.sq, t), *kq = k + tok_off(g.sk, t), *vp = v + tok_off(g.sv, t);
        const T* gp = gout + tok_off(g.sg, t);
        for (int64_t d = 0; d < g.D; ++d) {
            qb[t * dw + d] = qp[d];  // scaled below, once the check has seen the values as given
            gb[t * dw + d] = gp[d];
            kb[t * dw + d] = kq[d];
        }
        for (int64_t d = 0; d < g.D; ++d) {
            kt[d * kp + t] = kq[d];
            vt[d * kp + t] = vp[d];
        }
        lv[t] = lse[(b * g.N + toks[4 * t]) * g.H + h];
        glv[t] = glse ? glse[(b * g.N + toks[4 * t]) * g.H + h] : T(0);
    }
    if (!all_finite(qb, rows * dw) || !all_finite(gb, rows * dw) || !all_finite(kb, rows * dw) ||
        !all_finite(vt, g.D * kp) || !all_finite(lv.data(), rows) || !all_finite(glv.data(), rows))
        return false;
    for (int64_t i = 0; i < rows * dw; ++i) qb[i] *= scale;
    const T* bias = whole_bias(L, rpb, h, rows, kp, w);
    gemm(qb, dw, kt, g.D, kp, pb, rows);  // logits
    gemm(gb, dw, vt, g.D, kp, db, rows);  // dP
    for (int64_t i = 0; i < nt; ++i) {
        T *pp = pb + i * kp, *dp = db + i * kp;
        const T* bp = bias + i * kp;
        V delta = V{};
        for (int64_t c = 0; c < kp; c += W) {
            V pv = vexp(loadv<V>(pp + c) + loadv<V>(bp + c) - lv[i]);  // probabilities (0 on padded keys)
            storev(pp + c, pv);
            delta += pv * loadv<V>(dp + c);
        }
        T dsum = 0;
        for (int l = 0; l < W; ++l) dsum += delta[l];
        for (int64_t c = 0; c < kp; c += W) storev(dp + c, loadv<V>(pp + c) * (loadv<V>(dp + c) - dsum + glv[i]));
    }
    // The unit's rows of a gradient from the product in ob, times mul.
    auto write_rows = [&](T* grad, T mul) {
        for (int64_t t = 0; t < nt; ++t) {
            T* op = grad + ((b * g.N + toks[4 * t]) * g.H + h) * g.D;
            for (int64_t d = 0; d < g.D; ++d) op[d] = ob[t * dw + d] * mul;
        }
    };
    // grad = m^T x for m [query][key] (transposed into tb, whose rows past nt stay zero) and x [query][d].
    auto transposed_product = [&](const T* m, const T* x, T* grad) {
        for (int64_t i = 0; i < nt; ++i)
            for (int64_t c = 0; c < nt; ++c) tb[c * kp + i] = m[i * kp + c];
        gemm(tb, kp, x, nt, dw, ob, rows);
        write_rows(grad, T(1));
    };
    gemm(db, kp, kb, nt, dw, ob, rows);  // dq = scale * dS k
    write_rows(dq, scale);
    transposed_product(db, qb, dk);  // dk = dS^T (scale q)
    transposed_product(pb, gb, dv);  // dv = P^T dO
    if (rpb && dri)
        for (int64_t i0 = 0, i = 0; i0 < L.s[0].n; ++i0)
            for (int64_t i1 = 0; i1 < n1; ++i1)
                for (int64_t i2 = 0; i2 < n2; ++i2, ++i)
                    for (int64_t c0 = 0; c0 < L.s[0].n; ++c0)
                        for (int64_t c1 = 0; c1 < n1; ++c1) {
                            T* rp = dri + ((h * L.s[0].rdim + L.s[0].rbase[i0] + c0) * L.s[1].rdim + L.s[1].rbase[i1] +
                                           c1) * L.s[2].rdim + L.s[2].rbase[i2];
                            const T* dsp = db + i * kp + (c0 * n1 + c1) * n2;
                            for (int64_t c2 = 0; c2 < n2; ++c2) rp[c2] += dsp[c2];
                        }
    return true;
}

template <typename T>
bool backward_unit(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, const T* lse,
                   const T* gout, const T* glse, T* dq, T* dk, T* dv, T* dri, int64_t b, int64_t h,
                   const Layout<T>& L, Work<T>& w) {
    using V = typename Vec<T>::V;
    constexpr int W = Layout<T>::W;
    if (L.whole) return backward_whole(g, L, q, k, v, rpb, scale, lse, gout, glse, dq, dk, dv, dri, b, h, w);
    bool fresh = w.fresh(L);  // as in forward_unit
    T* qt = w.qt.get(QB * L.dp * L.lpad, fresh);  // the current block's rows of q and dO
    T* gt = w.gt.get(QB * L.dp * L.lpad, fresh);
    T* kt = w.kt.get(L.rows * L.dp * L.lp, fresh);
    T* vt = w.vt.get(L.rows * L.dp * L.lp, fresh);
    T* lt = w.lse.get(L.rows * L.lpad, fresh);
    T* glt = w.glse.get(L.rows * L.lpad, fresh);
    T* bias = w.bias.get(L.bias_off[L.tiles], false);
    bool finite = pack(g, L, k, g.sk, b, h, T(1), kt, L.lp, L.pad, 0, L.rows) &&
                  pack(g, L, v, g.sv, b, h, T(1), vt, L.lp, L.pad, 0, L.rows) && pack_lanes(g, L, lse, b, h, lt) &&
                  (!glse || pack_lanes(g, L, glse, b, h, glt));
    if (!finite) return false;
    build_bias(L, rpb, h, bias);
    T* dqt = w.dqt.get(QB * L.dp * W, false);
    T* dkt = w.dkt.get(L.rows * L.dp * L.lp, true);
    T* dvt = w.dvt.get(L.rows * L.dp * L.lp, true);
    T* dbias = rpb ? w.dbias.get(L.bias_off[L.tiles], true) : nullptr;
    int64_t slot_size = L.nu_max * W;
    T* sbuf = w.s.get(QB * L.slots * slot_size, false);
    T* dpbuf = w.dps.get(QB * L.slots * slot_size, false);
    for (int64_t i0 = 0; i0 < L.s[0].n; ++i0)
        for (int64_t i1b = 0; i1b < L.s[1].n; i1b += QB) {
            Block blk = make_block(L, i0, i1b);
            // A non-finite value: the scalar path redoes the unit (dk, dv and d_rpb are only written at its end).
            int64_t r0 = i0 * L.s[1].n + i1b;
            if (!pack(g, L, q, g.sq, b, h, scale, qt, L.lpad, 0, r0, blk.nreal) ||
                !pack(g, L, gout, g.sg, b, h, T(1), gt, L.lpad, 0, r0, blk.nreal))
                return false;
            prefetch_rows(g, L, q, g.sq, b, h, r0 + blk.nreal, QB);  // the next block's, while this one computes
            prefetch_rows(g, L, gout, g.sg, b, h, r0 + blk.nreal, QB);
            prefetch_out_rows(g, L, dq, b, h, r0, blk.nreal);  // written at the end of this block
            for (int64_t t = 0; t < L.tiles; ++t) {
                int64_t nu = L.nu[t];
                block_logits(L, blk, t, qt, kt, sbuf);   // logits
                block_logits(L, blk, t, gt, vt, dpbuf);  // dP = dO . v
                for (int j = 0; j < QB; ++j) {
                    if (!blk.real[j]) continue;
                    int64_t row = blk.i0 * L.s[1].n + blk.i1[j];
                    V lv = loadv<V>(lt + row * L.lpad + t * W);
                    V gl = glse ? loadv<V>(glt + row * L.lpad + t * W) : V{};
                    V delta = V{};
                    for_slots(L, blk, j, t, sbuf, bias, [&](T* sp, const T* bp, int64_t) {
                        T* dpp = dpbuf + (sp - sbuf);
                        for (int64_t u = 0; u < nu; ++u) {
                            V pv = vexp(loadv<V>(sp + u * W) + loadv<V>(bp + u * W) - lv);  // probabilities
                            storev(sp + u * W, pv);
                            delta += pv * loadv<V>(dpp + u * W);
                        }
                    });
                    for_slots(L, blk, j, t, sbuf, bias, [&](T* sp, const T*, int64_t R) {
                        T* dpp = dpbuf + (sp - sbuf);
                        T* db = dbias ? dbias + L.bias_off[t] + R * nu * W : nullptr;
                        for (int64_t u = 0; u < nu; ++u) {
                            V ds = loadv<V>(sp + u * W) * (loadv<V>(dpp + u * W) - delta + gl);  // d loss / d logit
                            storev(dpp + u * W, ds);
                            if (db) storev(db + u * W, loadv<V>(db + u * W) + ds);
                        }
                    });
                }
                block_weighted_sum(L, blk, t, dpbuf, kt, dqt);  // dq / scale
                block_scatter(L, blk, t, dpbuf, qt, dkt);       // dk (q carries the scale)
                block_scatter(L, blk, t, sbuf, gt, dvt);        // dv
                for (int j = 0; j < QB; ++j)
                    if (blk.real[j])
                        unpack_lanes(g, dqt + j * L.dp * W, W, V{} + scale, dq, b, h, L.token(g, i0, blk.i1[j], t * W),
                                     int(std::min<int64_t>(W, L.s[2].n - t * W)));
            }
        }
    // Unpack dk, dv (the unit owns these key tokens) and add d_rpb.
    for (int64_t i0 = 0; i0 < L.s[0].n; ++i0)
        for (int64_t i1 = 0; i1 < L.s[1].n; ++i1) {
            int64_t off = (i0 * L.s[1].n + i1) * L.dp * L.lp + L.pad;
            for (int64_t x0 = 0; x0 < L.s[2].n; x0 += W) {
                int n = int(std::min<int64_t>(W, L.s[2].n - x0));
                unpack_lanes(g, dkt + off + x0, L.lp, V{} + T(1), dk, b, h, L.token(g, i0, i1, x0), n);
                unpack_lanes(g, dvt + off + x0, L.lp, V{} + T(1), dv, b, h, L.token(g, i0, i1, x0), n);
            }
        }
    if (dbias) {
        const Sub& s2 = L.s[2];
        for (int64_t t = 0; t < L.tiles; ++t)
            for (int64_t R = 0; R < L.nrb; ++R)
                for (int64_t u = 0; u < L.nu[t]; ++u)
                    for (int l = 0; l < W; ++l) {
                        int64_t x = t * W + l, key = x + L.umin[t] + u;
                        if (x < s2.n && key >= s2.start[x] && key < s2.start[x] + s2.count[x])
                            dri[(h * L.nrb + R) * s2.rdim + s2.rbase[x] + key - s2.start[x]] +=
                                dbias[L.bias_off[t] + (R * L.nu[t] + u) * W + l];
                    }
    }
    return true;
}

// ----------------------------------------------------------------------------------------------------------------
// Drivers: units over threads, the scalar path for units the vector path refuses.

inline int64_t groups(const Geometry& g) { return g.ax[0].dil * g.ax[1].dil * g.ax[2].dil; }

// True without rpb or when every rpb value is finite.
template <typename T>
bool rpb_finite(const Geometry& g, const T* rpb) {
    return !rpb || all_finite(rpb, g.H * g.ax[0].rdim * g.ax[1].rdim * g.ax[2].rdim);
}

// The layouts of the dilation groups, built once per call and shared (read-only) by the threads.
template <typename T>
std::vector<Layout<T>> group_layouts(const Geometry& g, bool has_rpb) {
    std::vector<Layout<T>> layouts;
    layouts.reserve(size_t(groups(g)));
    for (int64_t gi = 0; gi < groups(g); ++gi) {
        int64_t group[3] = {gi / (g.ax[2].dil * g.ax[1].dil), (gi / g.ax[2].dil) % g.ax[1].dil, gi % g.ax[2].dil};
        layouts.emplace_back(g, group, has_rpb);
    }
    return layouts;
}

// Unit = (b * H + h) * groups + dilation group.
inline void unit_coords(const Geometry& g, int64_t unit, int64_t* b, int64_t* h, int64_t* gi) {
    int64_t bh = unit / groups(g);
    *gi = unit % groups(g);
    *h = bh % g.H;
    *b = bh / g.H;
}

// Calls fn(token) for every global token of a unit's dilation group.
template <typename F>
void unit_tokens(const Geometry& g, const int64_t* group, F fn) {
    for (int64_t x0 = group[0]; x0 < g.ax[0].length; x0 += g.ax[0].dil)
        for (int64_t x1 = group[1]; x1 < g.ax[1].length; x1 += g.ax[1].dil)
            for (int64_t x2 = group[2]; x2 < g.ax[2].length; x2 += g.ax[2].dil)
                fn((x0 * g.ax[1].length + x1) * g.ax[2].length + x2);
}

template <typename T>
void forward(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, T* out, T* lse,
             int nthreads) {
    const std::vector<Layout<T>> layouts = group_layouts<T>(g, rpb != nullptr);
    const bool vector_path = rpb_finite(g, rpb);  // else every unit takes the scalar path
    parallel(g.B * g.H * groups(g), nthreads, [&](int64_t lo, int64_t hi, int) {
        std::unique_ptr<Work<T>> w = work_cache<T>().take();
        w->wbias_key.clear();  // the bias table holds this call's rpb values only
        ScalarScratch<T> sw(g);
        for (int64_t unit = lo; unit < hi; ++unit) {
            int64_t b, h, gi;
            unit_coords(g, unit, &b, &h, &gi);
            const Layout<T>& L = layouts[size_t(gi)];
            if (!vector_path || !forward_unit(g, q, k, v, rpb, scale, out, lse, b, h, L, *w))
                unit_tokens(g, L.grp, [&](int64_t i) { forward_query(g, q, k, v, rpb, scale, out, lse, b, h, i, sw); });
        }
        work_cache<T>().give(std::move(w));
    });
}

template <typename T>
void backward(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, const T* lse,
              const T* gout, const T* glse, T* dq, T* dk, T* dv, T* drpb, int nthreads) {
    // dq, dk, dv and drpb arrive uninitialised: every unit writes its own tokens' rows, the scalar path after zeroing
    // its dk/dv rows (it accumulates). drpb gets one private copy per thread; their sum is written at the end.
    int64_t rsize = g.H * g.ax[0].rdim * g.ax[1].rdim * g.ax[2].rdim;
    int64_t units = g.B * g.H * groups(g);
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, units));
    std::vector<std::vector<T>> dr(drpb ? nt : 0, std::vector<T>(rsize, T(0)));
    const std::vector<Layout<T>> layouts = group_layouts<T>(g, rpb != nullptr);
    const bool vector_path = rpb_finite(g, rpb);  // else every unit takes the scalar path
    parallel(units, int(nt), [&](int64_t lo, int64_t hi, int thread) {
        std::unique_ptr<Work<T>> w = work_cache<T>().take();
        w->wbias_key.clear();  // the bias table holds this call's rpb values only
        ScalarScratch<T> sw(g);
        T* dri = drpb ? dr[thread].data() : nullptr;
        for (int64_t unit = lo; unit < hi; ++unit) {
            int64_t b, h, gi;
            unit_coords(g, unit, &b, &h, &gi);
            const Layout<T>& L = layouts[size_t(gi)];
            if (!vector_path || !backward_unit(g, q, k, v, rpb, scale, lse, gout, glse, dq, dk, dv, dri, b, h, L, *w)) {
                unit_tokens(g, L.grp, [&](int64_t i) {
                    std::fill(dk + ((b * g.N + i) * g.H + h) * g.D, dk + ((b * g.N + i) * g.H + h + 1) * g.D, T(0));
                    std::fill(dv + ((b * g.N + i) * g.H + h) * g.D, dv + ((b * g.N + i) * g.H + h + 1) * g.D, T(0));
                });
                unit_tokens(g, L.grp, [&](int64_t i) {
                    backward_query(g, q, k, v, rpb, scale, lse, gout, glse, dq, dk, dv, dri, b, h, i, sw);
                });
            }
        }
        work_cache<T>().give(std::move(w));
    });
    if (drpb) {
        std::fill(drpb, drpb + rsize, T(0));
        for (auto& part : dr)
            for (int64_t r = 0; r < rsize; ++r) drpb[r] += part[r];
    }
}

Geometry geometry(int64_t B, int64_t H, int64_t D, int n, const int64_t* spatial, const int64_t* kernel,
                  const int64_t* stride, const int64_t* dilation, const int64_t* causal, const int64_t* strides,
                  int ninputs) {
    // strides: per input (q, k, v[, dO]) its n + 3 element strides [batch, *spatial, head, head_dim].
    Geometry g;
    int64_t* dst[4] = {g.sq, g.sk, g.sv, g.sg};
    for (int t = 0; t < 4; ++t) {
        const int64_t* st = strides + (t < ninputs ? t : 0) * (n + 3);
        dst[t][0] = st[0];
        for (int a = 0; a < 3; ++a) dst[t][1 + a] = a < 3 - n ? 0 : st[1 + a - (3 - n)];
        dst[t][4] = st[n + 1];
    }
    g.B = B;
    g.H = H;
    g.D = D;
    g.N = 1;
    g.window = 1;
    for (int a = 0; a < 3; ++a) {
        int src = a - (3 - n);  // lower ranks: leading axes of length 1 with a window of 1
        if (src < 0) {
            g.ax[a] = make_axis(1, 1, 1, 1, false);
        } else {
            g.ax[a] = make_axis(spatial[src], kernel[src], stride[src], dilation[src], causal[src] != 0);
            g.N *= spatial[src];
            g.window *= kernel[src];
        }
    }
    return g;
}

}  // namespace

extern "C" {

int natzoo_na_cpu_version() { return 3; }

#define NATZOO_DEFINE(T, SUFFIX)                                                                                    \
    void natzoo_na_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, int64_t B,     \
                                    int64_t H, int64_t D, int n, const int64_t* spatial, const int64_t* kernel,      \
                                    const int64_t* stride, const int64_t* dilation, const int64_t* causal,           \
                                    const int64_t* strides, double scale, int nthreads) {                            \
        Geometry g = geometry(B, H, D, n, spatial, kernel, stride, dilation, causal, strides, 3);                   \
        forward<T>(g, q, k, v, rpb, T(scale), out, lse, nthreads);                                                  \
    }                                                                                                                \
    void natzoo_na_backward_##SUFFIX(const T* q, const T* k, const T* v, const T* rpb, const T* lse, const T* gout,  \
                                     const T* glse, T* dq, T* dk, T* dv, T* drpb, int64_t B, int64_t H, int64_t D,   \
                                     int n, const int64_t* spatial, const int64_t* kernel, const int64_t* stride,    \
                                     const int64_t* dilation, const int64_t* causal, const int64_t* strides,         \
                                     double scale, int nthreads) {                                                   \
        Geometry g = geometry(B, H, D, n, spatial, kernel, stride, dilation, causal, strides, 4);                   \
        backward<T>(g, q, k, v, rpb, T(scale), lse, gout, glse, dq, dk, dv, drpb, nthreads);                        \
    }

NATZOO_DEFINE(float, f32)
NATZOO_DEFINE(double, f64)

}  // extern "C"
