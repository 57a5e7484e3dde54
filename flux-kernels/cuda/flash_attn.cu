// Attention forward for FLUX, flash-attention style: softmax(q·kᵀ·scale)·v without ever
// materialising the L×L scores.
//
// One block of 4 or 8 warps takes 64 or 128 query rows of one (batch, head); each warp owns 16. Keys and
// values stream through shared memory in tiles of 64 rows (cp.async, zero-filled past the end),
// the products run on the tensor cores (mma.sync m16n8k16, bf16 or f16 operands, f32
// accumulators), and the softmax is the online one: a running row maximum and row sum per query,
// the output accumulators rescaled whenever the maximum grows. Non-causal, no mask; any
// sequence length (the last tile masks keys past the end, rows past the end are not written);
// head dims 32, 64 and 128.
//
// Inputs are (B, H, L, D) views with any strides for B, H and L (D contiguous; every row start
// 16-byte aligned); the output is written through its own strides, so the caller can ask for
// (B, L, H, D) directly.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Each warp owns 16 query rows; a block has WARPS warps (4 or 8: 64 or 128 rows per block, so
// every K/V tile brought into shared memory serves 64 or 128 queries).
constexpr int kBc = 64;  // keys per tile
constexpr int kPad = 8;           // elements of padding per shared row (16 bytes)

struct Strides {
    long long b, h, l;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global → shared; `valid == false` writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Mma<__half> {
    __device__ __forceinline__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// Copies `rows` rows of D elements starting at `row0` into shared `dst` (row stride D + kPad),
// zero-filling rows at or past `limit`.
template <typename T, int D, int ROWS, int WARPS>
__device__ __forceinline__ void load_tile(T* dst, const T* base, long long row_stride, int row0, int limit) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * kChunks; i += WARPS * 32) {
        const int r = i / kChunks;
        const int c = (i % kChunks) * 8;
        const bool valid = row0 + r < limit;
        const T* src = base + (long long)(valid ? row0 + r : 0) * row_stride + c;
        cp_async16(dst + r * (D + kPad) + c, src, valid);
    }
}

template <typename T, int D, int WARPS>
__device__ void flash_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int heads, int lq, int lk, Strides qs, Strides ks, Strides vs,
                           Strides os, float scale_log2) {
    static_assert(D % 16 == 0 && D <= 128, "head dim must be a multiple of 16, at most 128");
    constexpr int kBr = 16 * WARPS;  // query rows per block
    __shared__ __align__(128) T k_s[kBc * (D + kPad)];
    __shared__ __align__(128) T v_s[kBc * (D + kPad)];

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;  // row within the 8-row group of an mma fragment
    const int t = lane % 4;  // column pair within the fragment
    const int bh = blockIdx.y;
    const int b = bh / heads, h = bh % heads;
    const int q0 = blockIdx.x * kBr;

    const T* qb = q + b * qs.b + h * qs.h;
    const T* kb = k + b * ks.b + h * ks.h;
    const T* vb = v + b * vs.b + h * vs.h;

    // Q rows g and g + 8 of this warp straight into A fragments, held for the whole loop.
    uint32_t qf[D / 16][4];
    {
        const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
        const T* q_r0 = qb + (long long)(r0 < lq ? r0 : 0) * qs.l + 2 * t;
        const T* q_r1 = qb + (long long)(r1 < lq ? r1 : 0) * qs.l + 2 * t;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            qf[kc][0] = r0 < lq ? *reinterpret_cast<const uint32_t*>(q_r0 + kc * 16) : 0u;
            qf[kc][1] = r1 < lq ? *reinterpret_cast<const uint32_t*>(q_r1 + kc * 16) : 0u;
            qf[kc][2] = r0 < lq ? *reinterpret_cast<const uint32_t*>(q_r0 + kc * 16 + 8) : 0u;
            qf[kc][3] = r1 < lq ? *reinterpret_cast<const uint32_t*>(q_r1 + kc * 16 + 8) : 0u;
        }
    }

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, in log2 units
    float row_sum[2] = {0.f, 0.f};              // this thread's partial sums

    const int tiles = (lk + kBc - 1) / kBc;
    load_tile<T, D, kBc, WARPS>(k_s, kb, ks.l, 0, lk);
    cp_async_commit();
    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * kBc;
        load_tile<T, D, kBc, WARPS>(v_s, vb, vs.l, k0, lk);
        cp_async_commit();
        cp_async_wait<1>();  // K tile j has landed
        __syncthreads();

        // S = Q Kᵀ for 16 rows × 64 keys per warp: 8 n-tiles of 8 keys.
        float s[kBc / 8][4];
