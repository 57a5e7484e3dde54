//! The CUDA kernels of `cuda/*.cu`, wrapped as candle custom ops. The public functions of
//! [`crate::attention`], [`crate::ops`] and [`crate::rope`] dispatch here for CUDA tensors; each
//! op checks ranks, dtypes, strides and alignment before it launches anything.

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaStream, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use candle::cuda_backend::cudarc::nvrtc::Ptx;
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape,
    Storage, Tensor,
};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::attention::FlashKernel;

/// Our CUDA modules, as `build.rs` compiles them: fatbins with machine code for the build's
/// compute capability (loaded without a JIT on such a device) and PTX for newer ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    /// The mma.sync flash-attention kernels.
    FlashAttn,
    /// The Hopper attention kernel (sm_90a); empty unless built for compute capability 9.x.
    FlashAttnSm90,
    /// Everything else: fused elementwise kernels, fp8 quantization, decoding of packed weights.
    Fused,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::FlashAttn => include_bytes!(concat!(env!("OUT_DIR"), "/flash_attn.fatbin")),
            Module::FlashAttnSm90 => {
                include_bytes!(concat!(env!("OUT_DIR"), "/flash_attn_sm90.fatbin"))
            }
            Module::Fused => include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin")),
        }
    }
}

/// A kernel of one of our modules, launched on its device's stream.
pub(crate) struct Func {
    func: CudaFunction,
    stream: std::sync::Arc<CudaStream>,
}

impl Func {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

impl std::ops::Deref for Func {
    type Target = CudaFunction;
    fn deref(&self) -> &CudaFunction {
        &self.func
    }
}

type Modules = HashMap<(candle::cuda_backend::DeviceId, Module), std::sync::Arc<CudaModule>>;
static MODULES: std::sync::OnceLock<Mutex<Modules>> = std::sync::OnceLock::new();

/// The kernel `name` of `module` on `dev`, the module loaded on first use and kept per device.
pub(crate) fn func(dev: &CudaDevice, name: &str, module: Module) -> candle::Result<Func> {
    let stream = dev.cuda_stream();
    let m = {
        let mut map = MODULES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(&(dev.id(), module)) {
            Some(m) => m.clone(),
            None => {
                // cuModuleLoadData reads the fatbin in place; a Vec's buffer is suitably
                // aligned for its header
                let image = Ptx::from_binary(module.image().to_vec());
                let m = stream.context().load_module(image).w()?;
                map.insert((dev.id(), module), m.clone());
                m
            }
        }
    };
    let func = m.load_function(name).w()?;
    Ok(Func { func, stream })
}

/// Head dims the flash-attention kernel is instantiated for.
pub(crate) const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// (query rows per block, blocks per multiprocessor) of the flash kernel.
static FLASH_CONFIG: Mutex<(usize, usize)> = Mutex::new((64, 3));

/// The flash-attention kernel's launch shape, a tuning knob for benchmarks (process-wide):
/// `(64, 3)` (default: 4 warps per block, registers capped so that 3 blocks fit a
/// multiprocessor; 12 bytes spill), `(64, 2)` (no cap) or `(128, 1)` (8 warps, each K/V tile
/// serves 128 queries). Measured on an H200 at L=4608: 237, 224 and 204 TFLOP/s.
pub fn set_flash_config(rows: usize, blocks_per_sm: usize) -> crate::Result<()> {
    if !matches!((rows, blocks_per_sm), (64, 2) | (64, 3) | (128, 1)) {
        return Err(crate::Error::InvalidArgument(format!(
            "flash attention config must be (64, 2), (64, 3) or (128, 1), got ({rows}, {blocks_per_sm})"
        )));
    }
    *FLASH_CONFIG.lock().unwrap_or_else(|e| e.into_inner()) = (rows, blocks_per_sm);
    Ok(())
}

/// The kernel the last CUDA attention call ran: 0 none yet, 1 mma.sync, 2 Hopper with
/// ping-pong, 3 Hopper without.
static LAST_FLASH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Which kernel the last CUDA attention call ran (`"mma.sync"`, `"hopper"`,
/// `"hopper-no-pingpong"` or `"none"`): lets a check prove that the kernel it meant to test ran.
pub fn last_flash_kernel() -> &'static str {
    match LAST_FLASH.load(std::sync::atomic::Ordering::Relaxed) {
        1 => "mma.sync",
        2 => "hopper",
        3 => "hopper-no-pingpong",
        _ => "none",
    }
}

/// Whether this build carries the Hopper attention kernel (built with `CUDA_COMPUTE_CAP` 9.x).
pub fn has_hopper_kernel() -> bool {
    !Module::FlashAttnSm90.image().is_empty()
}

/// Dynamic shared memory of the Hopper kernel: Q (2 × 16 KB), K and V rings (2 × 2 × 32 KB)
/// and 1 KB to align the tiles to the 128-byte swizzle's 1024-byte period.
const SM90_SMEM: u32 = 160 * 1024 + 1024;

/// A 4-D TMA tensor map over a `(B, H, L, D)` view (element strides `st` for B, H, L), with
/// 128-byte swizzled boxes of 64 columns × `rows` rows. Dims go innermost first as (D, L, H, B),
/// or (D, H, L, B) when heads are closer together than rows (returned `true`): the copy engine
/// wants the strides in increasing order. `None` where the driver refuses the view.
fn tensor_map(
    ptr: sys::CUdeviceptr,
    dtype: DType,
    dims: (usize, usize, usize, usize),
    st: [i64; 3],
    rows: u32,
) -> Option<([u64; 16], bool)> {
    let (b, h, l, d) = dims;
    let (elem, data_type) = match dtype {
        DType::BF16 => (
            2u64,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        ),
        DType::F16 => (2, sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16),
        _ => return None,
    };
    let (bu, hu, lu) = (b as u64, h as u64, l as u64);
    let sl = st[2] as u64 * elem;
    // the stride of a dimension of size 1 is never used: choose one that keeps the order
    let sh = if h == 1 { sl * lu } else { st[1] as u64 * elem };
    let sb = if b == 1 {
        (sl * lu).max(sh * hu)
    } else {
        st[0] as u64 * elem
    };
    let swap = sh < sl;
    let (gdim, gstride, boxd) = if swap {
        ([d as u64, hu, lu, bu], [sh, sl, sb], [64u32, 1, rows, 1])
    } else {
        ([d as u64, lu, hu, bu], [sl, sh, sb], [64u32, rows, 1, 1])
    };
    if !ptr.is_multiple_of(16)
        || gstride
            .iter()
            .any(|s| s % 16 != 0 || *s >= 1 << 40 || *s == 0)
    {
        return None;
    }
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let elem_strides = [1u32; 4];
    // SAFETY: every pointer is to a live local array of the rank's length; the map is written
    // by the driver before it is read.
    let res = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            4,
            ptr as *mut std::ffi::c_void,
            gdim.as_ptr(),
            gstride.as_ptr(),
            boxd.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if res != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    // SAFETY: the driver filled the map.
    Some((unsafe { map.assume_init() }.opaque, swap))
}

/// The candle custom-op wrapper of one CUDA kernel, written once for all of them: the CPU
/// entry refuses (CPU tensors take the composite paths), the CUDA entry runs `$call` with `$T`
/// the Rust type of the first input's dtype, for the dtypes listed; any other dtype is an error
/// that names the op.
macro_rules! cuda_op {
    (
        $op:ty, $trait:ident, $name:literal,
        [$($dt:ident => $rt:ty),+],
        ($this:ident, $x:ident, $xl:ident $(, $s:ident, $l:ident)*),
        |$T:ident| $call:expr
    ) => {
        impl $trait for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                $x: &CpuStorage,
                $xl: &Layout,
                $($s: &CpuStorage, $l: &Layout,)*
            ) -> candle::Result<(CpuStorage, Shape)> {
                let _ = ($x, $xl $(, $s, $l)*);
                Err(cpu_only($name))
            }

            fn cuda_fwd(
                &$this,
                $x: &CudaStorage,
                $xl: &Layout,
                $($s: &CudaStorage, $l: &Layout,)*
            ) -> candle::Result<(CudaStorage, Shape)> {
                match $x.dtype() {
                    $(DType::$dt => {
                        type $T = $rt;
                        $call
                    })+
                    d => Err(candle::Error::Msg(format!(
                        "{}: unsupported dtype {d:?} on CUDA",
                        $name
                    ))),
                }
            }
        }
    };
}

