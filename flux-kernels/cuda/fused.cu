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
    }

FUSED(f32, float)
FUSED(bf16, __nv_bfloat16)
FUSED(f16, __half)
