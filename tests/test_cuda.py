"""The accelerator path gives the CPU's results (skipped where no CUDA device is present)."""

from __future__ import annotations

import pytest
import torch

from streamgen import presets
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.engine import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(engine: StreamingEngine, noise: torch.Tensor, embeds: torch.Tensor, chunks: int = 5) -> torch.Tensor:
    cache = engine.new_cache((8, 8), 3, SinkWindow(1, 2))
    text, out = TextCondition(embeds), []
    for index in range(chunks):
        z = engine.denoise(cache, noise[:, : 1 if index == 0 else 3], text, 2)
        engine.commit(cache, z, text)
        out.append(z.float().cpu())
    return torch.cat(out, dim=1)


def test_cuda_fp32_equals_cpu_and_bf16_stays_close():
    components = presets.build("tiny")
    noise, embeds = torch.randn(1, 3, 16, 8, 8), torch.randn(1, 16, 32)
    cpu = run(StreamingEngine(components["transformer"], components["scheduler"]), noise, embeds)
    model = components["transformer"].to("cuda")
    gpu = run(StreamingEngine(model, components["scheduler"]), noise.cuda(), embeds.cuda())
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=0)
    model = model.to(torch.bfloat16)
    half = run(StreamingEngine(model, components["scheduler"]), noise.cuda().bfloat16(), embeds.cuda().bfloat16())
    assert (half - cpu).abs().mean() < 0.05 * cpu.abs().mean()


def test_flash_attention_matches_sdpa():
    if attention.flash_attn_func is None:
        pytest.skip("flash-attn is not installed (optional extra `flash`)")
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = attention.attend(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=0)
