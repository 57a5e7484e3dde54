"""Goldens for flux-sampler: schedules, embedded timesteps and guidance, Euler trajectories,
img2img start indices and noising, and PyTorch CPU `torch.randn` noise.

BFL's sampling code (black-forest-labs/flux src/flux/sampling.py) is not a pip package; its few
lines of schedule and update arithmetic are restated below with the same torch operations in the
same order. diffusers is called directly (FlowMatchEulerDiscreteScheduler, FluxPipeline's
calculate_shift/retrieve_timesteps, FluxImg2ImgPipeline.get_timesteps).

Usage: python gen_sampler.py --out flux-sampler/tests/golden
"""

import math
import os
import subprocess
import sys
import types

import numpy as np
import torch

import common

SCHEDULE_CASES = [
    # name, steps, image_seq_len, shift (dev) or not (schnell)
    ("schnell_4", 4, 4096, False),
    ("dev_28_1024", 28, 4096, True),
    ("dev_50_1024", 50, 4096, True),
    ("dev_50_1360x768", 50, 4080, True),
    ("dev_1_16", 1, 16, True),
]
SWEEP_STEPS = range(1, 61)
# 45217: BFL's first entry is 0.99999994 there, not 1.
SWEEP_SEQ = [1, 16, 256, 1024, 4080, 4096, 6144, 16384, 45217]
NOISING_T = [0.0, 0.6, 0.8387, 0.996, 1.0]
GUIDANCE = [0.0, 1.0, 2.5, 3.0, 3.5, 4.0, 5.0, 7.0, 30.0]
NOISE_CASES = [
    # name, seed, shape
    ("latent_256", 42, (1, 16, 32, 32)),
    ("latent_200x120_ceil", 0, (1, 16, 26, 16)),
    ("latent_b2", 2**32 + 7, (2, 16, 8, 10)),
    ("tail_37", 1234567890123, (37,)),
    ("tail_1x3x5x7", 5, (1, 3, 5, 7)),
    ("small_15", 9, (15,)),
    ("small_5", 0, (5,)),
]


# ---- BFL, restated (src/flux/sampling.py) ----------------------------------------------------
def bfl_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def bfl_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def bfl_get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = bfl_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = bfl_time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def bfl_embedded(value):
    """`full((B,), value, dtype=bf16)` then the model's `1000.0 * t` (timestep_embedding)."""
    t = torch.full((1,), value, dtype=torch.bfloat16)
    return (1000.0 * t).float()[0]


# ---- diffusers -------------------------------------------------------------------------------
def diffusers_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift:  # FLUX.1-dev scheduler config
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            shift=3.0,
        )
    return FlowMatchEulerDiscreteScheduler()  # FLUX.1-schnell: shift 1.0, no dynamic shifting


def diffusers_schedule(num_steps, image_seq_len, shift):
    """What FluxPipeline.__call__ does in '5. Prepare timesteps'."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = diffusers_scheduler(shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


def diffusers_embedded(t):
    """FluxPipeline: `t.expand(B).to(bf16)`, model called with `timestep / 1000`, then the
    transformer's `timestep.to(bf16) * 1000`."""
    timestep = t.expand(1).to(torch.bfloat16)
    model_in = timestep / 1000
    return (model_in.to(torch.bfloat16) * 1000).float()[0]


def gen_schedules(out):
    tensors, cases = {}, {}
    for name, n, seq, shift in SCHEDULE_CASES:
        bfl = torch.tensor(bfl_get_schedule(n, seq, shift=shift), dtype=torch.float32)
        sch = diffusers_schedule(n, seq, shift)
        tensors[f"{name}/bfl"] = bfl
        tensors[f"{name}/diffusers_sigmas"] = sch.sigmas.float()
        tensors[f"{name}/diffusers_timesteps"] = sch.timesteps.float()
        tensors[f"{name}/bfl_embedded_t"] = torch.stack([bfl_embedded(v) for v in bfl[:-1].tolist()])
        tensors[f"{name}/diffusers_embedded_t"] = torch.stack([diffusers_embedded(t) for t in sch.timesteps])
        cases[name] = {"num_steps": n, "image_seq_len": seq, "shift": shift}
    # Sweeps: every (steps, seq) pair concatenated, for bit-exactness well beyond the named cases.
    bfl_sweep, dif_sweep, lin_sweep = [], [], []
    for n in SWEEP_STEPS:
        lin_sweep.append(torch.linspace(1, 0, n + 1))
        for seq in SWEEP_SEQ:
            bfl_sweep.append(torch.tensor(bfl_get_schedule(n, seq, shift=True), dtype=torch.float32))
            dif_sweep.append(diffusers_schedule(n, seq, True).sigmas.float())
    tensors["sweep/linspace"] = torch.cat(lin_sweep)
    tensors["sweep/bfl"] = torch.cat(bfl_sweep)
    tensors["sweep/diffusers_sigmas"] = torch.cat(dif_sweep)
    g = torch.tensor(GUIDANCE, dtype=torch.float32)
    tensors["guidance/values"] = g
    tensors["guidance/bfl_embedded"] = torch.stack([bfl_embedded(v) for v in GUIDANCE])
    tensors["guidance/diffusers_embedded"] = (
        torch.full([len(GUIDANCE)], 0.0) + g
    ).to(torch.bfloat16).mul(1000).float()
    meta = {
        "cases": cases,
        "sweep": {"steps": [SWEEP_STEPS.start, SWEEP_STEPS.stop - 1], "image_seq_len": SWEEP_SEQ},
        "guidance": GUIDANCE,
        "tolerance": "exact",
    }
    common.save(out, "schedule", tensors, meta)


