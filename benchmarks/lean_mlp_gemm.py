"""Why the lean MLP costs W3 ~7 ms per layer (session 7 call 3): time its backward against the
standard path (Liger's SiLUMul + nn.Linear through autograd) at W1's and W3's shapes, and the two
orientations of down_proj's weight-gradient GEMM, on one GPU.
    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/lean_mlp_gemm.py
"""

import torch
import torch.nn.functional as F

from clustertune.worker import kernels


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    from liger_kernel.transformers.swiglu import LigerSiLUMulFunction
    for name, tokens, hidden, inter in (("W1", 23552, 1536, 8960), ("W3", 32768, 3584, 18944)):
        dev, dt = "cuda", torch.bfloat16
        gate = torch.randn(1, tokens, inter, device=dev, dtype=dt)
        up = torch.randn(1, tokens, inter, device=dev, dtype=dt)
        weight = (torch.randn(hidden, inter, device=dev, dtype=dt) / 100).requires_grad_()
        grad_out = torch.randn(1, tokens, hidden, device=dev, dtype=dt)
        g2, p2 = grad_out.view(-1, hidden), torch.randn(tokens, inter, device=dev, dtype=dt)

        def standard():
            a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
            F.linear(LigerSiLUMulFunction.apply(a, b), weight).backward(grad_out)

        def lean():
            a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
            kernels.SwiGLUDown.apply(a, b, weight).backward(grad_out)

        def clones():
            gate.clone().requires_grad_(), up.clone().requires_grad_()

        rows = {"standard fwd+bwd": timed(standard), "lean fwd+bwd": timed(lean), "two clones": timed(clones),
                "dW = g^T @ p  [h,T]@[T,i]": timed(lambda: g2.t() @ p2),
                "dW^T = p^T @ g [i,T]@[T,h]": timed(lambda: p2.t() @ g2),
                "dW^T then .t().contiguous()": timed(lambda: (p2.t() @ g2).t().contiguous()),
                "dX = g @ W  [T,h]@[h,i]": timed(lambda: g2 @ weight.detach()),
                "forward F.linear(p, W)": timed(lambda: F.linear(p2, weight.detach()))}
        for label, ms in rows.items():
            print(f"{name} {label:32s} {ms:7.3f} ms", flush=True)
        weight.grad = None


if __name__ == "__main__":
    main()
