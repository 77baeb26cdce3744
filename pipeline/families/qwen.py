"""Qwen v1 (Qwen-1.8B/7B/14B-Chat, model_type "qwen", remote code only), mapped onto transformers'
own Qwen2 layout by patches/qwen.yaml: its pieces and its reference run transformers' Qwen2
layers, and no remote code at all."""
from pathlib import Path

from .base import Family


class QwenV1(Family):
    def test_checkpoint(self, model) -> tuple[dict, dict]:
        """Qwen v1 names and shapes (FACTS.md section 5), written without the mapping under test."""
        a = model.architecture
        h, f, v = a.hidden_size, a.intermediate_size, a.vocab_size
        assert a.num_kv_heads == a.num_heads and a.head_dim * a.num_heads == h, "Qwen v1 has no GQA"
        shapes = {"transformer.wte.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)}
        for i in range(a.num_layers):
            p = f"transformer.h.{i}."
            shapes.update({p + "ln_1.weight": (h,), p + "attn.c_attn.weight": (3 * h, h),
                           p + "attn.c_attn.bias": (3 * h,), p + "attn.c_proj.weight": (h, h),
                           p + "ln_2.weight": (h,), p + "mlp.w1.weight": (f, h), p + "mlp.w2.weight": (f, h),
                           p + "mlp.c_proj.weight": (h, f)})
        config = {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "model_type": "qwen", "hidden_size": h, "intermediate_size": 2 * f,
            "num_attention_heads": a.num_heads, "num_hidden_layers": a.num_layers, "kv_channels": a.head_dim,
            "layer_norm_epsilon": a.rms_norm_eps, "rotary_emb_base": a.rope_theta, "rotary_pct": 1.0,
            "seq_length": a.max_position_embeddings, "max_position_embeddings": a.max_position_embeddings,
            "vocab_size": v, "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
            "bf16": False, "fp16": False, "fp32": False, "tie_word_embeddings": False,
            "initializer_range": model.source.generate.initializer_range,
        }
        return config, shapes

    def reference_model(self, config: dict, source: Path, mapping: dict):
        """transformers' Qwen2 model filled through the mapping (the checkpoint has remote code only)."""
        import torch

        from ..errors import PipelineError
        from ..model.checkpoint import Checkpoint

        ckpt = Checkpoint(source)
        with torch.device("meta"):
            model = self.classes().causal_lm(self.hf_config(config))
        weights = {name: ckpt.mapped(mapping, name).to(torch.float32) for name in mapping}
        missing = model.load_state_dict(weights, strict=False, assign=True).missing_keys
        if set(missing) - {"lm_head.weight"}:
            raise PipelineError(f"the mapped weights lack {sorted(missing)[:3]}")
        model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # meta buffers -> real
        return model.eval()


QWEN = QwenV1(name="qwen", model_type="qwen", canonical="qwen2", prefix="Qwen2", test_model="tiny-qwen-v1")
