"""HF-layout checkpoints: FP8 (weight_scale_inv) checkpoints, strict key/shape checking, broken files."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from dsmoe import ops
from dsmoe.models import CheckpointError, DeepseekV3Config, DeepseekV3ForCausalLM
from dsmoe.nn import fp8_autocast
from util import calc_diff, rel_err

CFG = dict(vocab_size=50, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
           first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32,
           v_head_dim=32, num_nextn_predict_layers=1)


@pytest.fixture
def saved(tmp_path):
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**CFG), fp8=False).eval()
    m.save_pretrained(tmp_path, max_shard_size=300_000)
    return m, tmp_path


def test_fp8_checkpoint_loads_and_matches_dequantized_model(tmp_path):
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**CFG), fp8=False).eval()
    m.save_pretrained(tmp_path, quantize_fp8=True, dtype=torch.bfloat16)
    cfgj = json.load(open(tmp_path / "config.json"))
    assert cfgj["quantization_config"]["weight_block_size"] == [128, 128]
    idx = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    for k in ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv",
              "model.layers.2.eh_proj.weight_scale_inv", "model.layers.2.shared_head.head.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert k in idx, k
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in idx      # gate stays high precision
    served = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert served.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert served.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    deq = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, dequantize_fp8=True)
    # the dequantized master weights are exactly the block dequantization
    w = m.model.layers[0].self_attn.q_b_proj.weight.detach()
    wq, ws = ops.per_block_quant_fp8(w)
    assert torch.equal(deq.model.layers[0].self_attn.q_b_proj.weight,
                       ops.per_block_dequant_fp8(wq, ws, out_dtype=torch.float32))
    ids = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        with fp8_autocast(False):
            ref = deq(ids).logits          # FP8 weights, unquantized activations: the same math
            assert rel_err(served(ids).logits, ref) < 1e-5
        y = served(ids).logits             # activations quantized 1x128 too
        y_deq_fp8 = deq(ids).logits        # dequantized weights re-quantized (same blocks) + FP8 activations
    # the whole difference to the dequantized model is activation quantization: the dequantized model run
    # with FP8 activations gives the same logits (re-quantizing a dequantized block reproduces its bytes)
    assert rel_err(y, y_deq_fp8) < 1e-3, rel_err(y, y_deq_fp8)
    e = rel_err(y, ref)
    assert 1e-5 < e < 0.3 and calc_diff(y, ref) < 2e-2, e


def test_roundtrip_and_missing_unexpected_shape_errors(saved, tmp_path_factory):
    m, path = saved
    again = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    from safetensors.torch import load_file, save_file
    idx = json.load(open(path / "model.safetensors.index.json"))["weight_map"]

    def rewrite(key, fn):
        shard = path / idx[key]
        t = load_file(shard)
        fn(t)
        save_file(t, shard)

    k_miss = "model.layers.1.mlp.experts.2.up_proj.weight"
    rewrite(k_miss, lambda t: t.pop(k_miss))
    with pytest.raises(CheckpointError, match="lacks tensors its index lists.*experts.2.up_proj"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    # consistent index, key really missing
    del idx[k_miss]
    json.dump({"weight_map": idx}, open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*experts\.2\.up_proj"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    m.save_pretrained(path, max_shard_size=300_000)
    idx = json.load(open(path / "model.safetensors.index.json"))["weight_map"]
    k = "model.layers.0.mlp.up_proj.weight"
    rewrite(k, lambda t: t.__setitem__("model.layers.0.mlp.bogus.weight", torch.zeros(3)))
    idx["model.layers.0.mlp.bogus.weight"] = idx[k]
    json.dump({"weight_map": idx}, open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\).*mlp\.bogus\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    m.save_pretrained(path, max_shard_size=300_000)
    idx = json.load(open(path / "model.safetensors.index.json"))["weight_map"]
    k = "model.layers.0.self_attn.kv_b_proj.weight"
    rewrite(k, lambda t: t.__setitem__(k, t[k][:-1].clone()))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(path)


def test_truncated_corrupt_and_missing_files(saved):
    m, path = saved
    idx = json.load(open(path / "model.safetensors.index.json"))["weight_map"]
    shard = sorted(set(idx.values()))[-1]
    data = open(path / shard, "rb").read()
    open(path / shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read shard .*{shard}"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    open(path / shard, "wb").write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read shard .*{shard}"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    os.remove(path / shard)
    with pytest.raises(CheckpointError, match=f"shard .*{shard} listed in the index does not exist"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        DeepseekV3ForCausalLM.from_pretrained(path / "nowhere")


def test_from_pretrained_dtype_names(saved):
    """HF-style dtype arguments: names and "auto" (the checkpoint's torch_dtype), and a clear error otherwise."""
    m, path = saved
    assert json.load(open(path / "config.json"))["torch_dtype"] == "float32"
    for dt, want in (("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("auto", torch.float32),
                     (None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        got = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dt)
        assert got.lm_head.weight.dtype == want, dt
        assert torch.equal(got.lm_head.weight, m.lm_head.weight.to(want))
    with pytest.raises(ValueError, match=r"argument 'dtype' must be a torch dtype, 'auto' or one of .*got 'int8'"):
        DeepseekV3ForCausalLM.from_pretrained(path, dtype="int8")
    with pytest.raises(ValueError, match=r"argument 'dtype' must be float32, bfloat16 or float16, got torch.int32"):
        DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.int32)


def test_resave_with_fewer_shards_leaves_one_checkpoint(saved):
    m, path = saved
    before = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(before) > 1
    m.save_pretrained(path)  # default shard size: one shard
    after = sorted(p.name for p in path.glob("*.safetensors"))
    assert after == ["model-00001-of-00001.safetensors"]
    idx = json.load(open(path / "model.safetensors.index.json"))["weight_map"]
    assert set(idx.values()) == set(after)
    again = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- loading follows the checkpoint
def _tensors(path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for p in sorted(path.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _rewrite(path, edit) -> None:
    """Rewrites a checkpoint as one model.safetensors after ``edit(tensors)`` (no index left)."""
    from safetensors.torch import save_file
    t = _tensors(path)
    edit(t)
    for p in list(path.glob("*.safetensors")) + list(path.glob("*.index.json")):
        p.unlink()
    save_file({k: v.contiguous() for k, v in t.items()}, path / "model.safetensors")


def _edit_config(path, edit) -> None:
    d = json.load(open(path / "config.json"))
    edit(d)
    (path / "config.json").write_text(json.dumps(d))


def _fp8_flags(model) -> set:
    return {m.fp8 for m in model.modules() if isinstance(getattr(m, "fp8", None), bool)}


def test_fp8_default_follows_config_and_checkpoint(tmp_path):
    from dsmoe.models import DecoderLayer
    from dsmoe.models.deepseek_v3 import DeepseekV3Model
    cfg = DeepseekV3Config(**CFG)
    qcfg = cfg.replace(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    # constructing from a config: FP8 exactly when the config describes an FP8 checkpoint; explicit wins
    assert _fp8_flags(DeepseekV3ForCausalLM(cfg)) == {False}
    assert _fp8_flags(DeepseekV3Model(cfg)) == {False} and _fp8_flags(DecoderLayer(cfg, 1)) == {False}
    assert _fp8_flags(DeepseekV3ForCausalLM(qcfg)) == {True}
    assert _fp8_flags(DeepseekV3Model(qcfg)) == {True} and _fp8_flags(DecoderLayer(qcfg, 1)) == {True}
    assert _fp8_flags(DeepseekV3ForCausalLM(cfg, fp8=True)) == {True}
    assert _fp8_flags(DeepseekV3ForCausalLM(qcfg, fp8=False)) == {False}
    with pytest.raises(TypeError, match="argument 'fp8' must be None, True or False, got 'yes'"):
        DeepseekV3ForCausalLM(cfg, fp8="yes")
    # loading: a BF16 checkpoint computes in BF16/FP32 by default, an FP8 one in FP8
    m = DeepseekV3ForCausalLM(cfg).eval()
    bf, f8 = tmp_path / "bf16", tmp_path / "fp8"
    m.save_pretrained(bf, dtype="bfloat16")
    m.save_pretrained(f8, quantize_fp8=True)
    got = DeepseekV3ForCausalLM.from_pretrained(bf)
    assert _fp8_flags(got) == {False} and got.lm_head.weight.dtype == torch.bfloat16
    assert got.config.quantization_config is None
    assert _fp8_flags(DeepseekV3ForCausalLM.from_pretrained(bf, fp8=True)) == {True}
    served = DeepseekV3ForCausalLM.from_pretrained(f8)
    assert _fp8_flags(served) == {True} and served.config.is_fp8_checkpoint
    assert served.model.layers[1].mlp.experts.up_proj.dtype == torch.float8_e4m3fn
    off = DeepseekV3ForCausalLM.from_pretrained(f8, fp8=False)
    assert _fp8_flags(off) == {False} and off.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    deq = DeepseekV3ForCausalLM.from_pretrained(f8, dequantize_fp8=True)
    assert _fp8_flags(deq) == {True} and deq.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    assert deq.config.quantization_config is None
    # FP8 weights without a quantization_config still make the checkpoint FP8
    _edit_config(f8, lambda d: d.pop("quantization_config"))
    assert _fp8_flags(DeepseekV3ForCausalLM.from_pretrained(f8)) == {True}


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_absent_mtp_weights_load_the_main_model_and_warn_once(tmp_path, n_mtp):
    import warnings
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**{**CFG, "num_nextn_predict_layers": n_mtp})).eval()
    m.save_pretrained(tmp_path)
    L = CFG["num_hidden_layers"]
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if any(k.startswith(f"model.layers.{L + i}.")
                                                                        for i in range(n_mtp))])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    mine = [x for x in w if "MTP" in str(x.message)]
    assert len(mine) == 1 and f"num_nextn_predict_layers={n_mtp}" in str(mine[0].message), [str(x.message) for x in w]
    assert got.config.num_nextn_predict_layers == 0 and len(got.mtp_layers) == 0
    assert len(got.model.layers) == L
    ids = torch.randint(0, CFG["vocab_size"], (2, 13))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, m(ids).logits)
        assert got(ids, return_mtp=True).mtp_logits is None


