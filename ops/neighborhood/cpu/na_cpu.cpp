// natzoo CPU kernels for fused neighborhood attention (forward and backward), loaded with ctypes.
//
// Supports: 1-D/2-D/3-D (lower ranks are padded to 3 axes of length 1), any kernel size (even included), stride,
// dilation, causal masking per axis, relative positional bias, the log-sum-exp output, float32 and float64 (the
// Python side computes float16/bfloat16 in float32). Inputs are contiguous [B, N, H, D] (N = flattened spatial
// tokens, row-major), rpb [H, 2k_0-1, 2k_1-1, 2k_2-1] in the compute dtype, lse [B, N, H].
// No Python or torch headers: plain C ABI, so one build serves every Python and torch version.
// Threads: the caller passes torch.get_num_threads(); each call starts that many std::threads over disjoint work
// (forward: ranges of (batch, head, query); backward: whole (batch, head) pairs, so dk/dv writes never race) and
// joins them before returning, while torch's own pool waits for the call: no second pool stays alive.
// NaN/inf follow the reference: a non-finite key or value row makes exactly the queries whose window holds it
// non-finite (a NaN logit or a non-finite output component turns the whole output row and its lse into NaN).
// Tested: tests/test_ops_reference.py (float64 oracle: outputs, lse, all gradients, gradcheck, low precision, NaN/inf
// against the reference) and tests/test_ops_cpu.py (dispatch, build fallback, threads, torch.compile, export), with
// g++ 12.2 on x86-64 (AVX-512), 2 shared cores. Not tried: clang, MSVC (the build needs a g++-compatible driver),
// ARM.
// Known limits: no attention dropout, no second-order gradients (the reference has both); one query at a time
// (no reuse of a loaded key across the queries sharing it: a few percent of the FMA rate, docs/benchmarks.md); the
// backward parallelises over (batch, head) pairs only, so batch * heads below the thread count leaves threads idle.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

namespace {

struct Axis {
    // Per coordinate i of one axis: first key (global coordinate), key count, and rpb index of that first key.
    std::vector<int64_t> start, count, rbase;
    int64_t length, dil, rdim;
};

Axis make_axis(int64_t length, int64_t kernel, int64_t stride, int64_t dil, bool causal) {
    Axis a;
    a.length = length;
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
    const int64_t* spatial;
};

template <typename F>
void parallel(int64_t total, int nthreads, F fn) {
    // fn(lo, hi, thread) over `nthreads` contiguous ranges of [0, total).
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, total));
    if (nt == 1) {
        fn(int64_t(0), total, 0);
        return;
    }
    std::vector<std::thread> pool;
    for (int64_t t = 0; t < nt; ++t) {
        int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
        pool.emplace_back([=, &fn] { fn(lo, hi, int(t)); });
    }
    for (auto& th : pool) th.join();
}

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
    const T* qp = q + ((b * g.N + i) * g.H + h) * g.D;
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
                T v = dot(qp, k + ((b * g.N + tok) * g.H + h) * g.D, g.D) * scale;
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
void forward(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, T* out, T* lse,
             int nthreads) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    parallel(g.B * g.H * g.N, nthreads, [&](int64_t lo, int64_t hi, int) {
        std::vector<T> s(g.window), acc(g.D);
        std::vector<int64_t> kt(g.window), rix(g.window);
        for (int64_t t = lo; t < hi; ++t) {
            // t runs over (b, h, i) with i fastest: neighbouring queries reuse the same keys from cache.
            int64_t i = t % g.N, bh = t / g.N, h = bh % g.H, b = bh / g.H;
            int64_t n = logits(g, q, k, rpb, scale, b, h, i, s.data(), kt.data(), rix.data());
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
            std::fill(acc.begin(), acc.end(), T(0));
            T inv = T(1) / sum;
            for (int64_t j = 0; j < n; ++j) axpy(s[j] * inv, v + ((b * g.N + kt[j]) * g.H + h) * g.D, acc.data(), g.D);
            T* op = out + ((b * g.N + i) * g.H + h) * g.D;
            T check = 0;
            for (int64_t d = 0; d < g.D; ++d) check += acc[d] * T(0);  // NaN when any component is not finite
            bad |= std::isnan(check) || std::isnan(mx) || std::isnan(sum);
            for (int64_t d = 0; d < g.D; ++d) op[d] = bad ? nan : acc[d];
            lse[(b * g.N + i) * g.H + h] = bad ? nan : mx + std::log(sum);
        }
    });
}

