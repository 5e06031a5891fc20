"""One-off GPU check: does cuBLASLt's fp8 GEMM (torch._scaled_mm, per-tensor scales) refuse a
scale or weight that is not 16-byte aligned? (The packed-block failure of the 22 GiB row.)"""
import torch

dev = "cuda"
x = torch.randn(512, 5120, device=dev).to(torch.float8_e4m3fn)
buf = torch.zeros(5120 * 5120 + 4096, dtype=torch.uint8, device=dev)
for w_off, s_off in ((0, 0), (0, 4), (0, 16), (4, 0), (16, 0)):
    w = buf[w_off: w_off + 5120 * 5120].view(torch.float8_e4m3fn).view(5120, 5120)
    s = torch.tensor(1.0, device=dev)
    s_view = torch.zeros(64, dtype=torch.uint8, device=dev)[s_off: s_off + 4].view(torch.float32).view(())
    s_view.fill_(1.0)
    try:
        torch._scaled_mm(x, w.t(), scale_a=s, scale_b=s_view, out_dtype=torch.bfloat16, use_fast_accum=True)
        torch.cuda.synchronize()
        print(f"weight offset {w_off:3d} scale offset {s_off:3d}: ok")
    except RuntimeError as e:
        print(f"weight offset {w_off:3d} scale offset {s_off:3d}: {str(e)[:90]}")