@pytest.mark.parametrize("keep", [0, 1])
def test_mtp_weights_beyond_the_config_are_skipped_with_a_warning(tmp_path, keep):
    """config.json asks for fewer MTP modules than the checkpoint holds (e.g. set to 0 to serve without
    MTP): the extra layers are not loaded, one warning says so (transformers ignores them too)."""
    import json
    import warnings
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**{**CFG, "num_nextn_predict_layers": 2})).eval()
    m.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["num_nextn_predict_layers"] = keep
    (tmp_path / "config.json").write_text(json.dumps(c))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    mine = [x for x in w if "not loaded" in str(x.message)]
    L = CFG["num_hidden_layers"]
    assert len(mine) == 1 and str(list(range(L + keep, L + 2))) in str(mine[0].message), [str(x.message) for x in w]
    assert got.config.num_nextn_predict_layers == keep and len(got.mtp_layers) == keep
    ids = torch.randint(0, CFG["vocab_size"], (2, 13))
    with torch.no_grad():
        a, b = got(ids, return_mtp=True), m(ids, return_mtp=True)
        assert torch.equal(a.logits, b.logits)
        if keep:
            assert torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_partial_mtp_weights_are_an_error_naming_the_missing_keys(tmp_path):
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**CFG))
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: (t.pop("model.layers.2.eh_proj.weight"), t.pop("model.layers.2.hnorm.weight")))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\) \(2 of them MTP weights.*"
                                              r"model\.layers\.2\.eh_proj\.weight.*model\.layers\.2\.hnorm\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    # only the MTP copies of the embedding and head: still a partial MTP module
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")
                                  and not k.endswith(("embed_tokens.weight", "shared_head.head.weight"))])
    with pytest.raises(CheckpointError, match=r"MTP weights.*model\.layers\.2\.eh_proj\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


_LIN = "model.layers.0.self_attn.q_a_proj.weight"
_EXP = "model.layers.1.mlp.experts.2.gate_proj.weight"


def _deq(t, k):
    return ops.per_block_dequant_fp8(t[k], t[k + "_scale_inv"], out_dtype=torch.float32)


_PAIRING = {
    # a scale beside a weight that is not float8_e4m3fn was silently ignored (wrong weights loaded)
    "scale_beside_bf16_weight": (lambda t: t.__setitem__(_LIN, _deq(t, _LIN).bfloat16()),
                                 rf"{_LIN}_scale_inv is beside {_LIN} of dtype torch\.bfloat16"),
    "uint8_bytes_with_scale": (lambda t: t.__setitem__(_LIN, t[_LIN].view(torch.uint8)),
                               rf"{_LIN} has dtype torch\.uint8.*{_LIN}_scale_inv is beside {_LIN} of dtype torch\.uint8"),
    "e5m2_weight_with_scale": (lambda t: t.__setitem__(_LIN, _deq(t, _LIN).to(torch.float8_e5m2)),
                               rf"{_LIN} has dtype torch\.float8_e5m2.*{_LIN}_scale_inv is beside"),
    "fp8_weight_without_scale": (lambda t: t.pop(_LIN + "_scale_inv"),
                                 rf"{_LIN} is float8_e4m3fn but {_LIN}_scale_inv is missing"),
    "wrong_scale_shape": (lambda t: t.__setitem__(_LIN + "_scale_inv", torch.ones(2, 1)),
                          rf"{_LIN}_scale_inv has shape \(2, 1\), expected \(1, 1\)"),
    "expert_scale_wrong_shape": (lambda t: t.__setitem__(_EXP + "_scale_inv", torch.ones(1, 2)),
                                 rf"{_EXP}_scale_inv has shape \(1, 2\), expected \(1, 1\)"),
    "scale_without_weight": (lambda t: t.__setitem__("model.layers.0.mlp.nothing.weight_scale_inv", torch.ones(1, 1)),
                             r"model\.layers\.0\.mlp\.nothing\.weight_scale_inv has no weight"),
    "fp8_router_weight": (lambda t: t.update({"model.layers.1.mlp.gate.weight": t["model.layers.1.mlp.gate.weight"].to(
                              torch.float8_e4m3fn), "model.layers.1.mlp.gate.weight_scale_inv": torch.ones(1, 1)}),
                          r"model\.layers\.1\.mlp\.gate\.weight is float8_e4m3fn but its module is not an FP8 linear"),
    "mixed_expert_dtypes": (lambda t: (t.__setitem__(_EXP, _deq(t, _EXP).bfloat16()), t.pop(_EXP + "_scale_inv")),
                            rf"mixed dtypes among the routed experts of model\.layers\.1\.mlp\.experts.*{_EXP}"),
    "scale_int_dtype": (lambda t: t.__setitem__(_LIN + "_scale_inv", torch.ones(1, 1, dtype=torch.int32)),
                        rf"{_LIN}_scale_inv has dtype torch\.int32"),
}


@pytest.mark.parametrize("case", sorted(_PAIRING))
def test_weight_scale_inv_pairing_errors_name_the_keys(tmp_path, case):
    edit, msg = _PAIRING[case]
    DeepseekV3ForCausalLM(DeepseekV3Config(**CFG)).save_pretrained(tmp_path, quantize_fp8=True)
    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match=msg):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=msg):    # the fine-tuning path applies the same rules
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, dequantize_fp8=True)


