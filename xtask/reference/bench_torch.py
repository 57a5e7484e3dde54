"""PyTorch (diffusers FluxTransformer2DModel) as the peer of `cargo xtask bench`.

python bench_torch.py DIR --res R --iters N --threads T --out FILE: loads DIR/transformer
(diffusers layout, f32), runs one warm-up and N timed forwards on DIR/inputs_R.safetensors,
writes the output and prints one JSON line.
"""

import argparse
import json
import resource
import time

import torch
from safetensors.torch import load_file, save_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="torch.safetensors")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import FluxTransformer2DModel

    start = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(f"{a.dir}/transformer", torch_dtype=torch.float32).eval()
    load = time.perf_counter() - start
    t = load_file(f"{a.dir}/inputs_{a.res}.safetensors")

    def forward():
        with torch.no_grad():
            return model(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["y"],
                         timestep=t["timesteps"], img_ids=t["img_ids"][0], txt_ids=t["txt_ids"][0],
                         guidance=t["guidance"], return_dict=False)[0]

    out = forward()
    times = []
    for _ in range(a.iters):
        s = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - s)
    times.sort()
    save_file({"out": out.contiguous()}, a.out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"secs": times[len(times) // 2], "all": times, "load_secs": load, "peak_rss": rss}))


if __name__ == "__main__":
    main()
