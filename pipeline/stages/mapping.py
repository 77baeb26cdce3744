"""The map stage: the export-ready view of a checkpoint, without touching the checkpoint.

Writes (1) the canonical config (Qwen v1 mapped onto transformers' Qwen2 layout, following the
data in patches/<family>.yaml), (2) a tensor map: canonical tensor name -> source tensor (and row
range, for Qwen v1's fused c_attn), (3) a fingerprint per weight group (embedding, each layer,
head) so that a changed layer re-exports only its own pieces, and (4) per seq, the export config
with the overrides of patches/overrides.yaml.
"""
import hashlib
import time
from pathlib import Path

import yaml

from runtime.nets import Dims

from ..errors import PipelineError
from ..families import get_family
from ..families.base import PATCH_DIR
from ..fsutil import atomic_path, read_json, write_json, write_json_if_changed
from ..model.checkpoint import TOKENIZER_FILES, Checkpoint
from ..model.config import ModelConfig
from ..progress import say

# canonical config key -> Architecture field: what a checkpoint must agree on with its YAML
CHECKED_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}
# Read by name by the export and the verification (a missing one would be a KeyError there).
REQUIRED_KEYS = (*CHECKED_KEYS, "rms_norm_eps")


def canonical_config(source: dict, family: str, origin: str = "the checkpoint's config.json") -> dict:
    """The checkpoint's config.json expressed in the canonical (transformers) layout. `origin`
    names the file in messages."""
    of = get_family(family)
    rules, accepted = of.patch_rules(), of.source_model_types
    expected = " or ".join(map(repr, accepted))
    if "model_type" not in source:
        raise PipelineError(f"{origin} has no model_type; family {family} expects {expected}: "
                            "is it a Hugging Face model config? download it again")
    if source["model_type"] not in accepted:
        raise PipelineError(
            f"{origin} has model_type {source['model_type']!r}, but family "
            f"{family} expects {expected}: is it the checkpoint of another model?")
    if source["model_type"] != of.model_type:  # the canonical config, saved alone
        config = dict(source)
    elif "config_from" in rules:  # a multimodal checkpoint: the text model's config is nested
        nested = source.get(rules["config_from"])
        if not isinstance(nested, dict):
            raise PipelineError(f"{origin} has no '{rules['config_from']}' object, which a {family} config has: "
                                "is it complete? download it again")
        config = {"tie_word_embeddings": source.get("tie_word_embeddings", False), **nested}
    else:
        config = dict(source) if "config" not in rules else _mapped_config(source, family, rules, origin)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise PipelineError(f"{origin} lacks {', '.join(missing)}, which a {family} config has: "
                            "is it complete? download it again")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise PipelineError(f"rope scaling '{rope_type}' is not supported yet (only plain RoPE)")
    return config


def _mapped_config(source: dict, family: str, rules: dict, origin: str) -> dict:
    """A non-canonical config (Qwen v1) mapped key by key, following the family's rules."""
    for key, want in rules.get("require", {}).items():
        if source.get(key) != want:
            raise PipelineError(f"{family} checkpoint has {key}={source.get(key)!r}; only {want!r} is supported")
    config = dict(rules["constants"])
    for key, spec in rules["config"].items():
        src_key = spec["key"] if isinstance(spec, dict) else spec
        if src_key not in source:
            raise PipelineError(f"{origin} lacks '{src_key}', which a {family} config has: is it complete? "
                                "download it again")
        value = source[src_key]
        config[key] = value // 2 if isinstance(spec, dict) and spec.get("half") else value
    return config


# canonical config key -> LinearAttention field (Qwen3.5's linear-attention layers)
CHECKED_LINEAR_KEYS = {
    "linear_num_key_heads": "num_key_heads",
    "linear_num_value_heads": "num_value_heads",
    "linear_key_head_dim": "key_head_dim",
    "linear_value_head_dim": "value_head_dim",
    "linear_conv_kernel_dim": "conv_kernel",
}


def check_against_model_config(config: dict, model: ModelConfig, folder: Path) -> None:
    arch = model.architecture
    checks = [(key, getattr(arch, field)) for key, field in CHECKED_KEYS.items()]
    if arch.linear_attention:
        checks += [(key, getattr(arch.linear_attention, field)) for key, field in CHECKED_LINEAR_KEYS.items()]
        checks.append(("layer_types", arch.linear_attention.layer_types(arch.num_layers)))
    wrong = [f"{key} is {config.get(key)!r} in the checkpoint but {want} in {model.yaml_path.name}"
             for key, want in checks if config.get(key) != want]
    if wrong:
        raise PipelineError(f"checkpoint {folder} does not match model {model.name}: " + "; ".join(wrong))


def tensor_map(ckpt: Checkpoint, config: dict, family: str) -> dict:
    """canonical name -> {"name": source tensor, "rows": [start, stop] or None}."""
    rules = get_family(family).patch_rules()
    if "tensor_prefixes" in rules:
        specs = {_renamed(name, rules["tensor_prefixes"]): name for name in ckpt.tensor_index}
    elif "tensors" in rules:
        specs = dict(rules["tensors"])
        for i in range(config["num_hidden_layers"]):
            specs.update({k.format(i=i): _format(v, i) for k, v in rules["layer_tensors"].items()})
    else:
        specs = {name: name for name in ckpt.tensor_index}
    if config.get("tie_word_embeddings"):
        specs.pop("lm_head.weight", None)
    mapping = {}
    for canonical, spec in specs.items():
        if isinstance(spec, str):
            mapping[canonical] = {"name": spec, "rows": None}
        else:
            rows = ckpt.shape(spec["name"])[0]
            if rows % spec["of"]:
                raise PipelineError(f"{spec['name']} has {rows} rows, not divisible into {spec['of']} parts")
            step = rows // spec["of"]
            mapping[canonical] = {"name": spec["name"], "rows": [spec["part"] * step, (spec["part"] + 1) * step]}
    _check_complete(mapping, config, ckpt)
    return mapping


