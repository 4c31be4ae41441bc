"""bitsandbytes' AdamW8bit on LLaMA-7B's tensor shapes: the peer figure for benches/gpu_step.rs.

    python3 benches/bnb_adamw8bit.py [--dtype bf16|f32|both] [--layers 32] [--steps 20]

Same shapes, dtypes, block size (bitsandbytes' 256) and timing as gpu_step.rs: 3 warm-up steps,
then CUDA events around `steps` steps; prints one markdown row per dtype (ms/step and the host ms
per step() call). Needs PyTorch with CUDA and bitsandbytes (0.50.2 per ../shared/gpu/README.md).
"""

import argparse
import time

import torch

import bitsandbytes as bnb

HIDDEN, FFN, VOCAB = 4096, 11008, 32000


def shapes(layers):
    s = [(VOCAB, HIDDEN)]
    for _ in range(layers):
        s += [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
        s += [(HIDDEN,), (HIDDEN,)]
    return s + [(HIDDEN,), (VOCAB, HIDDEN)]


def run(dtype, layers, steps):
    params = []
    for shape in shapes(layers):
        p = torch.nn.Parameter((torch.randn(shape, device="cuda") * 0.02).to(dtype))
        p.grad = (torch.randn(shape, device="cuda") * 1e-3).to(dtype)
        params.append(p)
    n = sum(p.numel() for p in params)
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host = time.perf_counter()
    for _ in range(steps):
        opt.step()
    host_ms = (time.perf_counter() - host) * 1e3 / steps
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / steps
    del opt, params
    torch.cuda.empty_cache()
    return n, ms, host_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="both", choices=["bf16", "f32", "both"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    dtypes = {"bf16": [torch.bfloat16], "f32": [torch.float32]}.get(
        a.dtype, [torch.bfloat16, torch.float32]
    )
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| what | params | ms/step | host ms/call |")
    print("|---|---|---|---|")
    for dtype in dtypes:
        n, ms, host_ms = run(dtype, a.layers, a.steps)
        print(f"| bitsandbytes AdamW8bit ({dtype}) | {n / 1e6:.1f} M | {ms:.2f} | {host_ms:.3f} |")


if __name__ == "__main__":
    main()