fn cpu_only(name: &str) -> candle::Error {
    candle::Error::Msg(format!(
        "{name} is a CUDA kernel; CPU tensors take the composite path"
    ))
}

fn suffix(dtype: DType, what: &str) -> candle::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => Err(candle::Error::Msg(format!(
            "{what}: unsupported dtype {d:?} on CUDA"
        ))),
    }
}

/// The (B, H, L) strides of a rank-4 view whose last dimension is contiguous.
fn strides4(what: &str, l: &Layout) -> candle::Result<[i64; 3]> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        return Err(candle::Error::Msg(format!(
            "{what}: needs a (B, H, L, D) view with contiguous D, got shape {:?} strides {s:?}",
            l.dims()
        )));
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

/// The stride between batch rows of a `(B, 1, C)` or `(B, C)` modulation view with contiguous C.
fn mod_stride(what: &str, l: &Layout, b: usize, c: usize) -> candle::Result<i64> {
    let dims = l.dims();
    let s = l.stride();
    let ok = match dims {
        [bb, 1, cc] => *bb == b && *cc == c && s[2] == 1,
        [bb, cc] => *bb == b && *cc == c && s[1] == 1,
        _ => false,
    };
    if !ok {
        return Err(candle::Error::Msg(format!(
            "{what}: needs ({b}, 1, {c}) with contiguous channels, got shape {dims:?} strides {s:?}"
        )));
    }
    Ok(if b == 1 { 0 } else { s[0] as i64 })
}

fn slice<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle::Result<candle::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// `softmax(q·kᵀ·scale)·v` by the flash kernel; q, k, v `(B, H, L, D)` views.
pub(crate) struct FlashAttn {
    pub scale: f32,
    /// Write `(B, Lq, H, D)` instead of `(B, H, Lq, D)`.
    pub tokens_out: bool,
}

impl FlashAttn {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = q.0.device().clone();
        let dev = &dev;
        let (b, h, lq, d) = q.1.shape().dims4()?;
        if !FLASH_HEAD_DIMS.contains(&d) {
            return Err(candle::Error::Msg(format!(
                "flash attention: head dim {d} not in {FLASH_HEAD_DIMS:?}"
            )));
        }
        let name = format!(
            "flash_attn_{}_d{d}",
            suffix(q.0.dtype(), "flash attention")?
        );
        let lk = k.1.dims()[2];
        let qs = strides4("flash attention q", q.1)?;
        let ks = strides4("flash attention k", k.1)?;
        let vs = strides4("flash attention v", v.1)?;
        for (what, st, l) in [("q", qs, q.1), ("k", ks, k.1), ("v", vs, v.1)] {
            // 16-byte aligned rows for cp.async (candle's allocations are 256-byte aligned)
            if st.iter().any(|s| s % 8 != 0) || l.start_offset() % 8 != 0 {
                return Err(candle::Error::Msg(format!(
                    "flash attention {what}: rows must start 16-byte aligned (strides {st:?}, offset {})",
                    l.start_offset()
                )));
            }
        }
        let (shape, os): (Shape, [i64; 3]) = if self.tokens_out {
            (
                (b, lq, h, d).into(),
                [(lq * h * d) as i64, d as i64, (h * d) as i64],
            )
        } else {
            (
                (b, h, lq, d).into(),
                [(h * lq * d) as i64, (lq * d) as i64, d as i64],
            )
        };
        let kernel =
            crate::attention::flash_kernel().map_err(|e| candle::Error::Msg(e.to_string()))?;
        if kernel != FlashKernel::MmaSync && d == 128 && has_hopper_kernel() {
            let major = dev
                .cuda_stream()
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .w()?;
            if major == 9 {
                let pingpong = kernel == FlashKernel::Auto;
                if let Some(r) = self.run_sm90::<T>(dev, q, k, v, &shape, os, pingpong)? {
                    let id = if pingpong { 2 } else { 3 };
                    LAST_FLASH.store(id, std::sync::atomic::Ordering::Relaxed);
                    return Ok(r);
                }
            }
        }
        let (rows, blocks) = *FLASH_CONFIG.lock().unwrap_or_else(|e| e.into_inner());
        let func = func(dev, &format!("{name}_r{rows}_o{blocks}"), Module::FlashAttn)?;
        // SAFETY: every element is written by the kernel (all rows < lq, all of D).
        let out = unsafe { dev.alloc::<T>(b * h * lq * d)? };
        let (qv, kv, vv) = (
            slice::<T>(q.0, q.1)?,
            slice::<T>(k.0, k.1)?,
            slice::<T>(v.0, v.1)?,
        );
        let (heads, lq_i, lk_i) = (h as i32, lq as i32, lk as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(rows) as u32, (b * h) as u32, 1),
            block_dim: (rows as u32 * 2, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&out);
        bld.arg(&heads).arg(&lq_i).arg(&lk_i);
        for s in qs.iter().chain(&ks).chain(&vs).chain(&os) {
            bld.arg(s);
        }
        bld.arg(&scale_log2);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        LAST_FLASH.store(1, std::sync::atomic::Ordering::Relaxed);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl FlashAttn {
    /// The Hopper kernel (head dim 128); `None` where a view cannot be described by a tensor
    /// map (the caller then runs the mma.sync kernel).
    #[allow(clippy::too_many_arguments)]
    fn run_sm90<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        shape: &Shape,
        os: [i64; 3],
        pingpong: bool,
    ) -> candle::Result<Option<(CudaStorage, Shape)>> {
        let (b, h, lq, d) = q.1.shape().dims4()?;
        let lk = k.1.dims()[2];
        let stream = dev.cuda_stream();
        let (qv, kv, vv) = (
            slice::<T>(q.0, q.1)?,
            slice::<T>(k.0, k.1)?,
            slice::<T>(v.0, v.1)?,
        );
        // the guards record the reads on the stream when they drop, after the launch
        let (qp, _qg) = qv.device_ptr(&stream);
        let (kp, _kg) = kv.device_ptr(&stream);
        let (vp, _vg) = vv.device_ptr(&stream);
        let dtype = q.0.dtype();
        let maps = (
            tensor_map(qp, dtype, (b, h, lq, d), strides4("attention q", q.1)?, 64),
            tensor_map(kp, dtype, (b, h, lk, d), strides4("attention k", k.1)?, 128),
            tensor_map(vp, dtype, (b, h, lk, d), strides4("attention v", v.1)?, 128),
        );
        let (Some((mq, sq)), Some((mk, sk)), Some((mv, sv))) = maps else {
            return Ok(None);
        };
        let swaps = i32::from(sq) | (i32::from(sk) << 1) | (i32::from(sv) << 2);
        let name = format!(
            "flash_attn_sm90_{}_d128_{}",
            suffix(dtype, "flash attention")?,
            if pingpong { "pp" } else { "np" }
        );
        let func = func(dev, &name, Module::FlashAttnSm90)?;
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            SM90_SMEM as i32,
        )
        .w()?;
        // SAFETY: every element is written by the kernel (all rows < lq, all of D).
        let out = unsafe { dev.alloc::<T>(b * h * lq * d)? };
        let (heads, lq_i, lk_i) = (h as i32, lq as i32, lk as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(128) as u32, (b * h) as u32, 1),
            block_dim: (384, 1, 1),
            shared_mem_bytes: SM90_SMEM,
        };
        let mut bld = func.builder();
        bld.arg(&mq).arg(&mk).arg(&mv).arg(&swaps).arg(&out);
        bld.arg(&heads).arg(&lq_i).arg(&lk_i);
        for s in &os {
            bld.arg(s);
        }
        bld.arg(&scale_log2);
        // SAFETY: arguments match the kernel's signature (three 128-byte tensor maps by value,
        // as `__grid_constant__` parameters); the maps describe live views of the inputs.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(Some((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            shape.clone(),
        )))
    }
}