def test_scale_beside_a_bf16_checkpoint_weight_is_an_error(tmp_path):
    DeepseekV3ForCausalLM(DeepseekV3Config(**CFG)).save_pretrained(tmp_path, dtype=torch.bfloat16)
    _rewrite(tmp_path, lambda t: t.__setitem__(_EXP + "_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=rf"{_EXP}_scale_inv is beside {_EXP} of dtype torch\.bfloat16"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


_CONFIG_ERRORS = {
    "missing_hidden_size": (lambda d: d.__delitem__("hidden_size"), r"lacks required field\(s\) \['hidden_size'\]"),
    "nearly_empty": (lambda d: {"model_type": "deepseek_v3"},
                     r"lacks required field\(s\) \['vocab_size', 'hidden_size', .*'v_head_dim'\]"),
    "bool_for_int": (lambda d: d.__setitem__("hidden_size", True), r"hidden_size must be an int >= 1, got True \(boolean\)"),
    "float_for_int": (lambda d: d.__setitem__("num_nextn_predict_layers", 1.0),
                      r"num_nextn_predict_layers must be an int >= 0, got 1\.0 \(number\)"),
    "int_for_bool": (lambda d: d.__setitem__("norm_topk_prob", 1), r"norm_topk_prob must be a boolean, got 1 \(integer\)"),
    "string_for_number": (lambda d: d.__setitem__("rms_norm_eps", "1e-6"), r"rms_norm_eps must be a number, got '1e-6'"),
    "bool_for_number": (lambda d: d.__setitem__("routed_scaling_factor", False),
                        r"routed_scaling_factor must be a number, got False \(boolean\)"),
    "null_required": (lambda d: d.__setitem__("vocab_size", None), r"field 'vocab_size' must not be null"),
    "yarn_without_factor": (lambda d: d.update(rope_scaling={"type": "yarn", "original_max_position_embeddings": 16},
                                               rope_parameters=None),
                            r"rope_scaling: YaRN needs 'factor'"),
    "yarn_v5_without_factor": (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4},
                                                  rope_scaling=None),
                               r"YaRN needs 'factor'"),
    "rope_scaling_not_object": (lambda d: d.update(rope_scaling="yarn", rope_parameters=None),
                                r"field 'rope_scaling' must be an object or null, got 'yarn'"),
    "other_quantization": (lambda d: d.__setitem__("quantization_config", {"quant_method": "awq"}),
                           r"quantization_config\.quant_method must be 'fp8'"),
    "config_is_array": (lambda d: [d], r"config\.json must hold a JSON object, got \[.*\(array\)"),
    "config_is_number": (lambda d: 3, r"must hold a JSON object, got 3 \(integer\)"),
}


