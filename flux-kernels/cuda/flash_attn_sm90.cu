// Attention forward for Hopper (sm_90a): softmax(q·kᵀ·scale)·v, head dim 128, bf16 or f16,
// non-causal, no mask, any sequence lengths. The design is FlashAttention-3's, written in plain
// CUDA C++ with inline PTX (no CUTLASS):
//
// - One block = 3 warpgroups (384 threads) on 128 query rows of one (batch, head).
//   Warpgroup 0 is the producer: one of its threads issues every bulk tensor copy (TMA), and
//   the warpgroup gives most of its registers away (`setmaxnreg.dec`). Warpgroups 1 and 2 are
//   consumers, 64 query rows each (the M of one wgmma), and take the registers
//   (`setmaxnreg.inc`).
// - Q is loaded once; K and V tiles of 128 keys stream through a 2-stage ring in shared memory.
//   Each stage has a "full" mbarrier (the producer's expected byte count, completed by the copy
//   engine) and an "empty" mbarrier (one arrival per consumer warp when its products no longer
//   read the stage).
// - S = Q·Kᵀ is an SS wgmma (both from shared memory); O += P·V is an RS wgmma: P stays in
//   registers (the f32 accumulator layout of S is, pair by pair, the A-fragment layout of the
//   next product), V is read N-major (transposed) from shared memory.
// - Within a warpgroup the softmax of tile j runs while the tensor cores do P_{j-1}·V_{j-1}
//   (issue S_j, issue PV_{j-1}, wait for S_j only); across the two consumer warpgroups two
//   named barriers hand the tensor cores back and forth (ping-pong), so one warpgroup's
//   products run while the other one exponentiates.
// - Every tile lives in shared memory as 64-column halves of 128-byte rows with the 128-byte
//   swizzle, exactly as the copy engine writes it for a tensor map with a 64-element inner box
//   and CU_TENSOR_MAP_SWIZZLE_128B, and as the wgmma descriptors below read it.
// - Rows and keys past the end: the copy engine fills out-of-bounds rows with zeros, keys past
//   the end get a score of −∞ in the last tile, rows past the end are not written.
// - The output is written from registers through its own strides, so the caller can ask for
//   (B, H, L, D) or token-major (B, L, H, D).
//
// Tensor maps (built on the host with cuTensorMapEncodeTiled) are 4-D: (D, L, H, B), innermost
// first, element strides (1, l, h, b), Q's box (64, 64, 1, 1), K's and V's (64, 128, 1, 1); or,
// for views whose heads are closer together than their rows (token-major q/k/v cut from one
// projection), (D, H, L, B) with the box (64, 1, rows, 1), flagged by bit 0/1/2 of `swaps` for
// q/k/v. Either way a box lands in shared memory as `rows` rows of 64 elements.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kD = 128;                  // head dim
constexpr int kRows = 64;                // query rows per consumer warpgroup
constexpr int kConsumers = 2;            // consumer warpgroups
constexpr int kBm = kRows * kConsumers;  // query rows per block
constexpr int kBn = 128;                 // keys per tile
constexpr int kStages = 2;
constexpr int kThreads = 128 * (1 + kConsumers);

// Bytes of one 64-column half of a tile of R rows (R rows of 128 bytes).
__host__ __device__ constexpr int half_bytes(int rows) { return rows * 128; }
constexpr int kQBytes = 2 * half_bytes(kRows);   // one consumer's Q: 16 KB
constexpr int kKVBytes = 2 * half_bytes(kBn);    // one K or V tile: 32 KB
constexpr int kSmemQ = 0;
constexpr int kSmemK = kSmemQ + kConsumers * kQBytes;
constexpr int kSmemV = kSmemK + kStages * kKVBytes;
constexpr int kSmemBytes = kSmemV + kStages * kKVBytes;  // 160 KB; the host adds 1 KB for alignment
static_assert(kSmemBytes + 1024 <= 227 * 1024, "over the 227 KB a Hopper block may have");

struct alignas(64) TmaMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers -------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// One arrival that also announces `bytes` the copy engine will deliver before the phase ends.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase with this parity has completed. On a fresh barrier, parity 1 counts as
// completed: that is how the producer's first pass over the ring goes through the "empty" waits.
// (No bounded spin with a trap here: a trap path breaks ptxas' register budget after setmaxnreg
// and serialises the products; a hung launch is ended by killing its process.)
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}

