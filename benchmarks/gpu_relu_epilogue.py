"""The measurement behind the CUDA forward of linear_relu using cuBLASLt's RELU_BIAS epilogue.

torch._addmm_activation(bias, x, w.t()) runs the GEMM with cuBLASLt's RELU_BIAS epilogue,
which saves handgrad's activation pass; csrc/cuda/kernels.cu uses it for ReLU with a bias
(and in_features > 0). This prints whether that epilogue keeps a NaN (eager's relu does),
and the forward times at one large shape, replayed from CUDA graphs, next to handgrad's
and a bare mm.

    python benchmarks/gpu_relu_epilogue.py
"""

import torch
import torch.nn.functional as F

import handgrad.functional as hf
from bench_layers import measure, replay_from_cuda_graph


def main():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g).cuda()
    x[3, 5] = float("nan")
    w, b = torch.randn(32, 64, generator=g).cuda(), torch.randn(32, generator=g).cuda()
    for name, out in (("eager relu(linear)", F.relu(F.linear(x, w, b))),
                      ("handgrad linear_relu", hf.linear_relu(x, w, b)),
                      ("cuBLASLt RELU_BIAS (_addmm_activation)", torch._addmm_activation(b, x, w.t()))):
        print(f"{name}: NaN kept in row 3: {bool(out[3].isnan().all())}")

    N, K, M = 8192, 1024, 1024
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(N, K, generator=g).to("cuda", dtype)
        w = (torch.randn(M, K, generator=g) / K**0.5).to("cuda", dtype)
        b = torch.randn(M, generator=g).to("cuda", dtype)
        steps = {
            "mm": replay_from_cuda_graph(lambda: torch.mm(x, w.t())),
            "addmm": replay_from_cuda_graph(lambda: torch.addmm(b, x, w.t())),
            "_addmm_activation": replay_from_cuda_graph(lambda: torch._addmm_activation(b, x, w.t())),
            "handgrad linear_relu": replay_from_cuda_graph(lambda: hf.linear_relu(x, w, b)),
            "eager relu(linear)": replay_from_cuda_graph(lambda: F.relu(F.linear(x, w, b))),
        }
        medians = measure(steps, rounds=5, min_time_per_round=0.03)
        print(f"\n{N}x{K}x{M} {dtype}, forward replayed from a CUDA graph:")
        for name, seconds in medians.items():
            print(f"  {name:22s} {seconds * 1e6:8.1f} us  {seconds / medians['mm']:.2f} x mm")


if __name__ == "__main__":
    main()
