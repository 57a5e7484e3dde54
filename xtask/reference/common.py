"""Shared helpers of the golden generators: deterministic set-up and safetensors output.

Every generator writes `<crate>/tests/golden/<name>.safetensors` with a single metadata key,
`golden`, holding one JSON record with sorted keys, so that running a generator twice gives
byte-identical files (safetensors orders several metadata keys differently from run to run).
"""

import argparse
import json
import os
import sys
from importlib import metadata

import torch
from safetensors.torch import save_file

PINNED = ["torch", "diffusers", "transformers", "safetensors", "numpy"]


def setup(seed: int = 0) -> None:
    """Single-threaded, deterministic torch."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def versions() -> dict:
    out = {}
    for name in PINNED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = "%d.%d" % sys.version_info[:2]
    return out


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="the crate's tests/golden folder")
    return p.parse_args()


def save(out_dir: str, name: str, tensors: dict, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".safetensors")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    record = dict(meta)
    record["reference"] = versions()
    save_file(clean, path, metadata={"golden": json.dumps(record, sort_keys=True)})
    size = os.path.getsize(path)
    print(f"wrote {os.path.relpath(path)} ({len(clean)} tensors, {size} bytes)")
    return path


def write_manifest(mdir: str, name: str, fields: dict, state_dict: dict) -> None:
    """`mdir/name.json`: descriptive `fields`, the reference versions, and every tensor's shape."""
    os.makedirs(mdir, exist_ok=True)
    body = dict(fields)
    body["reference"] = versions()
    body["tensors"] = {k: list(v.shape) for k, v in sorted(state_dict.items())}
    path = os.path.join(mdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.relpath(path)} ({len(body['tensors'])} tensors)")