cuda_op!(
    FlashAttn,
    CustomOp3,
    "flux-flash-attention",
    [BF16 => bf16, F16 => f16],
    (self, q, ql, k, kl, v, vl),
    |T| self.run::<T>((q, ql), (k, kl), (v, vl))
);

/// RMSNorm (learned scale) then RoPE, one pass; x a `(B, H, L, D)` view, scale `(D)`.
pub(crate) struct QkNormRope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub eps: f32,
}

impl QkNormRope {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        scale: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        let (b, h, l, d) = x.1.shape().dims4()?;
        let xs = strides4("qk_norm_rope x", x.1)?;
        if !scale.1.is_contiguous() || scale.1.dims() != [d] {
            return Err(candle::Error::Msg(format!(
                "qk_norm_rope scale: needs contiguous ({d}), got {:?}",
                scale.1.dims()
            )));
        }
        let (cos_s, cos_l) = self.cos.storage_and_layout();
        let (sin_s, sin_l) = self.sin.storage_and_layout();
        let (Storage::Cuda(cos_s), Storage::Cuda(sin_s)) = (&*cos_s, &*sin_s) else {
            return Err(candle::Error::Msg(
                "qk_norm_rope: RoPE table not on CUDA".into(),
            ));
        };
        let pb = cos_l.dims()[0];
        let table_ok = |tl: &Layout| tl.is_contiguous() && tl.dims() == [pb, 1, l, d / 2];
        if !table_ok(cos_l) || !table_ok(sin_l) || (pb != 1 && pb != b) || d % 2 != 0 {
            return Err(candle::Error::Msg(format!(
                "qk_norm_rope: table must be contiguous ({b} or 1, 1, {l}, {}), got {:?}",
                d / 2,
                cos_l.dims()
            )));
        }
        let name = format!("qk_norm_rope_{}", suffix(x.0.dtype(), "qk_norm_rope")?);
        let func = func(&dev, &name, Module::Fused)?;
        let n = b * h * l * d;
        // SAFETY: one warp writes every element of its row.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (xv, sv) = (slice::<T>(x.0, x.1)?, slice::<T>(scale.0, scale.1)?);
        let cv = slice::<f32>(cos_s, cos_l)?;
        let snv = slice::<f32>(sin_s, sin_l)?;
        let (bi, hi, li, di) = (b as i32, h as i32, l as i32, d as i32);
        let batched = i32::from(pb != 1);
        let rows = (b * h * l) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&xv).arg(&sv).arg(&cv).arg(&snv).arg(&out);
        bld.arg(&bi).arg(&hi).arg(&li).arg(&di);
        bld.arg(&xs[0])
            .arg(&xs[1])
            .arg(&xs[2])
            .arg(&batched)
            .arg(&self.eps);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), (b, h, l, d).into()))
    }
}

cuda_op!(
    QkNormRope,
    CustomOp2,
    "flux-qk-norm-rope",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, x, xl, s, sl),
    |T| self.run::<T>((x, xl), (s, sl))
);

/// `(1 + scale)·LN(x) + shift`; x contiguous `(B, L, C)`, shift/scale `(B, 1, C)` views.
pub(crate) struct LnModulate {
    pub eps: f32,
}

impl LnModulate {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        shift: (&CudaStorage, &Layout),
        scale: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        if !x.1.is_contiguous() {
            return Err(candle::Error::Msg(
                "ln_modulate x: must be contiguous".into(),
            ));
        }
        let (b, l, c) = x.1.shape().dims3()?;
        let sh = mod_stride("ln_modulate shift", shift.1, b, c)?;
        let sc = mod_stride("ln_modulate scale", scale.1, b, c)?;
        if sh != sc {
            return Err(candle::Error::Msg(format!(
                "ln_modulate: shift and scale rows must be equally strided ({sh} vs {sc})"
            )));
        }
        let name = format!("ln_modulate_{}", suffix(x.0.dtype(), "ln_modulate")?);
        let func = func(&dev, &name, Module::Fused)?;
        // SAFETY: one block writes every element of its row.
        let out = unsafe { dev.alloc::<T>(b * l * c)? };
        let (xv, shv, scv) = (
            slice::<T>(x.0, x.1)?,
            slice::<T>(shift.0, shift.1)?,
            slice::<T>(scale.0, scale.1)?,
        );
        let (li, ci) = (l as i32, c as i32);
        let cfg = LaunchConfig {
            grid_dim: ((b * l) as u32, 1, 1),
            block_dim: (c.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&xv).arg(&shv).arg(&scv).arg(&out);
        bld.arg(&li).arg(&ci).arg(&sh).arg(&self.eps);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), (b, l, c).into()))
    }
}

cuda_op!(
    LnModulate,
    CustomOp3,
    "flux-ln-modulate",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, x, xl, sh, shl, sc, scl),
    |T| self.run::<T>((x, xl), (sh, shl), (sc, scl))
);

/// `x + gate·y`; x, y contiguous `(B, L, C)`, gate a `(B, 1, C)` view.
pub(crate) struct GatedResidual;

