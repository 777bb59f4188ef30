"""HF-layout checkpoints: FP8 (weight_scale_inv) checkpoints, strict key/shape checking, broken files."""
from __future__ import annotations

import json
import os

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