#pragma unroll
        for (int i = 0; i < kBc / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        {
            const int m = lane / 8, r = lane % 8;
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
                for (int n = 0; n < kBc / 8; n += 2) {
                    // matrices: (keys n, d lo), (keys n, d hi), (keys n+1, d lo), (keys n+1, d hi)
                    const T* p = k_s + ((n + m / 2) * 8 + r) * (D + kPad) + kc * 16 + (m % 2) * 8;
                    uint32_t b0, b1, b2, b3;
                    ldmatrix_x4(b0, b1, b2, b3, p);
                    Mma<T>::run(s[n], qf[kc], b0, b1);
                    Mma<T>::run(s[n + 1], qf[kc], b2, b3);
                }
            }
        }
        // Mask keys past the end (only the last tile has any).
        if (k0 + kBc > lk) {
#pragma unroll
            for (int n = 0; n < kBc / 8; ++n) {
                const int key = k0 + n * 8 + 2 * t;
                if (key >= lk) s[n][0] = s[n][2] = -INFINITY;
                if (key + 1 >= lk) s[n][1] = s[n][3] = -INFINITY;
            }
        }
        // Online softmax: new maxima (the 4 threads of a row share them), rescale, exponentiate.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
            tile_max[0] = fmaxf(tile_max[0], fmaxf(s[n][0], s[n][1]));
            tile_max[1] = fmaxf(tile_max[1], fmaxf(s[n][2], s[n][3]));
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
            const float m_new = fmaxf(row_max[r], tile_max[r] * scale_log2);
            alpha[r] = exp2f(row_max[r] - m_new);
            row_max[r] = m_new;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < kBc / 8; ++n) {
            s[n][0] = exp2f(s[n][0] * scale_log2 - row_max[0]);
            s[n][1] = exp2f(s[n][1] * scale_log2 - row_max[0]);
            s[n][2] = exp2f(s[n][2] * scale_log2 - row_max[1]);
            s[n][3] = exp2f(s[n][3] * scale_log2 - row_max[1]);
            row_sum[0] += s[n][0] + s[n][1];
            row_sum[1] += s[n][2] + s[n][3];
        }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            acc[i][0] *= alpha[0];
            acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1];
            acc[i][3] *= alpha[1];
        }

        __syncthreads();  // every warp is done with k_s
        if (j + 1 < tiles) {
            load_tile<T, D, kBc, WARPS>(k_s, kb, ks.l, k0 + kBc, lk);
            cp_async_commit();
            cp_async_wait<1>();  // V tile j has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // O += P V: P's C fragments are exactly the A fragments of the next product.
        {
            const int m = lane / 8, r = lane % 8;
#pragma unroll
            for (int kc = 0; kc < kBc / 16; ++kc) {
                uint32_t pa[4];
                pa[0] = Mma<T>::pack(s[2 * kc][0], s[2 * kc][1]);
                pa[1] = Mma<T>::pack(s[2 * kc][2], s[2 * kc][3]);
                pa[2] = Mma<T>::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
                pa[3] = Mma<T>::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
                for (int n = 0; n < D / 8; n += 2) {
                    // matrices: (keys lo, d n), (keys hi, d n), (keys lo, d n+1), (keys hi, d n+1)
                    const T* p = v_s + (kc * 16 + (m % 2) * 8 + r) * (D + kPad) + (n + m / 2) * 8;
                    uint32_t b0, b1, b2, b3;
                    ldmatrix_x4_trans(b0, b1, b2, b3, p);
                    Mma<T>::run(acc[n], pa, b0, b1);
                    Mma<T>::run(acc[n + 1], pa, b2, b3);
                }
            }
        }
        __syncthreads();  // every warp is done with v_s
    }

    // Normalise and write rows g and g + 8 of this warp.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    }
    T* ob = o + b * os.b + h * os.h;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = q0 + warp * 16 + g + r * 8;
        if (row >= lq) continue;
        const float inv = 1.f / row_sum[r];
        T* orow = ob + (long long)row * os.l;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const uint32_t packed = Mma<T>::pack(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
            *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t) = packed;
        }
    }
}

}  // namespace

#define FLASH_ATTN(NAME, T, D, WARPS, MIN_BLOCKS)                                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)                             \
        NAME(const T* q, const T* k, const T* v, T* o, int heads, int lq, int lk, long long qsb,     \
             long long qsh, long long qsl, long long ksb, long long ksh, long long ksl, long long vsb, \
             long long vsh, long long vsl, long long osb, long long osh, long long osl,              \
             float scale_log2) {                                                                     \
        flash_attn<T, D, WARPS>(q, k, v, o, heads, lq, lk, Strides{qsb, qsh, qsl},                   \
                                Strides{ksb, ksh, ksl}, Strides{vsb, vsh, vsl}, Strides{osb, osh, osl}, \
                                scale_log2);                                                         \
    }

// flash_attn_{dtype}_d{head dim}_r{query rows per block}_o{blocks per multiprocessor asked of
// the register allocator}
#define FLASH_ATTN_D(T, S, D)                                  \
    FLASH_ATTN(flash_attn_##S##_d##D##_r64_o2, T, D, 4, 2)     \
    FLASH_ATTN(flash_attn_##S##_d##D##_r64_o3, T, D, 4, 3)     \
    FLASH_ATTN(flash_attn_##S##_d##D##_r128_o1, T, D, 8, 1)
#define FLASH_ATTN_ALL(T, S) FLASH_ATTN_D(T, S, 32) FLASH_ATTN_D(T, S, 64) FLASH_ATTN_D(T, S, 128)

FLASH_ATTN_ALL(__nv_bfloat16, bf16)
FLASH_ATTN_ALL(__half, f16)