impl GatedResidual {
    fn run<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        gate: (&CudaStorage, &Layout),
        y: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        if !x.1.is_contiguous() || !y.1.is_contiguous() || x.1.dims() != y.1.dims() {
            return Err(candle::Error::Msg(format!(
                "gated_residual: x and y must be contiguous and equal-shaped, got {:?} and {:?}",
                x.1.dims(),
                y.1.dims()
            )));
        }
        let (b, l, c) = x.1.shape().dims3()?;
        let gs = mod_stride("gated_residual gate", gate.1, b, c)?;
        let name = format!("gated_residual_{}", suffix(x.0.dtype(), "gated_residual")?);
        let func = func(&dev, &name, Module::Fused)?;
        let n = b * l * c;
        // SAFETY: the grid-stride loop writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (xv, gv, yv) = (
            slice::<T>(x.0, x.1)?,
            slice::<T>(gate.0, gate.1)?,
            slice::<T>(y.0, y.1)?,
        );
        let (ni, li, ci) = (n as i64, l as i32, c as i32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&xv).arg(&gv).arg(&yv).arg(&out);
        let vec = 16 / std::mem::size_of::<T>();
        let vec_ok = i32::from(
            c % vec == 0
                && gs % vec as i64 == 0
                && [x.1, gate.1, y.1]
                    .iter()
                    .all(|l| l.start_offset() % vec == 0),
        );
        bld.arg(&ni).arg(&li).arg(&ci).arg(&gs).arg(&vec_ok);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), (b, l, c).into()))
    }
}

cuda_op!(
    GatedResidual,
    CustomOp3,
    "flux-gated-residual",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, x, xl, g, gl, y, yl),
    |T| Self::run::<T>((x, xl), (g, gl), (y, yl))
);

/// GELU (tanh approximation) in f32, one pass; x contiguous.
pub(crate) struct GeluTanh;

impl GeluTanh {
    fn run<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        l: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        if !l.is_contiguous() {
            return Err(candle::Error::Msg("gelu_tanh: x must be contiguous".into()));
        }
        let n = l.shape().elem_count();
        let name = format!("gelu_tanh_{}", suffix(x.dtype(), "gelu_tanh")?);
        let func = func(&dev, &name, Module::Fused)?;
        // SAFETY: the grid-stride loop writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let xv = slice::<T>(x, l)?;
        let ni = n as i64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        let vec_ok = i32::from(
            l.start_offset()
                .is_multiple_of(16 / std::mem::size_of::<T>()),
        );
        bld.arg(&xv).arg(&out).arg(&ni).arg(&vec_ok);
        // SAFETY: arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

cuda_op!(
    GeluTanh,
    CustomOp1,
    "flux-gelu-tanh",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, x, l),
    |T| Self::run::<T>(x, l)
);

/// `y + b` with b `(cols)` broadcast over the rows of a contiguous `(rows, cols)` y.
pub(crate) struct BiasAdd;

impl BiasAdd {
    fn run<T: CudaDType + DeviceRepr>(
        y: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = y.0.device().clone();
        let (rows, cols) = y.1.shape().dims2()?;
        if !y.1.is_contiguous() || !b.1.is_contiguous() || b.1.dims() != [cols] {
            return Err(candle::Error::Msg(format!(
                "bias_add: needs contiguous y (rows, cols) and b ({cols}), got {:?} and {:?}",
                y.1.dims(),
                b.1.dims()
            )));
        }
        // 16-byte vectors need 16-byte aligned starts (fresh matmul outputs and stored biases are)
        let vec = 16 / std::mem::size_of::<T>();
        let vec_ok = i32::from(
            y.1.start_offset().is_multiple_of(vec) && b.1.start_offset().is_multiple_of(vec),
        );
        let name = format!("bias_add_{}", suffix(y.0.dtype(), "bias_add")?);
        let func = func(&dev, &name, Module::Fused)?;
        let n = rows * cols;
        // SAFETY: the grid-stride loop writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (yv, bv) = (slice::<T>(y.0, y.1)?, slice::<T>(b.0, b.1)?);
        let (ni, ci) = (n as i64, cols as i32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256 * vec).clamp(1, 65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&yv)
            .arg(&bv)
            .arg(&out)
            .arg(&ni)
            .arg(&ci)
            .arg(&vec_ok);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), (rows, cols).into()))
    }
}

cuda_op!(
    BiasAdd,
    CustomOp2,
    "flux-bias-add",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, y, yl, b, bl),
    |T| Self::run::<T>((y, yl), (b, bl))
);

/// `[a, gelu(m)]` along the last dimension; a, m `(rows, C)` views with evenly spaced rows.
pub(crate) struct CatGelu;

/// The row stride of a `(B, L, C)` view whose rows are evenly spaced with contiguous C.
pub(crate) fn row_stride(l: &Layout) -> Option<usize> {
    match (l.dims(), l.stride()) {
        (&[b, len, _], &[s0, s1, 1]) if b == 1 || s0 == len * s1 => Some(s1),
        _ => None,
    }
}

impl CatGelu {
    fn run<T: CudaDType + DeviceRepr>(
        a: (&CudaStorage, &Layout),
        m: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = a.0.device().clone();
        let (b, l, ca) = a.1.shape().dims3()?;
        let (mb, ml, cm) = m.1.shape().dims3()?;
        let (Some(sa), Some(sm)) = (row_stride(a.1), row_stride(m.1)) else {
            return Err(candle::Error::Msg(
                "cat_gelu: rows must be evenly spaced".into(),
            ));
        };
        if (mb, ml) != (b, l) {
            return Err(candle::Error::Msg(format!(
                "cat_gelu: a {:?} and m {:?} differ in (B, L)",
                a.1.dims(),
                m.1.dims()
            )));
        }
        let vec = 16 / std::mem::size_of::<T>();
        let vec_ok = i32::from(
            [ca, cm, sa, sm, a.1.start_offset(), m.1.start_offset()]
                .iter()
                .all(|v| v % vec == 0),
        );
        let name = format!("cat_gelu_{}", suffix(a.0.dtype(), "cat_gelu")?);
        let func = func(&dev, &name, Module::Fused)?;
        // SAFETY: one block writes every element of its row.
        let out = unsafe { dev.alloc::<T>(b * l * (ca + cm))? };
        let (av, mv) = (slice::<T>(a.0, a.1)?, slice::<T>(m.0, m.1)?);
        let (cai, cmi, sai, smi) = (ca as i32, cm as i32, sa as i64, sm as i64);
        let cfg = LaunchConfig {
            grid_dim: ((b * l) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&av)
            .arg(&mv)
            .arg(&out)
            .arg(&cai)
            .arg(&cmi)
            .arg(&sai)
            .arg(&smi)
            .arg(&vec_ok);
        // SAFETY: arguments match the kernel's signature; sizes checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            (b, l, ca + cm).into(),
        ))
    }
}

cuda_op!(
    CatGelu,
    CustomOp2,
    "flux-cat-gelu",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, a, al, m, ml),
    |T| Self::run::<T>((a, al), (m, ml))
);

/// `x·Wᵀ (+ b) (then GELU-tanh)` as one cuBLASLt call: the bias and the GELU run in the
/// product's epilogue instead of separate passes over the output. x `(rows, in)`, W `(out, in)`,
/// b `(out)`, all contiguous in one dtype; or, with `fp8`, x the output of
/// [`Fp8Quantize`] (its scale, then the e4m3 bytes of a `(rows, in)` tensor), W e4m3 bytes
/// `(out, in)` and b in the output's dtype.
pub(crate) struct LtLinear {
    pub gelu: bool,
    /// the algorithm chosen by timing on first use ([`crate::CudaLinear::CublasLtTuned`])
    pub tuned: bool,
    pub fp8: Option<LtFp8>,
}