@pytest.mark.parametrize("case", sorted(_CONFIG_ERRORS))
def test_config_errors_name_the_field(saved, case):
    import time
    _, path = saved
    edit, msg = _CONFIG_ERRORS[case]
    d = json.load(open(path / "config.json"))
    out = edit(d)
    (path / "config.json").write_text(json.dumps(d if out is None else out))
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=msg):
        DeepseekV3ForCausalLM.from_pretrained(path)
    assert time.perf_counter() - t < 1.0    # before any model is built


def test_missing_config_and_non_object_index(saved):
    _, path = saved
    idx = path / "model.safetensors.index.json"
    good = idx.read_text()
    idx.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid safetensors index \(must be a JSON object, got list\)"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    idx.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    with pytest.raises(CheckpointError, match=r"'weight_map' must be an object"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    idx.write_text(good)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        DeepseekV3ForCausalLM.from_pretrained(path)


def test_huge_config_over_tiny_checkpoint_fails_fast_without_allocating(saved):
    """The 671B sizes in config.json over a 0.6 MB checkpoint: rejected from the headers in milliseconds."""
    import resource
    import time
    _, path = saved
    v3 = DeepseekV3Config()
    _edit_config(path, lambda d: d.update({k: getattr(v3, k) for k in DeepseekV3Config.REQUIRED},
                                          n_group=8, topk_group=4, first_k_dense_replace=3))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \(50, 128\), the config "
                                              r"\(vocab_size, hidden_size\) implies \(129280, 7168\).*num_hidden_layers=61"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    dt = time.perf_counter() - t
    assert dt < 0.5, dt
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024     # KiB: < 100 MB more