// ---- bulk tensor copies ----------------------------------------------------------------------

// A 4-D box of the tensor map at (c0 = column, c1 = row, c2 = head, c3 = batch) into shared
// memory; completes `bytes` on the mbarrier.
__device__ __forceinline__ void tma_load(uint32_t dst, const TmaMap* map, int c0, int c1, int c2, int c3,
                                         uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Rows `row`.. of head `head`, batch `batch`, columns `col`..: the map's dims are (D, L, H, B),
// or (D, H, L, B) when `swap` (a token-major view, where heads are closer together than rows:
// the host orders the dims by stride).
__device__ __forceinline__ void tma_rows(uint32_t dst, const TmaMap* map, bool swap, int col, int row, int head,
                                         int batch, uint32_t bar) {
    if (swap) {
        tma_load(dst, map, col, head, row, batch, bar);
    } else {
        tma_load(dst, map, col, row, head, batch, bar);
    }
}

__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- named barriers (ping-pong between the consumer warpgroups) ------------------------------

__device__ __forceinline__ void named_sync(int id) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(256) : "memory");
}
__device__ __forceinline__ void named_arrive(int id) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(256) : "memory");
}

// ---- wgmma -----------------------------------------------------------------------------------

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets, each in 16-byte units.
__device__ __forceinline__ uint64_t desc_field(uint32_t bytes) { return (uint64_t)((bytes & 0x3FFFF) >> 4); }
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lead, uint32_t stride) {
    return desc_field(addr) | (desc_field(lead) << 16) | (desc_field(stride) << 32) | (1ull << 62);
}
// K-major operand (Q as A, K as B): rows of 128 bytes, 8-row groups 1024 bytes apart; the
// leading offset is unused with swizzling. Step kk (16 columns) of a tile with `rows` rows:
// 32 bytes further inside a 128-byte row, the second half after four steps.
__device__ __forceinline__ uint64_t desc_k_major(uint32_t tile, int rows, int kk) {
    return make_desc(tile + (kk / 4) * half_bytes(rows) + (kk % 4) * 32, 16, 1024);
}
// N-major operand (V as B of P·V, keys along K, head dim along N): step kk is 16 keys = 16 rows
// of 128 bytes further; along N the second 64 columns are the tile's second half (leading
// offset); 8-key groups are 1024 bytes apart (stride offset).
__device__ __forceinline__ uint64_t desc_n_major(uint32_t tile, int rows, int kk) {
    return make_desc(tile + kk * 16 * 128, half_bytes(rows), 1024);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulators across the asynchronous products.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define WG_ACC_LIST                                                    \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"          \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

#define WG_ACC_OPERANDS(d)                                                                             \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),     \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),      \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),      \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),      \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),      \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),      \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

template <typename T>
struct Wgmma;

// D(64×128, f32) (+)= A(64×16) · B(16×128); `accumulate == 0` overwrites D.
#define WGMMA_IMPL(T, TY)                                                                              \
    template <>                                                                                        \
    struct Wgmma<T> {                                                                                  \
        /* A and B from shared memory, both K-major */                                                 \
        __device__ __forceinline__ static void ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                   \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_ACC_LIST        \
                         ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                              \
                         : WG_ACC_OPERANDS(d)                                                           \
                         : "l"(a), "l"(b), "r"(accumulate));                                            \
        }                                                                                              \
        /* A from registers (four 2-element registers per thread), B N-major in shared memory */       \
        __device__ __forceinline__ static void rs(float (&d)[64], const uint32_t* a, uint64_t b) {     \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                   \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_ACC_LIST        \
                         ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                \
                         : WG_ACC_OPERANDS(d)                                                           \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));               \
        }                                                                                              \
    };

WGMMA_IMPL(__nv_bfloat16, "bf16")
WGMMA_IMPL(__half, "f16")

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---- the consumer's per-tile work ------------------------------------------------------------
//
// Accumulator layout of m64nNk16 (f32): warp w of the warpgroup owns rows 16w..16w+15; in
// 8-column chunk c, thread (g = lane/4, t = lane%4) holds d[4c], d[4c+1] at row g, columns
// 8c+2t, 8c+2t+1 and d[4c+2], d[4c+3] at row g+8.