/// The fp8 form of [`LtLinear`]: `y = alpha · x_scale · (x8 · W8ᵀ) + b` in `out` (bf16, f16),
/// fp32 accumulation with Hopper's fast accumulation, `alpha` the weight's per-tensor scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LtFp8 {
    pub rows: usize,
    pub alpha: f32,
    pub out: DType,
}

/// How [`LtLinear`] says that cuBLASLt has no algorithm for the operands (their alignment, the
/// shape): the caller then takes the cuBLAS path. Every other error is real.
pub(crate) const LT_UNSUPPORTED: &str = "cuBLASLt cannot run this product";

impl LtLinear {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
    ) -> candle::Result<(CudaStorage, Shape)> {
        match (self.fp8, x.0.dtype()) {
            (None, DType::U8) | (Some(_), DType::F32 | DType::BF16 | DType::F16) => Err(
                candle::Error::Msg("lt linear: fp8 operands go with an fp8 plan".into()),
            ),
            (None, _) => lt::linear::<T>(x, w, b, (self.gelu, self.tuned)),
            (Some(f), _) => match f.out {
                DType::BF16 => lt::linear_fp8::<bf16>(x, w, b, (self.gelu, self.tuned), f),
                DType::F16 => lt::linear_fp8::<f16>(x, w, b, (self.gelu, self.tuned), f),
                d => Err(candle::Error::Msg(format!(
                    "lt linear: fp8 products write bf16 or f16, not {d:?}"
                ))),
            },
        }
    }
}

cuda_op!(
    LtLinear,
    CustomOp2,
    "flux-lt-linear",
    [F32 => f32, BF16 => bf16, F16 => f16, U8 => u8],
    (self, x, xl, w, wl),
    |T| self.run::<T>((x, xl), (w, wl), None)
);

cuda_op!(
    LtLinear,
    CustomOp3,
    "flux-lt-linear-bias",
    [F32 => f32, BF16 => bf16, F16 => f16, U8 => u8],
    (self, x, xl, w, wl, b, bl),
    |T| self.run::<T>((x, xl), (w, wl), Some((b, bl)))
);

/// A packed `(out, in)` weight decoded into `dtype` by our kernels: GGUF Q8_0/Q4_K/Q6_K blocks
/// (`kernel` `q8_0`, `q4_k`, `q6_k`) from their bytes, or fp8 (`fp8_e4m3`, `fp8_e5m2`) from
/// its bytes and a scale (`per`: 0 none, 1 one value, 2 one per row) as a second operand.
pub(crate) struct Dequant {
    pub kernel: &'static str,
    pub dims: (usize, usize),
    pub dtype: DType,
    pub per: i32,
}

impl Dequant {
    /// The GGUF types our kernels decode.
    pub fn gguf_kernel(ty: crate::QuantType) -> Option<&'static str> {
        match ty {
            crate::QuantType::Q8_0 => Some("q8_0"),
            crate::QuantType::Q4_K => Some("q4_k"),
            crate::QuantType::Q6_K => Some("q6_k"),
            _ => None,
        }
    }

    fn dispatch(
        &self,
        w: (&CudaStorage, &Layout),
        scale: Option<(&CudaStorage, &Layout)>,
    ) -> candle::Result<(CudaStorage, Shape)> {
        match self.dtype {
            DType::F32 => self.run::<f32>(w, scale),
            DType::BF16 => self.run::<bf16>(w, scale),
            DType::F16 => self.run::<f16>(w, scale),
            d => Err(candle::Error::Msg(format!(
                "dequantize: unsupported dtype {d:?} on CUDA"
            ))),
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        w: (&CudaStorage, &Layout),
        scale: Option<(&CudaStorage, &Layout)>,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = w.0.device().clone();
        let (out, inp) = self.dims;
        let n = out * inp;
        let expected = match self.kernel {
            "q8_0" => n / 32 * 34,
            "q4_k" => n / 256 * 144,
            "q6_k" => n / 256 * 210,
            _ => n,
        };
        let per_ok = match (self.per, scale) {
            (0, _) => true,
            (1, Some((_, l))) => l.shape().elem_count() == 1,
            (2, Some((_, l))) => l.shape().elem_count() == out,
            _ => false,
        };
        if !w.1.is_contiguous() || w.1.shape().elem_count() != expected || !per_ok {
            return Err(candle::Error::Msg(format!(
                "dequantize {}: {expected} contiguous bytes for ({out}, {inp}) and a matching scale expected, got {:?}",
                self.kernel,
                w.1.dims()
            )));
        }
        let name = format!(
            "dequant_{}_{}",
            self.kernel,
            suffix(self.dtype, "dequantize")?
        );
        let func = func(&dev, &name, Module::Fused)?;
        // SAFETY: the grid-stride loop writes every element.
        let y = unsafe { dev.alloc::<T>(n)? };
        let wv = slice::<u8>(w.0, w.1)?;
        let ni = n as i64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = func.builder();
        bld.arg(&wv);
        let sv = scale
            .map(|(s, l)| {
                if l.is_contiguous() {
                    slice::<f32>(s, l)
                } else {
                    Err(candle::Error::Msg(
                        "dequantize: scale not contiguous".into(),
                    ))
                }
            })
            .transpose()?;
        let null = 0u64;
        let (per, cols) = (self.per, inp as i64);
        if self.kernel.starts_with("fp8") {
            match &sv {
                Some(v) => bld.arg(v),
                None => bld.arg(&null),
            };
            bld.arg(&per).arg(&cols);
        }
        bld.arg(&y).arg(&ni);
        // SAFETY: arguments match the kernel's signature; the sizes are checked above.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), (out, inp).into()))
    }
}

cuda_op!(
    Dequant,
    CustomOp1,
    "flux-dequantize",
    [U8 => u8],
    (self, w, wl),
    |_T| self.dispatch((w, wl), None)
);

cuda_op!(
    Dequant,
    CustomOp2,
    "flux-dequantize-scaled",
    [U8 => u8],
    (self, w, wl, s, sl),
    |_T| self.dispatch((w, wl), Some((s, sl)))
);

/// Bytes before the e4m3 values in [`Fp8Quantize`]'s output: the f32 scale, padded so that the
/// values start 16-byte aligned (as cuBLASLt's fp8 products want them).
pub(crate) const FP8_HEADER: usize = 16;

/// An fp8 GEMM's activations: x (contiguous, f32/bf16/f16) quantized to e4m3 with one scale
/// per tensor, as a flat u8 tensor of [`FP8_HEADER`] + n bytes (the scale, then the values); with
/// `round`, the decoded values instead, in x's dtype and shape (see
/// [`crate::fp8_round_tensor`]).
pub(crate) struct Fp8Quantize {
    pub round: bool,
}

