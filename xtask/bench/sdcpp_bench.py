"""stable-diffusion.cpp's side of `cargo xtask bench --quant`: one FLUX generation through the
`stable-diffusion-cpp-python` bindings on a given transformer GGUF, timing each sampling step
with the library's own per-step clock (the first step includes graph set-up, so the second is
the one compared). Prints one JSON line.

Usage: python sdcpp_bench.py --dit F.gguf --clip clip_l.safetensors --t5 t5.gguf --vae ae.safetensors
       --res 512 --threads 2 [--steps 2]
"""

import argparse
import json
import resource
import time

from stable_diffusion_cpp import StableDiffusion


def main():
    p = argparse.ArgumentParser(description=__doc__)
    for a in ("--dit", "--clip", "--t5", "--vae"):
        p.add_argument(a, required=True)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    t0 = time.time()
    sd = StableDiffusion(diffusion_model_path=a.dit, clip_l_path=a.clip, t5xxl_path=a.t5, vae_path=a.vae,
                         n_threads=a.threads, verbose=False)
    load = time.time() - t0
    calls = []
    t1 = time.time()
    sd.generate_image(prompt="a photo of a forest with mist", width=a.res, height=a.res, cfg_scale=1.0,
                      guidance=3.5, sample_method="euler", sample_steps=a.steps, seed=1,
                      progress_callback=lambda step, steps, secs: calls.append((step, steps, secs)))
    total = time.time() - t1
    # the progress callback also reports tensor loading; sampling steps are the calls whose
    # total is the step count, the last `steps` of them
    steps = [c for c in calls if c[1] == a.steps][-a.steps:]
    per_step = [c[2] for c in steps]
    print(json.dumps({"secs": per_step[-1] if per_step else None, "steps": per_step, "load_secs": load,
                      "generate_secs": total, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