def test_mismatch_only_the_full_shape_check_sees_is_named(saved):
    _, path = saved
    # v_head_dim changes kv_b_proj and o_proj only (no anchor shape): found by the meta-device model's check
    _edit_config(path, lambda d: d.__setitem__("v_head_dim", 16))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.0\.self_attn\.kv_b_proj\.weight: "
                                              r"checkpoint \(128, 128\), model \(96, 128\)"):
        DeepseekV3ForCausalLM.from_pretrained(path)


def test_no_random_initialization_while_loading(saved):
    """Weights are built on the meta device and materialized uninitialized: no RNG call touches real memory."""
    from torch.overrides import TorchFunctionMode
    m, path = saved
    random_fns = {torch.randn, torch.rand, torch.randint, torch.normal, torch.Tensor.normal_, torch.Tensor.uniform_,
                  torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
                  torch.nn.init.trunc_normal_}
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in random_fns:
                t = out if isinstance(out, torch.Tensor) else (args[0] if args else (kwargs or {}).get("tensor"))
                seen.append((getattr(func, "__name__", func), t.device.type))
            return out

    with Spy():
        got = DeepseekV3ForCausalLM.from_pretrained(path)
    real = [s for s in seen if s[1] != "meta"]
    assert real == [] and seen, seen[:5]       # the spy saw the (meta) initializers, none on real memory
    for (n, a), (_, b) in zip(m.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(got.model.rotary_emb.inv_freq, m.model.rotary_emb.inv_freq)
    assert all(int(x.load.abs().sum()) == 0 for x in got.moe_layers())


def test_save_pretrained_dtype_and_max_shard_size(tmp_path):
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**CFG))
    for bad in (torch.int8, "int8", torch.float64, "float8_e4m3fn", 3):
        with pytest.raises(ValueError, match=rf"save_pretrained: argument 'dtype' must be .*got {re.escape(repr(bad))}"):
            m.save_pretrained(tmp_path / "x", dtype=bad)
        assert not (tmp_path / "x").exists()          # nothing written
    for bad in (0, -5, "0GB", "abc", "5 parsecs", True, 1.5, None):
        with pytest.raises(ValueError, match=r"argument 'max_shard_size' must be"):
            m.save_pretrained(tmp_path / "x", max_shard_size=bad)
        assert not (tmp_path / "x").exists()
    for dt, name in ((torch.float16, "float16"), ("bfloat16", "bfloat16"), ("torch.float32", "float32")):
        m.save_pretrained(tmp_path / name, dtype=dt)
        t = _tensors(tmp_path / name)
        assert t["lm_head.weight"].dtype == getattr(torch, name)
        assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert json.load(open(tmp_path / name / "config.json"))["torch_dtype"] == name
    from safetensors import safe_open
    for size, limit in (("200KB", 200_000), ("0.25MiB", 2**18), (150_000, 150_000)):
        out = tmp_path / f"s{limit}"
        m.save_pretrained(out, max_shard_size=size)
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 1
        for p in shards:
            with safe_open(p, "pt") as f:
                sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
            assert sum(sizes) <= limit or len(sizes) == 1, (p, sum(sizes))
        again = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(again.lm_head.weight, m.lm_head.weight)