struct Softmax {
    float max[2];  // running row maxima (rows g and g+8), log2 units
    float sum[2];  // this thread's partial row sums
};

// S = Q·Kᵀ for the 64 × 128 tile, issued (not waited for).
template <typename T>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_tile, uint32_t k_tile) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
        Wgmma<T>::ss(s, desc_k_major(q_tile, kRows, kk), desc_k_major(k_tile, kBn, kk), kk > 0);
    }
}

// O += P·V, issued (not waited for).
template <typename T>
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&p)[32], uint32_t v_tile) {
#pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) {
        Wgmma<T>::rs(o, &p[4 * kk], desc_n_major(v_tile, kBn, kk));
    }
}

// Online softmax of one score tile, in place (scores → unnormalised probabilities); returns the
// factor the output accumulators must be scaled by (rows g, g+8).
__device__ __forceinline__ void softmax_tile(float (&s)[64], Softmax& st, float (&alpha)[2], int key0, int lk,
                                             float scale_log2, int t) {
    if (key0 + kBn > lk) {
#pragma unroll
        for (int c = 0; c < kBn / 8; ++c) {
            const int key = key0 + 8 * c + 2 * t;
            if (key >= lk) s[4 * c] = s[4 * c + 2] = -INFINITY;
            if (key + 1 >= lk) s[4 * c + 1] = s[4 * c + 3] = -INFINITY;
        }
    }
    float m[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int c = 0; c < kBn / 8; ++c) {
        m[0] = fmaxf(m[0], fmaxf(s[4 * c], s[4 * c + 1]));
        m[1] = fmaxf(m[1], fmaxf(s[4 * c + 2], s[4 * c + 3]));
    }
    float neg[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // the four threads of a row hold its 128 scores between them
        m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffff, m[r], 1));
        m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffff, m[r], 2));
        const float m_new = fmaxf(st.max[r], m[r] * scale_log2);
        alpha[r] = ex2(st.max[r] - m_new);
        st.max[r] = m_new;
        st.sum[r] *= alpha[r];
        neg[r] = -m_new;
    }
#pragma unroll
    for (int c = 0; c < kBn / 8; ++c) {
        s[4 * c] = ex2(fmaf(s[4 * c], scale_log2, neg[0]));
        s[4 * c + 1] = ex2(fmaf(s[4 * c + 1], scale_log2, neg[0]));
        s[4 * c + 2] = ex2(fmaf(s[4 * c + 2], scale_log2, neg[1]));
        s[4 * c + 3] = ex2(fmaf(s[4 * c + 3], scale_log2, neg[1]));
        st.sum[0] += s[4 * c] + s[4 * c + 1];
        st.sum[1] += s[4 * c + 2] + s[4 * c + 3];
    }
}

// Probabilities → A fragments of P·V. For keys 16kk..16kk+15 the A fragment is (row g, keys
// 2t, 2t+1), (row g+8, same), (row g, keys 2t+8, 2t+9), (row g+8, same): accumulator chunks 2kk
// and 2kk+1.
template <typename T>
__device__ __forceinline__ void to_a_frags(const float (&s)[64], uint32_t (&p)[32]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) p[2 * i] = pack2<T>(s[4 * i], s[4 * i + 1]), p[2 * i + 1] = pack2<T>(s[4 * i + 2], s[4 * i + 3]);
}

__device__ __forceinline__ void rescale(float (&o)[64], const float (&alpha)[2]) {
#pragma unroll
    for (int c = 0; c < kD / 8; ++c) {
        o[4 * c] *= alpha[0];
        o[4 * c + 1] *= alpha[0];
        o[4 * c + 2] *= alpha[1];
        o[4 * c + 3] *= alpha[1];
    }
}

// Barrier slots in static shared memory.
struct Barriers {
    uint64_t q_full;
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
};

