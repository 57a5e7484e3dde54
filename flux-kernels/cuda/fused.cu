// Fused elementwise kernels of the FLUX blocks, each one pass over memory where the composite
// path makes several. They round to the storage dtype where the composite path does, so in f32
// they agree with it to the last bits and in bf16/f16 to one rounding.
//
// - qk_norm_rope: RMSNorm with a learned scale, then RoPE on interleaved pairs, reading a
//   strided (B, H, L, D) view (q or k straight out of the qkv projection) and writing it
//   contiguous.
// - ln_modulate: LayerNorm without affine, then adaLN `(1 + scale)·x + shift`.
// - gated_residual: `x + gate·y`, gate broadcast over the tokens.
// - gelu_tanh: GELU with the tanh approximation, in f32, one pass (the composite is three).
// - cat_gelu: `[a, gelu(m)]` along channels (the single block's linear2 input), one pass instead
//   of a GELU pass and a concatenation pass.
// - bias_add: `y + b` with b broadcast over rows (the Linear layer's bias; candle's broadcast
//   add indexes every element through its strided path and costs several times more).
// - fp8_absmax + fp8_quantize: an fp8 GEMM's activations, e4m3 with one scale per tensor
//   (max |x| / 448): the first pass leaves one partial maximum per block, the second reduces
//   those (a few hundred values, from L2) in every block and converts; no host round trip, no
//   memset. `fp8_round` writes the decoded values instead of the bytes (the emulation and the
//   check of the rounding against the CPU's, which rounds identically: ties to even, ±inf to
//   ±448, NaN to 0).
// - dequant_{q8_0,q4_k,q6_k,fp8_e4m3,fp8_e5m2}: packed weights decoded into the GEMM's dtype in
//   one pass, one thread per value, with ggml's (and the CPU decoder's) arithmetic in its order
//   and without contraction into FMAs (__fmul_rn/__fsub_rn), so the f32 values equal the CPU's
//   bit for bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace {

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f(float x) { return x; }
template <>
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }

// Rounds an f32 value to T's precision and back.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f<T>(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(s);
}

// One warp per (b, h, l) row of D elements.
// x: strided (B, H, L, D) view, D contiguous; scale: (D); cos/sin: (Bp, L, D/2) with Bp 1 or B;
// out: contiguous (B, H, L, D).
template <typename T>
__device__ void qk_norm_rope(const T* __restrict__ x, const T* __restrict__ scale, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t, T* __restrict__ out, int b_, int h_, int l_, int d,
                             long long sb, long long sh, long long sl, int table_batched, float eps) {
    const int warps_per_block = blockDim.x / 32;
    const long long row = (long long)blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (long long)b_ * h_ * l_) return;
    const int l = row % l_;
    const int h = (row / l_) % h_;
    const int b = row / ((long long)l_ * h_);
    const T* xr = x + b * sb + h * sh + l * sl;
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) {
        const float v = to_f(xr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float rrms = 1.f / sqrtf(__fadd_rn(ss / d, eps));
    const long long trow = ((long long)(table_batched ? b : 0) * l_ + l) * (d / 2);
    T* orow = out + row * d;
    for (int p = lane; p < d / 2; p += 32) {
        const float n0 = round_to<T>(__fmul_rn(to_f(xr[2 * p]), rrms));
        const float n1 = round_to<T>(__fmul_rn(to_f(xr[2 * p + 1]), rrms));
        const float y0 = round_to<T>(__fmul_rn(n0, to_f(scale[2 * p])));
        const float y1 = round_to<T>(__fmul_rn(n1, to_f(scale[2 * p + 1])));
        const float c = cos_t[trow + p], s = sin_t[trow + p];
        orow[2 * p] = from_f<T>(__fsub_rn(__fmul_rn(y0, c), __fmul_rn(y1, s)));
        orow[2 * p + 1] = from_f<T>(__fadd_rn(__fmul_rn(y0, s), __fmul_rn(y1, c)));
    }
}

// One block per token row of C elements. x: contiguous (B, L, C); shift/scale: (B, C) rows
// `mod_stride` apart, C contiguous; out: contiguous (B, L, C).
template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                            T* __restrict__ out, int l_, int c, long long mod_stride, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const int b = row / l_;
    const T* xr = x + row * c;
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += to_f(xr[i]);
    const float mean = block_sum(s, scratch) / c;
    float v = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float d = __fsub_rn(to_f(xr[i]), mean);
        v += d * d;
    }
    const float var = block_sum(v, scratch) / c;
    const float rstd = 1.f / sqrtf(__fadd_rn(var, eps));
    const T* sh = shift + b * mod_stride;
    const T* sc = scale + b * mod_stride;
    T* orow = out + row * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float n = round_to<T>(__fmul_rn(__fsub_rn(to_f(xr[i]), mean), rstd));
        const float one_plus = round_to<T>(__fadd_rn(to_f(sc[i]), 1.f));
        const float m = round_to<T>(__fmul_rn(one_plus, n));
        orow[i] = from_f<T>(__fadd_rn(m, to_f(sh[i])));
    }
}

