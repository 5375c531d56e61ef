"""FP8 quantise+dequantise throughput vs a plain fp32 copy of the same tensor.

    python benchmarks/fp8_quant.py [--size 4096] [--repeats 7] [--device cpu|cuda]

Throughput is GB/s of fp32 input processed (numel × 4 bytes / median time) for
* quant_act:    quantize_act (1×128 tiles) + dequantize_act
* quant_weight: quantize_weight (128×128 blocks) + dequantize_weight
* copy:         y.copy_(x) (fp32 → fp32), the memory-bandwidth yardstick, measured in the same run.
Prints one ``key=value`` line per measurement plus the ratios to the copy. Uses CUDA if
available (unless --device cpu). The quantisers here are composed PyTorch ops (several passes
over the data), not a fused kernel, so a ratio well below 1 is expected.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.fp8 import dequantize_act, dequantize_weight, quantize_act, quantize_weight  # noqa: E402


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size × size fp32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, device=device)
    y = torch.empty_like(x)
    gb = x.numel() * x.element_size() / 1e9

    def act():
        dequantize_act(*quantize_act(x))

    def weight():
        dequantize_weight(*quantize_weight(x))

    def copy():
        y.copy_(x)

    t_copy = _median_time(copy, args.repeats, device)
    t_act = _median_time(act, args.repeats, device)
    t_w = _median_time(weight, args.repeats, device)
    res = {
        "device": str(device),
        "shape": f"{args.size}x{args.size}",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "copy_GBps": gb / t_copy,
        "quant_act_GBps": gb / t_act,
        "quant_weight_GBps": gb / t_w,
    }
    res["act_ratio_vs_copy"] = res["quant_act_GBps"] / res["copy_GBps"]
    res["weight_ratio_vs_copy"] = res["quant_weight_GBps"] / res["copy_GBps"]
    print(f"device={res['device']} shape={res['shape']} threads={res['threads']} repeats={args.repeats}")
    print(f"quant_act_GBps={res['quant_act_GBps']:.3f} copy_GBps={res['copy_GBps']:.3f} "
          f"ratio_vs_copy={res['act_ratio_vs_copy']:.3f}")
    print(f"quant_weight_GBps={res['quant_weight_GBps']:.3f} copy_GBps={res['copy_GBps']:.3f} "
          f"ratio_vs_copy={res['weight_ratio_vs_copy']:.3f}")
    return res


if __name__ == "__main__":
    main()