template <typename T, bool PINGPONG>
__device__ __forceinline__ void flash_attn_sm90(const TmaMap& tm_q, const TmaMap& tm_k, const TmaMap& tm_v,
                                                int swaps, T* __restrict__ out, int heads, int lq, int lk,
                                                long long osb, long long osh, long long osl, float scale_log2) {
    extern __shared__ uint8_t smem_raw[];
    __shared__ __align__(8) Barriers bars;
    // The 128-byte swizzle is a function of address bits 4–9: every tile starts 1024-aligned.
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;

    const int wg = threadIdx.x / 128;
    const int bh = blockIdx.y;
    const int batch = bh / heads, head = bh % heads;
    const int q0 = blockIdx.x * kBm;
    const int tiles = (lk + kBn - 1) / kBn;

    if (threadIdx.x == 0) {
        mbar_init(smem_u32(&bars.q_full), 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(smem_u32(&bars.k_full[s]), 1);   // the producer's expect_tx arrival
            mbar_init(smem_u32(&bars.v_full[s]), 1);
            mbar_init(smem_u32(&bars.k_empty[s]), 4 * kConsumers);  // one arrival per consumer warp
            mbar_init(smem_u32(&bars.v_empty[s]), 4 * kConsumers);
        }
        // make the initialised barriers visible to the copy engine (async proxy) and to the
        // other threads before anyone uses them
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: 24 registers are enough for the copy loop; the rest go to the consumers.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (threadIdx.x == 0) {
            tma_prefetch_map(&tm_q);
            tma_prefetch_map(&tm_k);
            tma_prefetch_map(&tm_v);
            const uint32_t q_full = smem_u32(&bars.q_full);
            mbar_expect_tx(q_full, kConsumers * kQBytes);
            for (int c = 0; c < kConsumers; ++c) {
                for (int h = 0; h < 2; ++h) {
                    tma_rows(base + kSmemQ + c * kQBytes + h * half_bytes(kRows), &tm_q, swaps & 1, 64 * h,
                             q0 + c * kRows, head, batch, q_full);
                }
            }
            for (int j = 0; j < tiles; ++j) {
                const int s = j % kStages;
                const uint32_t parity = ((j / kStages) & 1) ^ 1;
                // K: wait until every consumer warp is done with the tile that used this stage
                // two tiles ago, then announce the bytes and start the copies
                mbar_wait(smem_u32(&bars.k_empty[s]), parity);
                mbar_expect_tx(smem_u32(&bars.k_full[s]), kKVBytes);
                for (int h = 0; h < 2; ++h) {
                    tma_rows(base + kSmemK + s * kKVBytes + h * half_bytes(kBn), &tm_k, swaps & 2, 64 * h,
                             j * kBn, head, batch, smem_u32(&bars.k_full[s]));
                }
                mbar_wait(smem_u32(&bars.v_empty[s]), parity);
                mbar_expect_tx(smem_u32(&bars.v_full[s]), kKVBytes);
                for (int h = 0; h < 2; ++h) {
                    tma_rows(base + kSmemV + s * kKVBytes + h * half_bytes(kBn), &tm_v, swaps & 4, 64 * h,
                             j * kBn, head, batch, smem_u32(&bars.v_full[s]));
                }
            }
        }
        return;
    }

    // Consumers.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int c = wg - 1;  // consumer index
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const uint32_t q_tile = base + kSmemQ + c * kQBytes;
    const bool lane0 = lane == 0;
    // Ping-pong: consumer c issues its products only between named_sync(1 + c) and
    // named_arrive(1 + other); consumer 1 lets consumer 0 go first. Every sync has exactly one
    // matching arrival (consumer 1 skips its last one), so the barriers end balanced.
    const int my_bar = 1 + c, other_bar = 2 - c;
    if (PINGPONG && c == 1) named_arrive(other_bar);

    float s[64], o[64];
    uint32_t p[32];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    Softmax st = {{-INFINITY, -INFINITY}, {0.f, 0.f}};
    float alpha[2];

    // The products no longer read a K or V stage: one arrival per warp (after __syncwarp every
    // lane's wait has returned).
    auto release = [&](uint64_t& bar) {
        __syncwarp();
        if (lane0) mbar_arrive(smem_u32(&bar));
    };
    // P_{j-1}·V_{j-1} is done: its stage goes back, P_j (the probabilities in s) replaces P_{j-1}
    // in the A registers, and O is brought to P_j's row maxima.
    auto next_p = [&](int j) {
        wg_wait<0>();
        fence_regs(o);
        fence_regs(p);
        if (j >= 1) release(bars.v_empty[(j - 1) % kStages]);
        to_a_frags<T>(s, p);
        rescale(o, alpha);
    };

    mbar_wait(smem_u32(&bars.q_full), 0);

    // Tile 0: S_0 and its softmax.
    mbar_wait(smem_u32(&bars.k_full[0]), 0);
    if (PINGPONG) named_sync(my_bar);
    wg_fence();  // s and o were written by ordinary instructions: order them before the products
    issue_qk<T>(s, q_tile, base + kSmemK);
    wg_commit();
    if (PINGPONG) named_arrive(other_bar);
    wg_wait<0>();
    fence_regs(s);
    release(bars.k_empty[0]);
    softmax_tile(s, st, alpha, 0, lk, scale_log2, t);

    // Tile j: P_{j-1} into registers (after P_{j-2}·V_{j-2}); S_j and P_{j-1}·V_{j-1} issued
    // together; wait for S_j only, and its softmax runs while the tensor cores do
    // P_{j-1}·V_{j-1}. The wait for that product comes at the top of the next tile, across the
    // loop's back edge: ptxas schedules within a block and would otherwise hoist the wait, and
    // the conversion and release that depend on it, up into the softmax.
#pragma unroll 1
    for (int j = 1; j < tiles; ++j) {
        const int sj = j % kStages, sp = (j - 1) % kStages;
        next_p(j - 1);
        mbar_wait(smem_u32(&bars.k_full[sj]), (j / kStages) & 1);
        mbar_wait(smem_u32(&bars.v_full[sp]), ((j - 1) / kStages) & 1);
        if (PINGPONG) named_sync(my_bar);
        wg_fence();  // p and o were written by ordinary instructions
        issue_qk<T>(s, q_tile, base + kSmemK + sj * kKVBytes);
        wg_commit();
        issue_pv<T>(o, p, base + kSmemV + sp * kKVBytes);
        wg_commit();
        if (PINGPONG) named_arrive(other_bar);
        wg_wait<1>();  // S_j is done; P_{j-1}·V_{j-1} may still run
        fence_regs(s);
        release(bars.k_empty[sj]);
        softmax_tile(s, st, alpha, j * kBn, lk, scale_log2, t);
    }

    // Last P·V.
    {
        const int sl = (tiles - 1) % kStages;
        next_p(tiles - 1);
        mbar_wait(smem_u32(&bars.v_full[sl]), ((tiles - 1) / kStages) & 1);
        if (PINGPONG) named_sync(my_bar);
        wg_fence();
        issue_pv<T>(o, p, base + kSmemV + sl * kKVBytes);
        wg_commit();
        if (PINGPONG && c == 0) named_arrive(other_bar);
        wg_wait<0>();
        fence_regs(o);
    }

    // Normalise and write rows g and g+8 of this warp's 16.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        st.sum[r] += __shfl_xor_sync(0xffffffff, st.sum[r], 1);
        st.sum[r] += __shfl_xor_sync(0xffffffff, st.sum[r], 2);
    }
    T* ob = out + batch * osb + head * osh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = q0 + c * kRows + warp * 16 + g + 8 * r;
        if (row >= lq) continue;
        const float inv = 1.f / st.sum[r];
        T* orow = ob + (long long)row * osl;
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
            *reinterpret_cast<uint32_t*>(orow + 8 * n + 2 * t) =
                pack2<T>(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
        }
    }
}

}  // namespace

// flash_attn_sm90_{dtype}_d128_{pp: ping-pong between the consumer warpgroups | np: without}
#define FLASH_ATTN_SM90(NAME, T, PINGPONG)                                                           \
    extern "C" __global__ void __launch_bounds__(kThreads, 1)                                        \
        NAME(const __grid_constant__ TmaMap tm_q, const __grid_constant__ TmaMap tm_k,               \
             const __grid_constant__ TmaMap tm_v, int swaps, T* o, int heads, int lq, int lk,        \
             long long osb, long long osh, long long osl, float scale_log2) {                        \
        flash_attn_sm90<T, PINGPONG>(tm_q, tm_k, tm_v, swaps, o, heads, lq, lk, osb, osh, osl,      \
                                     scale_log2);                                                    \
    }

FLASH_ATTN_SM90(flash_attn_sm90_bf16_d128_pp, __nv_bfloat16, true)
FLASH_ATTN_SM90(flash_attn_sm90_bf16_d128_np, __nv_bfloat16, false)
FLASH_ATTN_SM90(flash_attn_sm90_f16_d128_pp, __half, true)
FLASH_ATTN_SM90(flash_attn_sm90_f16_d128_np, __half, false)