# ----------------------------------------------------------------------------- the published FP8 convention
# DeepSeek-V3's conversion script (inference/fp8_cast_bf16.py -> kernel.weight_dequant) dequantizes each
# 128x128 block as w = w_fp8.float() * scale_inv[i, j] (edge blocks partial), and the block quantization is
# scale = amax(|block|) / 448, w_fp8 = (block / scale).to(e4m3). Written out here, independent of dsmoe.ops.
def ds_weight_dequant(w_fp8: torch.Tensor, s: torch.Tensor, bs: int = 128) -> torch.Tensor:
    M, N = w_fp8.shape
    out = torch.empty(M, N, dtype=torch.float32)
    for i in range(-(-M // bs)):
        for j in range(-(-N // bs)):
            out[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = w_fp8[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].float() * s[i, j]
    return out


def ds_weight_quant(w: torch.Tensor, bs: int = 128):
    M, N = w.shape
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-M // bs), -(-N // bs), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].float()
            s[i, j] = blk.abs().max() / 448.0
            q[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


# odd sizes: every weight has partial edge blocks in at least one dimension
ODD = dict(vocab_size=61, hidden_size=200, intermediate_size=264, moe_intermediate_size=72, num_hidden_layers=2,
           num_attention_heads=3, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
           first_k_dense_replace=1, kv_lora_rank=100, q_lora_rank=136, qk_rope_head_dim=16, qk_nope_head_dim=24,
           v_head_dim=40, num_nextn_predict_layers=1)


def test_saved_fp8_checkpoint_follows_the_published_formula(tmp_path):
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**ODD)).eval()
    m.save_pretrained(tmp_path, quantize_fp8=True)
    t = _tensors(tmp_path)
    master = {}
    for n, p in m.named_parameters():
        if ".mlp.experts." in n:
            for e in range(p.shape[0]):
                master[n.replace("experts.", f"experts.{e}.") + ".weight"] = p[e]
        else:
            master[n] = p
    scales = sorted(k for k in t if k.endswith("weight_scale_inv"))
    assert len(scales) > 20 and any(t[k].shape[0] * 128 != t[k[:-10]].shape[0] for k in scales)
    for sk in scales:
        wk = sk[: -len("_scale_inv")]
        w = master[wk].detach().float()
        q_ref, s_ref = ds_weight_quant(w)
        assert t[wk].dtype == torch.float8_e4m3fn and t[sk].dtype == torch.float32
        assert torch.equal(t[sk], s_ref), sk                                # scale_inv = amax / 448
        assert torch.equal(t[wk].view(torch.uint8), q_ref.view(torch.uint8)), wk   # w / scale, rounded to e4m3
        deq = ds_weight_dequant(t[wk], t[sk])                               # the published dequantization
        # e4m3 keeps 3 mantissa bits: every element within half an ulp (1/16 relative) or a subnormal step
        step = s_ref.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]] * 2.0 ** -9
        assert ((deq - w).abs() <= w.abs() / 16 + step * 1.0001).all(), sk


def test_independent_fp8_checkpoint_loads_per_the_published_formula(tmp_path):
    """A checkpoint quantized by the formula above (not by dsmoe) loads to exactly its dequantization."""
    from safetensors.torch import save_file
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**ODD)).eval()
    m.save_pretrained(tmp_path / "ref")
    t = _tensors(tmp_path / "ref")
    quantized = {}
    for k in list(t):
        if k.endswith("proj.weight") and "shared_head" not in k:      # every FP8 linear and expert projection
            q, s = ds_weight_quant(t[k])
            t[k], t[k + "_scale_inv"] = q, s
            quantized[k] = ds_weight_dequant(q, s)
    assert "model.layers.2.eh_proj.weight" in quantized and _EXP in quantized
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(t, out / "model.safetensors")
    cfg = json.load(open(tmp_path / "ref" / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))
    served = DeepseekV3ForCausalLM.from_pretrained(out)                    # serving: bytes kept
    deq = DeepseekV3ForCausalLM.from_pretrained(out, dequantize_fp8=True)  # fine-tuning: master weights
    mods = dict(served.named_modules())
    dmods = dict(deq.named_modules())
    for k, ref in quantized.items():
        mod, _, leaf = k[: -len(".weight")].rpartition(".")
        if ".experts." in k:
            prefix, e = mod.rsplit(".", 1)
            gx = mods[prefix]
            w = ds_weight_dequant(getattr(gx, leaf)[int(e)], getattr(gx, leaf + "_scale_inv")[int(e)])
            assert torch.equal(w, ref), k
            assert torch.equal(getattr(dmods[prefix], leaf)[int(e)], ref), k
        else:
            lin = mods[f"{mod}.{leaf}"]
            assert torch.equal(lin.dequantized_weight(torch.float32), ref), k
            assert torch.equal(dmods[f"{mod}.{leaf}"].weight, ref), k
    ids = torch.randint(0, ODD["vocab_size"], (2, 11))
    with torch.no_grad(), fp8_autocast(False):
        a, b = served(ids).logits, deq(ids).logits
    assert rel_err(a, b) < 1e-5, rel_err(a, b)