impl Fp8Quantize {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        if !x.1.is_contiguous() {
            return Err(candle::Error::Msg(
                "fp8 quantize: needs a contiguous tensor".into(),
            ));
        }
        let n = x.1.shape().elem_count();
        let sfx = suffix(x.0.dtype(), "fp8 quantize")?;
        let absmax = func(&dev, &format!("fp8_absmax_{sfx}"), Module::Fused)?;
        let quant = func(&dev, &format!("fp8_quantize_{sfx}"), Module::Fused)?;
        let xv = slice::<T>(x.0, x.1)?;
        // a few hundred partial maxima: enough blocks to read at full bandwidth, few enough
        // that every block of the second pass reduces them cheaply
        let parts = n.div_ceil(256 * 8).clamp(1, 512);
        // SAFETY: the first kernel writes every partial (one per block of its grid).
        let partial = unsafe { dev.alloc::<f32>(parts)? };
        let ni = n as i64;
        let cfg = |blocks: usize| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = absmax.builder();
        bld.arg(&xv).arg(&ni).arg(&partial);
        // SAFETY: arguments match the kernel's signature; `parts` blocks write `parts` values.
        unsafe { bld.launch(cfg(parts)) }.w()?;
        let blocks = n.div_ceil(256).clamp(1, 4096);
        let parts_i = parts as i32;
        let null = 0u64;
        if self.round {
            // SAFETY: the grid-stride loop writes every element.
            let out = unsafe { dev.alloc::<T>(n)? };
            let mut bld = quant.builder();
            bld.arg(&xv)
                .arg(&ni)
                .arg(&partial)
                .arg(&parts_i)
                .arg(&null)
                .arg(&null)
                .arg(&out);
            // SAFETY: as above; null q and scale pointers select the rounding output.
            unsafe { bld.launch(cfg(blocks)) }.w()?;
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), x.1.shape().clone()));
        }
        // SAFETY: block 0 writes the scale, the grid-stride loop every value; the header's
        // padding is never read.
        let out = unsafe { dev.alloc::<u8>(FP8_HEADER + n)? };
        {
            let (scale, q) = (out.slice(0..4), out.slice(FP8_HEADER..));
            let mut bld = quant.builder();
            bld.arg(&xv)
                .arg(&ni)
                .arg(&partial)
                .arg(&parts_i)
                .arg(&q)
                .arg(&scale)
                .arg(&null);
            // SAFETY: as above; q holds n bytes, scale 4 (an f32; the allocation is aligned).
            unsafe { bld.launch(cfg(blocks)) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            (FP8_HEADER + n).into(),
        ))
    }
}

cuda_op!(
    Fp8Quantize,
    CustomOp1,
    "flux-fp8-quantize",
    [F32 => f32, BF16 => bf16, F16 => f16],
    (self, x, xl),
    |T| self.run::<T>((x, xl))
);

/// cuBLASLt plans: one handle and workspace per device, one plan (descriptors and the algorithm
/// cuBLASLt's heuristic picked, or with `tuned` the fastest of its first [`lt::CANDIDATES`] timed
/// on the first call) per (device, shape, dtype, epilogue, alignment), made on first use and kept
/// for the process.
mod lt {
    use super::*;
    use candle::cuda_backend::cudarc::cublaslt::{result, sys as lts};
    use candle::cuda_backend::cudarc::driver::CudaSlice;
    use std::collections::HashMap;
    use std::sync::{Arc, OnceLock};