template <typename T>
void backward(const Geometry& g, const T* q, const T* k, const T* v, const T* rpb, T scale, const T* lse,
              const T* gout, const T* glse, T* dq, T* dk, T* dv, T* drpb, int nthreads) {
    // dq, dk, dv and drpb arrive zeroed. drpb gets one private copy per thread, summed at the end.
    int64_t rsize = g.H * g.ax[0].rdim * g.ax[1].rdim * g.ax[2].rdim;
    int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, g.B * g.H));
    std::vector<std::vector<T>> dr(drpb ? nt : 0, std::vector<T>(rsize, T(0)));
    parallel(g.B * g.H, int(nt), [&](int64_t lo, int64_t hi, int thread) {
        std::vector<T> s(g.window), dp(g.window), acc(g.D), qs(g.D);
        std::vector<int64_t> kt(g.window), rix(g.window);
        T* dri = drpb ? dr[thread].data() : nullptr;
        for (int64_t bh = lo; bh < hi; ++bh) {
            int64_t h = bh % g.H, b = bh / g.H;
            for (int64_t i = 0; i < g.N; ++i) {
                int64_t row = (b * g.N + i) * g.H + h;
                int64_t n = logits(g, q, k, rpb, scale, b, h, i, s.data(), kt.data(), rix.data());
                const T* gp = gout + row * g.D;
                T l = lse[row], gl = glse ? glse[row] : T(0), delta = 0;
                for (int64_t j = 0; j < n; ++j) {
                    s[j] = std::exp(s[j] - l);  // probabilities
                    dp[j] = dot(gp, v + ((b * g.N + kt[j]) * g.H + h) * g.D, g.D);
                    delta += s[j] * dp[j];
                }
                std::fill(acc.begin(), acc.end(), T(0));
                const T* qp = q + row * g.D;
                for (int64_t d = 0; d < g.D; ++d) qs[d] = qp[d] * scale;
                for (int64_t j = 0; j < n; ++j) {
                    int64_t kr = ((b * g.N + kt[j]) * g.H + h) * g.D;
                    T ds = s[j] * (dp[j] - delta + gl);  // d loss / d logit
                    axpy(ds, k + kr, acc.data(), g.D);
                    axpy(ds, qs.data(), dk + kr, g.D);
                    axpy(s[j], gp, dv + kr, g.D);
                    if (dri) dri[h * (rsize / g.H) + rix[j]] += ds;
                }
                T* dqp = dq + row * g.D;
                for (int64_t d = 0; d < g.D; ++d) dqp[d] = acc[d] * scale;
            }
        }
    });
    if (drpb)
        for (auto& part : dr)
            for (int64_t r = 0; r < rsize; ++r) drpb[r] += part[r];
}

Geometry geometry(int64_t B, int64_t H, int64_t D, int n, const int64_t* spatial, const int64_t* kernel,
                  const int64_t* stride, const int64_t* dilation, const int64_t* causal) {
    Geometry g;
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

int natzoo_na_cpu_version() { return 1; }

#define NATZOO_DEFINE(T, SUFFIX)                                                                                    \
    void natzoo_na_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, int64_t B,     \
                                    int64_t H, int64_t D, int n, const int64_t* spatial, const int64_t* kernel,      \
                                    const int64_t* stride, const int64_t* dilation, const int64_t* causal,           \
                                    double scale, int nthreads) {                                                    \
        Geometry g = geometry(B, H, D, n, spatial, kernel, stride, dilation, causal);                               \
        forward<T>(g, q, k, v, rpb, T(scale), out, lse, nthreads);                                                  \
    }                                                                                                                \
    void natzoo_na_backward_##SUFFIX(const T* q, const T* k, const T* v, const T* rpb, const T* lse, const T* gout,  \
                                     const T* glse, T* dq, T* dk, T* dv, T* drpb, int64_t B, int64_t H, int64_t D,   \
                                     int n, const int64_t* spatial, const int64_t* kernel, const int64_t* stride,    \
                                     const int64_t* dilation, const int64_t* causal, double scale, int nthreads) {   \
        Geometry g = geometry(B, H, D, n, spatial, kernel, stride, dilation, causal);                               \
        backward<T>(g, q, k, v, rpb, T(scale), lse, gout, glse, dq, dk, dv, drpb, nthreads);                        \
    }

NATZOO_DEFINE(float, f32)
NATZOO_DEFINE(double, f64)

}  // extern "C"