// x, y: contiguous (B, L, C); gate: (B, C) rows `gate_stride` apart; out = x + gate·y.
// `vec_ok`: every pointer, C and the gate stride allow 16-byte vectors.
template <typename T>
__device__ void gated_residual(const T* __restrict__ x, const T* __restrict__ gate, const T* __restrict__ y,
                               T* __restrict__ out, long long n, int l_, int c, long long gate_stride, int vec_ok) {
    constexpr int kVec = 16 / sizeof(T);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long start = 0;
    if (vec_ok) {
        const long long nv = n / kVec;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
            const long long e = i * kVec;
            const int ch = e % c;
            const int b = e / ((long long)l_ * c);
            uint4 xv = reinterpret_cast<const uint4*>(x)[i];
            const uint4 yv = reinterpret_cast<const uint4*>(y)[i];
            const uint4 gv = *reinterpret_cast<const uint4*>(gate + b * gate_stride + ch);
            T* xe = reinterpret_cast<T*>(&xv);
            const T* ye = reinterpret_cast<const T*>(&yv);
            const T* ge = reinterpret_cast<const T*>(&gv);
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                const float gy = round_to<T>(__fmul_rn(to_f(ge[j]), to_f(ye[j])));
                xe[j] = from_f<T>(__fadd_rn(to_f(xe[j]), gy));
            }
            reinterpret_cast<uint4*>(out)[i] = xv;
        }
        start = nv * kVec;
    }
    for (long long i = start + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int ch = i % c;
        const int b = i / ((long long)l_ * c);
        const float gy = round_to<T>(__fmul_rn(to_f(gate[b * gate_stride + ch]), to_f(y[i])));
        out[i] = from_f<T>(__fadd_rn(to_f(x[i]), gy));
    }
}

// GELU (tanh approximation). f32 results use tanhf, as the composite path; bf16/f16 results use
// the identity 0.5·(1 + tanh(u)) = 1/(1 + e^(−2u)) with the fast exponential, whose error is far
// below their rounding (tanhf alone made the kernel compute-bound).
template <typename T>
__device__ __forceinline__ float gelu_f(float v) {
    const float inner = 0.7978845608028654f * v * (1.f + 0.044715f * v * v);
    if (sizeof(T) == 4) return 0.5f * v * (1.f + tanhf(inner));
    return __fdividef(v, 1.f + __expf(-2.f * inner));
}

// x contiguous; `vec_ok`: both pointers allow 16-byte vectors.
template <typename T>
__device__ void gelu_tanh(const T* __restrict__ x, T* __restrict__ out, long long n, int vec_ok) {
    constexpr int kVec = 16 / sizeof(T);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long start = 0;
    if (vec_ok) {
        const long long nv = n / kVec;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
            uint4 v = reinterpret_cast<const uint4*>(x)[i];
            T* e = reinterpret_cast<T*>(&v);
#pragma unroll
            for (int j = 0; j < kVec; ++j) e[j] = from_f<T>(gelu_f<T>(to_f(e[j])));
            reinterpret_cast<uint4*>(out)[i] = v;
        }
        start = nv * kVec;
    }
    for (long long i = start + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = from_f<T>(gelu_f<T>(to_f(x[i])));
}