def gen_euler(out):
    common.setup(0)
    steps = 4
    ts = bfl_get_schedule(steps, 64, shift=True)
    x0 = torch.randn(1, 16, 64)
    vs = [torch.randn(1, 16, 64) * 1.5 for _ in range(steps)]
    tensors = {"schedule": torch.tensor(ts, dtype=torch.float32), "x0": x0}
    for i, v in enumerate(vs):
        tensors[f"v/{i}"] = v
    # BFL denoise(): img = img + (t_prev - t_curr) * pred, in the latent's dtype.
    for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        img = x0.to(dtype)
        for i, (t_curr, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
            pred = vs[i].to(dtype)
            img = img + (t_prev - t_curr) * pred
            tensors[f"bfl_{tag}/{i}"] = img
    # diffusers: FlowMatchEulerDiscreteScheduler.step on bf16 model outputs, over the same sigmas.
    sch = diffusers_scheduler(True)
    sch.set_timesteps(sigmas=np.array(ts[:-1]), mu=math.log(1.0), device="cpu")
    # set_timesteps shifts the sigmas; overwrite them with BFL's so only step() is compared.
    sch.sigmas = torch.tensor(ts, dtype=torch.float32)
    sch.timesteps = sch.sigmas[:-1] * 1000
    for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        sch._step_index = None
        sample = x0.to(dtype)
        for i in range(steps):
            sample = sch.step(vs[i].to(dtype), sch.timesteps[i], sample, return_dict=False)[0]
            tensors[f"diffusers_{tag}/{i}"] = sample
    # img2img noising x = t·noise + (1 − t)·x0 (BFL demo_st.py), f32 and bf16.
    noise = torch.randn(1, 16, 64)
    tensors["noising/noise"] = noise
    for t in NOISING_T:
        for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            x = t * noise.to(dtype) + (1.0 - t) * x0.to(dtype)
            tensors[f"noising/bfl_{tag}/{t}"] = x
            # diffusers scale_noise at a schedule entry equal to t.
            sch = diffusers_scheduler(True)
            sch.sigmas = torch.tensor([1.0, t, 0.0], dtype=torch.float32)
            sch.timesteps = sch.sigmas[:-1] * 1000
            x = sch.scale_noise(x0.to(dtype), sch.timesteps[1:2], noise.to(dtype))
            tensors[f"noising/diffusers_{tag}/{t}"] = x
    # Strength → start index, BFL formula and diffusers' own get_timesteps.
    from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

    strengths = [i / 100 for i in range(101)] + [0.8, 0.6, 0.333, 0.95]
    rows_bfl, rows_dif = [], []
    for n in [1, 4, 7, 28, 50]:
        sch = diffusers_schedule(n, 4096, True)
        fake = types.SimpleNamespace(scheduler=sch)
        for s in strengths:
            rows_bfl.append(int((1 - s) * n))
            _, remaining = FluxImg2ImgPipeline.get_timesteps(fake, n, s, "cpu")
            rows_dif.append(n - remaining)
    tensors["strength/values"] = torch.tensor(strengths, dtype=torch.float64)
    tensors["strength/bfl_index"] = torch.tensor(rows_bfl, dtype=torch.int64)
    tensors["strength/diffusers_index"] = torch.tensor(rows_dif, dtype=torch.int64)
    meta = {
        "steps": steps,
        "image_seq_len": 64,
        "strength_num_steps": [1, 4, 7, 28, 50],
        "noising_t": NOISING_T,
        "seed": 0,
        "tolerance": "exact",
    }
    common.save(out, "euler", tensors, meta)


def gen_noise(out, portable):
    cap = torch.backends.cpu.get_cpu_capability()
    if portable:
        if cap != "DEFAULT":
            sys.exit(f"portable noise needs ATEN_CPU_CAPABILITY=default, torch reports {cap}")
    elif cap not in ("AVX2", "AVX512"):
        sys.exit(f"AVX2 noise needs an x86-64 CPU with AVX2; torch reports {cap}")
    tensors, cases = {}, {}
    for name, seed, shape in NOISE_CASES:
        for dtype, tag in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            g = torch.Generator("cpu").manual_seed(seed)
            tensors[f"{name}/{tag}"] = torch.randn(shape, dtype=dtype, generator=g)
        cases[name] = {"seed": seed, "shape": list(shape)}
    meta = {"cases": cases, "cpu_capability": cap, "tolerance": "exact"}
    common.save(out, "noise_portable" if portable else "noise", tensors, meta)


def main():
    args = common.parse_args(__doc__)
    common.setup(0)
    if os.environ.get("FLUX_GOLDEN_PORTABLE_NOISE") == "1":
        gen_noise(args.out, portable=True)
        return
    gen_schedules(args.out)
    gen_euler(args.out)
    gen_noise(args.out, portable=False)
    # PyTorch picks its CPU kernel at import time: a child process with the portable one.
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", FLUX_GOLDEN_PORTABLE_NOISE="1")
    subprocess.run([sys.executable, __file__, "--out", args.out], env=env, check=True)


if __name__ == "__main__":
    main()