def _renamed(name: str, prefixes: dict) -> str:
    for source, canonical in prefixes.items():
        if name.startswith(source):
            return canonical + name[len(source):]
    return name


def _format(spec, i):
    return spec.format(i=i) if isinstance(spec, str) else {**spec, "name": spec["name"].format(i=i)}


def _check_complete(mapping: dict, config: dict, ckpt: Checkpoint) -> None:
    """The map must give exactly what transformers' model expects (checked on the meta device)."""
    import torch

    from ..families import canonical_classes, hf_config

    with torch.device("meta"):
        model = canonical_classes(config["model_type"]).causal_lm(hf_config(config))
    expected = set(model.state_dict())
    if config.get("tie_word_embeddings"):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(mapping))
    absent_sources = sorted({m["name"] for m in mapping.values()} - set(ckpt.tensor_index))
    if missing or absent_sources:
        what = missing or absent_sources
        raise PipelineError(
            f"checkpoint {ckpt.folder} lacks {len(what)} tensors the model needs (first: {what[0]}); "
            "is it complete, and the right model?")
    extra = set(mapping) - expected
    for name in extra:  # e.g. rotary inv_freq buffers saved by old exports
        del mapping[name]


def weight_groups(num_layers: int, mapping: dict) -> dict[str, list[str]]:
    """Group canonical tensors by the pieces that use them."""
    groups = {"embed": ["model.embed_tokens.weight"],
              "head": ["model.norm.weight", "lm_head.weight" if "lm_head.weight" in mapping
                       else "model.embed_tokens.weight"]}
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        groups[f"layer_{i}"] = sorted(n for n in mapping if n.startswith(prefix))
    return groups


def fingerprint(ckpt: Checkpoint, mapping: dict, names: list[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a group's tensors (one at a time), each
    checked for NaN and inf while it is loaded."""
    import torch

    h = hashlib.sha256()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for the finiteness sums: more threads only spin beside the hashing
    try:
        for name in names:
            tensor = ckpt.mapped(mapping, name).contiguous()
            _check_finite(ckpt, mapping[name], tensor)
            h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            h.update(tensor.view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
            del tensor
    finally:
        torch.set_num_threads(threads)
    ckpt.release()  # one group's pages resident at a time
    return h.hexdigest()


def _check_finite(ckpt: Checkpoint, entry: dict, tensor) -> None:
    """Corrupt weights are named here, not as NaN outputs stages later. A sum is NaN or inf
    whenever a value is, and costs a fifteenth of the hashing (one thread, about 30 GiB/s), where
    isfinite() on every value costs more than the hashing. A sum can also overflow (fp16), so the
    count decides."""
    import torch

    if tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return  # integers are finite; float8 has no sum
    if torch.isfinite(tensor.sum()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        shard = ckpt.tensor_index[entry["name"]][0].name
        rows = f"rows {entry['rows'][0]}..{entry['rows'][1]} of " if entry["rows"] else ""
        raise PipelineError(
            f"checkpoint {ckpt.folder} has corrupt weights: NaN or inf in {rows}tensor {entry['name']} (in {shard}): "
            f"{bad} of {tensor.numel()} values; download {shard} again")


def export_config(config: dict, seq: int) -> dict:
    overrides = yaml.safe_load((PATCH_DIR / "overrides.yaml").read_text(encoding="utf-8"))
    out = dict(config)
    out.update({k: seq if v == "SEQ" else v for k, v in overrides.items()})
    return out


def copy_tokenizer(source: Path, dest: Path) -> None:
    """The tokenizer goes with the model, so a folder of pieces (or a bmodel) runs on its own."""
    import shutil

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(source / name, tmp)


def map_weights(model_name: str, family: str, paths) -> None:
    """The per-model map stage: canonical config, tensor map, and a fingerprint per weight group.
    Every group is hashed (and checked for NaN and inf) before any file is written, so a corrupt
    layer leaves nothing behind; a file whose content is the same keeps its mtime."""
    start = time.perf_counter()
    ckpt = Checkpoint(Path(read_json(paths.source)["folder"]))
    config = canonical_config(ckpt.config, family)
    mapping = tensor_map(ckpt, config, family)
    groups = weight_groups(config["num_hidden_layers"], mapping)
    fingerprints = {}
    for k, (group, names) in enumerate(groups.items(), 1):
        fingerprints[group] = {"sha256": fingerprint(ckpt, mapping, names), "tensors": names}
        say(f"[map] fingerprint {group} ({k}/{len(groups)})")
    changed = [g for g, data in fingerprints.items() if write_json_if_changed(paths.fingerprint(g), data)]
    write_json_if_changed(paths.tensor_map, mapping)
    write_json_if_changed(paths.canonical_config, config)
    say(f"[map] {model_name}: {len(mapping)} tensors mapped, {len(changed)} weight groups new or changed, "
        f"{time.perf_counter() - start:.1f} s")


def map_seq(model_name: str, seq: int, paths) -> None:
    """The per-seq map stage: the export config, the tokenizer and the dims the runtime reads."""
    config = export_config(read_json(paths.canonical_config), seq)
    write_json(paths.export_config, config)
    copy_tokenizer(Path(read_json(paths.source)["folder"]), paths.onnx)
    write_json(paths.onnx / "model.json", {"model": model_name, **Dims.from_config(config).runtime_info()})