// One block per token row. a: (rows, ca) rows `a_stride` apart; m: (rows, cm) rows `m_stride`
// apart; out: contiguous (rows, ca + cm). `vec_ok`: pointers, widths and strides allow 16-byte
// vectors.
template <typename T>
__device__ void cat_gelu(const T* __restrict__ a, const T* __restrict__ m, T* __restrict__ out, int ca, int cm,
                         long long a_stride, long long m_stride, int vec_ok) {
    constexpr int kVec = 16 / sizeof(T);
    const long long row = blockIdx.x;
    const T* ar = a + row * a_stride;
    const T* mr = m + row * m_stride;
    T* orow = out + row * (long long)(ca + cm);
    if (vec_ok) {
        for (int i = threadIdx.x; i < ca / kVec; i += blockDim.x)
            reinterpret_cast<uint4*>(orow)[i] = reinterpret_cast<const uint4*>(ar)[i];
        for (int i = threadIdx.x; i < cm / kVec; i += blockDim.x) {
            uint4 v = reinterpret_cast<const uint4*>(mr)[i];
            T* e = reinterpret_cast<T*>(&v);
#pragma unroll
            for (int j = 0; j < kVec; ++j) e[j] = from_f<T>(gelu_f<T>(to_f(e[j])));
            reinterpret_cast<uint4*>(orow + ca)[i] = v;
        }
    } else {
        for (int i = threadIdx.x; i < ca; i += blockDim.x) orow[i] = ar[i];
        for (int i = threadIdx.x; i < cm; i += blockDim.x) orow[ca + i] = from_f<T>(gelu_f<T>(to_f(mr[i])));
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Maximum over the block (as block_sum); every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = lane < warps ? scratch[lane] : 0.f;
    return warp_max(s);
}

// partial[blockIdx.x] = max |x| over the finite values this block's grid-stride share holds.
template <typename T>
__device__ void fp8_absmax(const T* __restrict__ x, long long n, float* __restrict__ partial) {
    __shared__ float scratch[32];
    float m = 0.f;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = fabsf(to_f(x[i]));
        if (isfinite(v)) m = fmaxf(m, v);
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = m;
}

// The e4m3 bytes of x / scale (q, with the scale written to *scale_out by block 0) or, with q
// null, the decoded values `byte · scale` in T (rounded).
template <typename T>
__device__ void fp8_quantize(const T* __restrict__ x, long long n, const float* __restrict__ partial, int parts,
                             unsigned char* __restrict__ q, float* __restrict__ scale_out, T* __restrict__ rounded) {
    __shared__ float scratch[32];
    float m = 0.f;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) m = fmaxf(m, partial[i]);
    m = block_max(m, scratch);
    const float scale = m > 0.f ? m / 448.f : 1.f;
    if (scale_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = to_f(x[i]);
        v = isnan(v) ? 0.f : v / scale;
        const __nv_fp8_storage_t b = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
        if (q != nullptr) {
            q[i] = b;
        } else {
            __nv_fp8_e4m3 f;
            f.__x = b;
            rounded[i] = from_f<T>(static_cast<float>(f) * scale);
        }
    }
}

__device__ __forceinline__ float half_at(const unsigned char* p) {
    return __half2float(*reinterpret_cast<const __half*>(p));
}

// Q8_0: 34-byte blocks of 32 values, f16 d then 32 int8: q·d.
__device__ __forceinline__ float q8_0_value(const unsigned char* w, long long i) {
    const unsigned char* b = w + (i / 32) * 34;
    return __fmul_rn(static_cast<float>(static_cast<signed char>(b[2 + i % 32])), half_at(b));
}