def test_other_weight_block_size_dequantizes_or_is_refused_for_serving(tmp_path):
    """quantization_config.weight_block_size [64, 64]: scales are checked per 64x64 block; serving (128x128 FP8
    layers) refuses it naming the field, dequantize_fp8=True loads the formula's values."""
    from safetensors.torch import save_file
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**ODD)).eval()
    m.save_pretrained(tmp_path / "ref")
    t = _tensors(tmp_path / "ref")
    k = "model.layers.0.self_attn.kv_b_proj.weight"
    ref = None
    for key in list(t):
        if key.endswith("proj.weight") and "shared_head" not in key:
            q, s = ds_weight_quant(t[key], 64)
            t[key], t[key + "_scale_inv"] = q, s
            if key == k:
                ref = ds_weight_dequant(q, s, 64)
    out = tmp_path / "fp8"
    out.mkdir()
    cfg = json.load(open(tmp_path / "ref" / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [64, 64]}
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(t, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weight_block_size \[64, 64\] is not supported"):
        DeepseekV3ForCausalLM.from_pretrained(out)
    deq = DeepseekV3ForCausalLM.from_pretrained(out, dequantize_fp8=True)
    assert torch.equal(deq.model.layers[0].self_attn.kv_b_proj.weight, ref)
    # a 128x128-block scale under a [64, 64] config is the wrong shape
    t[k + "_scale_inv"] = torch.ones(-(-t[k].shape[0] // 128), -(-t[k].shape[1] // 128))
    save_file(t, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{k}_scale_inv has shape \(2, 1\), expected \(3, 2\).*in 64x64 blocks"):
        DeepseekV3ForCausalLM.from_pretrained(out, dequantize_fp8=True)
