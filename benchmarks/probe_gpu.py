"""What the GPU machine's torch/transformers/liger offer (run first in a device call)."""
import inspect

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
    T, H, D = 1024, 12, 128
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 300, 1024], device="cuda", dtype=torch.int32)
    try:
        varlen_attn(q, k, k, cu, cu, 724, 724)
        print("varlen GQA: ok")
    except Exception as e:
        print("varlen GQA: fails:", type(e).__name__, str(e)[:200])
except Exception as e:
    print("varlen_attn unavailable:", e)
import transformers
print("transformers", transformers.__version__)
import liger_kernel, deepspeed
print("deepspeed", deepspeed.__version__)