// Q4_K: 144-byte blocks of 256 values: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs,
// 128 bytes of nibbles (64 values per 32 bytes: low nibbles first, then high).
__device__ __forceinline__ float q4_k_value(const unsigned char* w, long long i) {
    const unsigned char* b = w + (i / 256) * 144;
    const int r = (int)(i % 256), j64 = r / 64, within = r % 64, l = within % 32;
    const int is = 2 * j64 + (within >= 32 ? 1 : 0);
    const unsigned char* sc = b + 4;
    int s, m;
    if (is < 4) {
        s = sc[is] & 63;
        m = sc[is + 4] & 63;
    } else {
        s = (sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4);
        m = (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4);
    }
    const unsigned char q = b[16 + j64 * 32 + l];
    const int nib = within < 32 ? (q & 0xF) : (q >> 4);
    const float d1 = __fmul_rn(half_at(b), (float)s), m1 = __fmul_rn(half_at(b + 2), (float)m);
    return __fsub_rn(__fmul_rn(d1, (float)nib), m1);
}

// Q6_K: 210-byte blocks of 256 values: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16
// int8 scales, f16 d; (d·scale)·(q − 32).
__device__ __forceinline__ float q6_k_value(const unsigned char* w, long long i) {
    const unsigned char* b = w + (i / 256) * 210;
    const int r = (int)(i % 256), idx = r / 128, rr = r % 128, quarter = rr / 32, l = rr % 32;
    const unsigned char* ql = b + 64 * idx;
    const unsigned char* qh = b + 128 + 32 * idx;
    const signed char* sc = reinterpret_cast<const signed char*>(b + 192) + 8 * idx;
    const int is = l / 16;
    int q;
    switch (quarter) {
        case 0: q = (ql[l] & 0xF) | ((qh[l] & 3) << 4); break;
        case 1: q = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4); break;
        case 2: q = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4); break;
        default: q = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4); break;
    }
    const float ds = __fmul_rn(half_at(b + 208), (float)sc[is + 2 * quarter]);
    return __fmul_rn(ds, (float)(q - 32));
}

// fp8 bytes times the scale: none (`per` 0), one for the tensor (`per` 1) or one per row of
// `cols` values (`per` 2).
template <bool E4M3>
__device__ __forceinline__ float fp8_value(const unsigned char* w, const float* scale, int per, long long cols,
                                           long long i) {
    float v;
    if (E4M3) {
        __nv_fp8_e4m3 f;
        f.__x = w[i];
        v = static_cast<float>(f);
    } else {
        __nv_fp8_e5m2 f;
        f.__x = w[i];
        v = static_cast<float>(f);
    }
    if (per == 1) return __fmul_rn(v, scale[0]);
    if (per == 2) return __fmul_rn(v, scale[i / cols]);
    return v;
}

// y: contiguous (rows, cols); b: (cols). 16-byte vectors when cols allows it.
template <typename T>
__device__ void bias_add(const T* __restrict__ y, const T* __restrict__ b, T* __restrict__ out, long long n, int cols,
                         int vec_ok) {
    constexpr int kVec = 16 / sizeof(T);
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (vec_ok && cols % kVec == 0) {
        const long long nv = n / kVec;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
            uint4 yv = reinterpret_cast<const uint4*>(y)[i];
            const int c0 = (int)((i * kVec) % cols);
            const uint4 bv = *reinterpret_cast<const uint4*>(b + c0);
            T* ye = reinterpret_cast<T*>(&yv);
            const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
            for (int j = 0; j < kVec; ++j) ye[j] = from_f<T>(to_f(ye[j]) + to_f(be[j]));
            reinterpret_cast<uint4*>(out)[i] = yv;
        }
    } else {
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            out[i] = from_f<T>(to_f(y[i]) + to_f(b[i % cols]));
    }
}

}  // namespace

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

