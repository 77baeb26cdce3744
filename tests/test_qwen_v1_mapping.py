"""The Qwen v1 -> Qwen2 mapping against an independent forward pass written here from Qwen v1's
architecture (fused c_attn with bias, w2 gate / w1 up, RMSNorm, rotate-half RoPE over the whole
head, base rotary_emb_base), on the raw v1 tensors: no mapping code involved."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.stages.verify import reference_model

pytestmark = pytest.mark.fast


def qwen_v1_logits(folder, ids):
    cfg = json.loads((folder / "config.json").read_text())
    t = {}
    for f in folder.glob("*.safetensors"):
        t.update({k: v.float() for k, v in load_file(f).items()})
    hidden, heads, d, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"], cfg["layer_norm_epsilon"]
    seq = len(ids)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv_freq = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # x: [heads, seq, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    h = t["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        x = rms(h, t[p + "ln_1.weight"])
        qkv = x @ t[p + "attn.c_attn.weight"].T + t[p + "attn.c_attn.bias"]
        q, k, v = (part.reshape(seq, heads, d).transpose(0, 1) for part in qkv.split(hidden, -1))
        scores = rope(q) @ rope(k).transpose(1, 2) / d ** 0.5 + causal
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, hidden)
        h = h + attn @ t[p + "attn.c_proj.weight"].T
        x = rms(h, t[p + "ln_2.weight"])
        mlp = (x @ t[p + "mlp.w1.weight"].T) * torch.nn.functional.silu(x @ t[p + "mlp.w2.weight"].T)
        h = h + mlp @ t[p + "mlp.c_proj.weight"].T
    return rms(h, t["transformer.ln_f.weight"]) @ t["lm_head.weight"].T


def test_mapped_qwen2_equals_independent_qwen_v1_forward(tiny_builds):
    build_dir, results = tiny_builds
    assert results["tiny-qwen-v1"].code == 0
    model_dir = build_dir / "tiny-qwen-v1"
    config = json.loads((model_dir / "seq32" / "config.json").read_text())
    mapping = json.loads((model_dir / "canonical" / "tensor_map.json").read_text())
    ids = list(range(3, 3 + 29, 1))
    expected = qwen_v1_logits(model_dir / "checkpoint", ids)
    model = reference_model(config, model_dir / "checkpoint", mapping, "qwen")
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    assert expected.shape == got.shape == (len(ids), config["vocab_size"])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # the check has teeth: swapping gate and up (a classic mapping bug) is caught
    layer = model.model.layers[0].mlp
    layer.gate_proj.weight, layer.up_proj.weight = layer.up_proj.weight, layer.gate_proj.weight
    with torch.no_grad():
        swapped = model(torch.tensor([ids])).logits[0]
    assert (swapped - expected).abs().max() > 1e-2