    fn err(what: &str, e: impl std::fmt::Debug) -> candle::Error {
        candle::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    /// A cuBLASLt handle and its workspace (32 MiB, what cuBLASLt asks for on Hopper).
    struct Handle {
        raw: lts::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
    }
    // SAFETY: the handle is only used under the plan's lock, on the device's one stream.
    unsafe impl Send for Handle {}
    unsafe impl Sync for Handle {}

    const WORKSPACE: usize = 32 << 20;

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    struct Key {
        device: candle::cuda_backend::DeviceId,
        /// the output's (and the bias'; the operands' too unless `fp8`)
        dtype: DType,
        /// e4m3 operands scaled per tensor, fast accumulation
        fp8: bool,
        rows: usize,
        inp: usize,
        out: usize,
        bias: bool,
        gelu: bool,
        /// the alignment (bytes, at most 256) the pointers of x, W, y and b share
        align: u32,
        /// the algorithm timed among the heuristic's first candidates on first use
        tuned: bool,
    }

    /// Descriptors and the chosen algorithm of one product.
    struct Plan {
        desc: lts::cublasLtMatmulDesc_t,
        a: lts::cublasLtMatrixLayout_t,
        b: lts::cublasLtMatrixLayout_t,
        d: lts::cublasLtMatrixLayout_t,
        algo: lts::cublasLtMatmulAlgo_t,
        /// Tuned plans before their first call: the heuristic's candidates, best first (the
        /// first call times them and keeps the fastest in `algo`); empty afterwards.
        untimed: Vec<lts::cublasLtMatmulAlgo_t>,
    }

    /// How many of the heuristic's algorithms a tuned plan times.
    pub(super) const CANDIDATES: usize = 8;
    // SAFETY: as for Handle; a plan is used by one call at a time (its mutex).
    unsafe impl Send for Plan {}

    /// `None`: cuBLASLt had no algorithm for the key (asked once).
    type Plans = Mutex<HashMap<Key, Option<Arc<Mutex<Plan>>>>>;
    static PLANS: OnceLock<Plans> = OnceLock::new();
    static HANDLES: OnceLock<Mutex<HashMap<candle::cuda_backend::DeviceId, Arc<Handle>>>> =
        OnceLock::new();

    fn handle(dev: &CudaDevice) -> candle::Result<Arc<Handle>> {
        let mut map = HANDLES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(&dev.id()) {
            return Ok(h.clone());
        }
        let raw = result::create_handle().map_err(|e| err("handle", e))?;
        // SAFETY: cuBLASLt only writes the workspace.
        let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
        let h = Arc::new(Handle { raw, workspace });
        map.insert(dev.id(), h.clone());
        Ok(h)
    }

    fn data_type(dtype: DType) -> candle::Result<lts::cudaDataType> {
        Ok(match dtype {
            DType::F32 => lts::cudaDataType::CUDA_R_32F,
            DType::BF16 => lts::cudaDataType::CUDA_R_16BF,
            DType::F16 => lts::cudaDataType::CUDA_R_16F,
            d => return Err(err("dtype", d)),
        })
    }

    /// # Safety
    /// `value` points to a live `T`.
    unsafe fn set_desc<T>(
        desc: lts::cublasLtMatmulDesc_t,
        attr: lts::cublasLtMatmulDescAttributes_t,
        value: &T,
    ) -> candle::Result<()> {
        // SAFETY: the caller's value outlives the call, which copies it.
        unsafe {
            result::set_matmul_desc_attribute(
                desc,
                attr,
                value as *const T as *const _,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(|e| err("descriptor", e))
    }

    /// Builds the plan: row-major `y (rows, out) = x (rows, in) · Wᵀ` is, in cuBLASLt's
    /// column-major terms, `yᵀ (out × rows) = op_T(W: in × out) · xᵀ (in × rows)`; the bias
    /// (length out) adds per row of that result, as the BIAS epilogues do.
    fn make_plan(h: &Handle, key: &Key, bias_ptr: u64) -> candle::Result<Plan> {
        use lts::cublasLtMatmulDescAttributes_t as A;
        let ty = data_type(key.dtype)?;
        let in_ty = if key.fp8 {
            lts::cudaDataType::CUDA_R_8F_E4M3
        } else {
            ty
        };
        let (m, n, k) = (key.out as u64, key.rows as u64, key.inp as u64);
        let desc = result::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("descriptor", e))?;
        let epilogue = match (key.bias, key.gelu) {
            (true, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            (true, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            (false, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
            (false, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        };
        // SAFETY: every value is a live local of the attribute's type.
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if key.bias {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ty)?;
            }
            if key.fp8 {
                // no periodic promotion to f32 inside the tensor cores' accumulation
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
        }
        let layout = |ty, rows: u64, cols: u64, ld: u64| {
            result::create_matrix_layout(ty, rows, cols, ld as i64).map_err(|e| err("layout", e))
        };
        let (a, b, d) = (
            layout(in_ty, k, m, k)?,
            layout(in_ty, k, n, k)?,
            layout(ty, m, n, m)?,
        );
        let pref = result::create_matmul_pref().map_err(|e| err("preference", e))?;
        use lts::cublasLtMatmulPreferenceAttributes_t as P;
        let ws = WORKSPACE as u64;
        let align = key.align;
        // SAFETY: live locals of the attributes' types; the layouts and descriptor are live.
        let heuristic = unsafe {
            for (attr, v) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align),
            ] {
                result::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &v as *const u32 as *const _,
                    std::mem::size_of::<u32>(),
                )
                .map_err(|e| err("preference", e))?;
            }
            result::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )
            .map_err(|e| err("preference", e))?;
            let want = if key.tuned { CANDIDATES } else { 1 };
            let mut found: Vec<lts::cublasLtMatmulHeuristicResult_t> =
                Vec::with_capacity(CANDIDATES);
            let mut count = 0i32;
            let r = lts::cublasLtMatmulAlgoGetHeuristic(
                h.raw,
                desc,
                a,
                b,
                d,
                d,
                pref,
                want as i32,
                found.as_mut_ptr(),
                &mut count,
            )
            .result();
            let _ = result::destroy_matmul_pref(pref);
            let count = if r.is_ok() {
                count.clamp(0, want as i32) as usize
            } else {
                0
            };
            if count == 0 {
                let _ = result::destroy_matmul_desc(desc);
                for l in [a, b, d] {
                    let _ = result::destroy_matrix_layout(l);
                }
                return Err(candle::Error::Msg(format!(
                    "{LT_UNSUPPORTED}: {key:?}: {:?}",
                    r.err()
                )));
            }
            // SAFETY: cuBLASLt wrote `count` results (at most `want`, the capacity).
            found.set_len(count);
            found
        };
        let mut algos: Vec<_> = heuristic
            .iter()
            .filter(|r| r.state == lts::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            algos.push(heuristic[0].algo);
        }
        let algo = algos[0];
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo,
            untimed: if algos.len() > 1 { algos } else { vec![] },
        })
    }

    /// The largest power of two up to 256 that divides every address.
    fn alignment(ptrs: &[u64]) -> u32 {
        let all = ptrs
            .iter()
            .fold(256u64, |acc, p| acc.min(1 << p.trailing_zeros().min(8)));
        all as u32
    }

    /// Device addresses of one product's operands (`y = alpha · x_scale · x·Wᵀ + b`).
    struct Operands {
        x: u64,
        w: u64,
        y: u64,
        bias: Option<u64>,
        /// fp8 only: where the activations' scale is
        x_scale: Option<u64>,
        alpha: f32,
    }

    /// Runs `key`'s plan (made on first use) on `ops`, on the device's stream.
    fn run(dev: &CudaDevice, key: Key, ops: Operands) -> candle::Result<()> {
        use lts::cublasLtMatmulDescAttributes_t as A;
        let stream = dev.cuda_stream();
        let h = handle(dev)?;
        let plan = {
            let mut plans = PLANS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let entry = match plans.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = match make_plan(&h, &key, ops.bias.unwrap_or(0)) {
                        Ok(p) => Some(Arc::new(Mutex::new(p))),
                        Err(e) if e.to_string().contains(LT_UNSUPPORTED) => None,
                        Err(e) => return Err(e),
                    };
                    plans.insert(key, p.clone());
                    p
                }
            };
            entry.ok_or_else(|| candle::Error::Msg(format!("{LT_UNSUPPORTED}: {key:?}")))?
        };
        let mut plan = plan.lock().unwrap_or_else(|e| e.into_inner());
        let (wsp, _gws) = h.workspace.device_ptr(&stream);
        let beta = 0f32;
        // SAFETY: the plan's descriptors are live; the pointers are live device buffers of the
        // sizes the layouts describe (checked by the callers, which hold them until the call is
        // enqueued); the call is enqueued on the device's stream, which orders it with the
        // producers and users of the operands.
        unsafe {
            if let Some(bias) = ops.bias {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            if let Some(scale) = ops.x_scale {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale)?;
            }
        }
        let call = |plan: &Plan, algo: &lts::cublasLtMatmulAlgo_t| {
            // SAFETY: as above.
            unsafe {
                result::matmul(
                    h.raw,
                    plan.desc,
                    &ops.alpha as *const f32 as *const _,
                    &beta as *const f32 as *const _,
                    ops.w as *const _,
                    plan.a,
                    ops.x as *const _,
                    plan.b,
                    ops.y as *const _,
                    plan.d,
                    ops.y as *mut _,
                    plan.d,
                    algo,
                    wsp as *mut _,
                    WORKSPACE,
                    stream.cu_stream() as *mut _,
                )
            }
            .map_err(|e| err("matmul", e))
        };
        if !plan.untimed.is_empty() {
            let candidates = std::mem::take(&mut plan.untimed);
            plan.algo = fastest(&stream, &candidates, |algo| call(&plan, algo))?;
        }
        call(&plan, &plan.algo)
    }

    /// The candidate that runs `call` fastest: each once to warm up, then [`TIMED_CALLS`]
    /// between two CUDA events on the stream (every call computes the same product, so the last
    /// one's output is as good as any). A candidate that fails is skipped; the first is kept
    /// when none can be timed.
    fn fastest(
        stream: &std::sync::Arc<candle::cuda_backend::cudarc::driver::CudaStream>,
        candidates: &[lts::cublasLtMatmulAlgo_t],
        mut call: impl FnMut(&lts::cublasLtMatmulAlgo_t) -> candle::Result<()>,
    ) -> candle::Result<lts::cublasLtMatmulAlgo_t> {
        use candle::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let ev = |e| err("timing event", e);
        let mut best = (f32::INFINITY, candidates[0]);
        for algo in candidates {
            if call(algo).is_err() {
                continue;
            }
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            let mut ok = true;
            for _ in 0..TIMED_CALLS {
                ok &= call(algo).is_ok();
            }
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            let ms = start.elapsed_ms(&end).map_err(ev)?;
            if ok && ms < best.0 {
                best = (ms, *algo);
            }
        }
        Ok(best.1)
    }

    /// Calls per candidate timed by a tuned plan.
    const TIMED_CALLS: usize = 3;

    /// Checks `(rows, inp)`·`(out, inp)ᵀ` operands (and an `(out)` bias) are contiguous and fit.
    fn check(
        x: &Layout,
        (rows, inp): (usize, usize),
        w: &Layout,
        b: Option<&Layout>,
    ) -> candle::Result<usize> {
        let (out, w_in) = w.shape().dims2()?;
        let contiguous = x.is_contiguous()
            && w.is_contiguous()
            && b.is_none_or(|l| l.is_contiguous() && l.dims() == [out]);
        if w_in != inp || !contiguous || rows == 0 {
            return Err(candle::Error::Msg(format!(
                "lt linear: needs contiguous x ({rows}, {inp}), W ({out}, {inp}), b ({out}); got {:?}, {:?}, {:?}",
                x.dims(),
                w.dims(),
                b.map(|l| l.dims().to_vec())
            )));
        }
        Ok(out)
    }

    /// The key of a product on `ptrs` (which must share 16-byte alignment).
    fn key(
        dev: &CudaDevice,
        dtype: DType,
        fp8: bool,
        (rows, inp, out): (usize, usize, usize),
        (bias, gelu, tuned): (bool, bool, bool),
        ptrs: &[u64],
    ) -> candle::Result<Key> {
        let align = alignment(ptrs);
        if align < 16 {
            return Err(candle::Error::Msg(format!(
                "{LT_UNSUPPORTED}: operands not 16-byte aligned"
            )));
        }
        Ok(Key {
            device: dev.id(),
            dtype,
            fp8,
            rows,
            inp,
            out,
            bias,
            gelu,
            align,
            tuned,
        })
    }

    pub(super) fn linear<T: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
        (gelu, tuned): (bool, bool),
    ) -> candle::Result<(CudaStorage, Shape)> {
        use candle::cuda_backend::cudarc::driver::DevicePtrMut;
        let dev = x.0.device().clone();
        let (rows, inp) = x.1.shape().dims2()?;
        let out = check(x.1, (rows, inp), w.1, b.map(|b| b.1))?;
        let stream = dev.cuda_stream();
        let (xv, wv) = (slice::<T>(x.0, x.1)?, slice::<T>(w.0, w.1)?);
        let bv = b.map(|(s, l)| slice::<T>(s, l)).transpose()?;
        // SAFETY: cuBLASLt writes every element of y (beta = 0).
        let mut y = unsafe { dev.alloc::<T>(rows * out)? };
        {
            let (xp, _gx) = xv.device_ptr(&stream);
            let (wp, _gw) = wv.device_ptr(&stream);
            let bp = bv.as_ref().map(|v| v.device_ptr(&stream));
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let bias = bp.as_ref().map(|(p, _)| *p);
            let mut ptrs = vec![xp, wp, yp];
            ptrs.extend(bias);
            let shape = (rows, inp, out);
            let flags = (b.is_some(), gelu, tuned);
            let key = key(&dev, x.0.dtype(), false, shape, flags, &ptrs)?;
            let ops = Operands {
                x: xp,
                w: wp,
                y: yp,
                bias,
                x_scale: None,
                alpha: 1.0,
            };
            run(&dev, key, ops)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev), (rows, out).into()))
    }

    /// The fp8 product: x the [`Fp8Quantize`] bytes of `(f.rows, in)` activations, W e4m3
    /// `(out, in)`, b and y of type `Y`.
    pub(super) fn linear_fp8<Y: CudaDType + DeviceRepr>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
        (gelu, tuned): (bool, bool),
        f: LtFp8,
    ) -> candle::Result<(CudaStorage, Shape)> {
        use candle::cuda_backend::cudarc::driver::DevicePtrMut;
        let dev = x.0.device().clone();
        let (_, inp) = w.1.shape().dims2()?;
        let rows = f.rows;
        if w.0.dtype() != DType::U8
            || x.1.dims() != [FP8_HEADER + rows * inp]
            || b.is_some_and(|(s, _)| s.dtype() != f.out)
        {
            return Err(candle::Error::Msg(format!(
                "lt fp8 linear: needs quantized activations of ({rows}, {inp}), e4m3 W (out, {inp}) and a {:?} bias; got {:?}, {:?} {:?}",
                f.out,
                x.1.dims(),
                w.0.dtype(),
                w.1.dims()
            )));
        }
        let out = check(
            &Layout::contiguous((rows, inp)),
            (rows, inp),
            w.1,
            b.map(|b| b.1),
        )?;
        if !x.1.is_contiguous() {
            return Err(candle::Error::Msg("lt fp8 linear: x not contiguous".into()));
        }
        let stream = dev.cuda_stream();
        let (xv, wv) = (slice::<u8>(x.0, x.1)?, slice::<u8>(w.0, w.1)?);
        let bv = b.map(|(s, l)| slice::<Y>(s, l)).transpose()?;
        // SAFETY: cuBLASLt writes every element of y (beta = 0).
        let mut y = unsafe { dev.alloc::<Y>(rows * out)? };
        {
            let (sp, _gx) = xv.device_ptr(&stream);
            let xp = sp + FP8_HEADER as u64;
            let (wp, _gw) = wv.device_ptr(&stream);
            let bp = bv.as_ref().map(|v| v.device_ptr(&stream));
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let bias = bp.as_ref().map(|(p, _)| *p);
            let mut ptrs = vec![xp, wp, yp];
            ptrs.extend(bias);
            let shape = (rows, inp, out);
            let key = key(&dev, f.out, true, shape, (b.is_some(), gelu, tuned), &ptrs)?;
            let ops = Operands {
                x: xp,
                w: wp,
                y: yp,
                bias,
                x_scale: Some(sp),
                alpha: f.alpha,
            };
            run(&dev, key, ops)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev), (rows, out).into()))
    }
}