#define FUSED(SUFFIX, T)                                                                                   \
    extern "C" __global__ void qk_norm_rope_##SUFFIX(const T* x, const T* scale, const float* cos_t,       \
                                                     const float* sin_t, T* out, int b, int h, int l, int d, \
                                                     long long sb, long long sh, long long sl,               \
                                                     int table_batched, float eps) {                        \
        qk_norm_rope<T>(x, scale, cos_t, sin_t, out, b, h, l, d, sb, sh, sl, table_batched, eps);           \
    }                                                                                                      \
    extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const T* shift, const T* scale, T* out,    \
                                                    int l, int c, long long mod_stride, float eps) {        \
        ln_modulate<T>(x, shift, scale, out, l, c, mod_stride, eps);                                        \
    }                                                                                                      \
    extern "C" __global__ void gated_residual_##SUFFIX(const T* x, const T* gate, const T* y, T* out,      \
                                                       long long n, int l, int c, long long gate_stride,    \
                                                       int vec_ok) {                                        \
        gated_residual<T>(x, gate, y, out, n, l, c, gate_stride, vec_ok);                                   \
    }                                                                                                      \
    extern "C" __global__ void gelu_tanh_##SUFFIX(const T* x, T* out, long long n, int vec_ok) {           \
        gelu_tanh<T>(x, out, n, vec_ok);                                                                    \
    }                                                                                                      \
    extern "C" __global__ void cat_gelu_##SUFFIX(const T* a, const T* m, T* out, int ca, int cm,           \
                                                 long long a_stride, long long m_stride, int vec_ok) {     \
        cat_gelu<T>(a, m, out, ca, cm, a_stride, m_stride, vec_ok);                                         \
    }                                                                                                      \
    extern "C" __global__ void bias_add_##SUFFIX(const T* y, const T* b, T* out, long long n, int cols,     \
                                                 int vec_ok) {                                             \
        bias_add<T>(y, b, out, n, cols, vec_ok);                                                            \
    }                                                                                                      \
    extern "C" __global__ void fp8_absmax_##SUFFIX(const T* x, long long n, float* partial) {               \
        fp8_absmax<T>(x, n, partial);                                                                       \
    }                                                                                                      \
    extern "C" __global__ void fp8_quantize_##SUFFIX(const T* x, long long n, const float* partial,        \
                                                     int parts, unsigned char* q, float* scale_out,         \
                                                     T* rounded) {                                          \
        fp8_quantize<T>(x, n, partial, parts, q, scale_out, rounded);                                       \
    }                                                                                                      \
    extern "C" __global__ void dequant_q8_0_##SUFFIX(const unsigned char* w, T* out, long long n) {        \
        GRID_STRIDE(i, n) out[i] = from_f<T>(q8_0_value(w, i));                                             \
    }                                                                                                      \
    extern "C" __global__ void dequant_q4_k_##SUFFIX(const unsigned char* w, T* out, long long n) {        \
        GRID_STRIDE(i, n) out[i] = from_f<T>(q4_k_value(w, i));                                             \
    }                                                                                                      \
    extern "C" __global__ void dequant_q6_k_##SUFFIX(const unsigned char* w, T* out, long long n) {        \
        GRID_STRIDE(i, n) out[i] = from_f<T>(q6_k_value(w, i));                                             \
    }                                                                                                      \
    extern "C" __global__ void dequant_fp8_e4m3_##SUFFIX(const unsigned char* w, const float* scale,       \
                                                         int per, long long cols, T* out, long long n) {   \
        GRID_STRIDE(i, n) out[i] = from_f<T>(fp8_value<true>(w, scale, per, cols, i));                      \
    }                                                                                                      \
    extern "C" __global__ void dequant_fp8_e5m2_##SUFFIX(const unsigned char* w, const float* scale,       \
                                                         int per, long long cols, T* out, long long n) {   \
        GRID_STRIDE(i, n) out[i] = from_f<T>(fp8_value<false>(w, scale, per, cols, i));                     \
    }

FUSED(f32, float)
FUSED(bf16, __nv_bfloat16)
FUSED(f16, __half)