/// Starts loading every CUDA module the model uses (candle's eleven and our three) on a
/// background thread, so that the driver's JIT of candle's PTX (seconds on a fresh machine)
/// overlaps the loading of the weights instead of delaying the first step. Ours carry machine
/// code for the build's compute capability (sm_90 in `cargo xtask gpu build`) and load without
/// a JIT there; on other devices their PTX is compiled too. Returns at once; the thread ends
/// when every module is loaded (a failure only means the module is loaded later, on first
/// use). With `CUDA_CACHE_PATH`/`CUDA_CACHE_MAXSIZE` the driver keeps the compiled code between
/// runs (see the README).
pub fn warm_up(dev: &CudaDevice) -> std::thread::JoinHandle<()> {
    let dev = dev.clone();
    std::thread::spawn(move || {
        use candle::cuda_backend::kernels as k;
        for m in [
            &k::AFFINE,
            &k::BINARY,
            &k::CAST,
            &k::CONV,
            &k::FILL,
            &k::INDEXING,
            &k::QUANTIZED,
            &k::REDUCE,
            &k::SORT,
            &k::TERNARY,
            &k::UNARY,
        ] {
            // the module is compiled and kept by candle even though no function has this name
            let _ = dev.get_or_load_func("flux_warm_up", m);
        }
        let _ = func(&dev, "bias_add_bf16", Module::Fused);
        let _ = func(&dev, "flash_attn_bf16_d128_r64_o3", Module::FlashAttn);
        if has_hopper_kernel() {
            let _ = func(&dev, "flash_attn_sm90_bf16_d128_pp", Module::FlashAttnSm90);
        }
    })
}
