"""Logits of dsmoe's DeepseekV3ForCausalLM equal Hugging Face transformers' on the same checkpoint
(fp32, CPU), both ways: saved by dsmoe and loaded by HF, and saved by HF and loaded by dsmoe."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dsmoe.models import DeepseekV3Config, DeepseekV3ForCausalLM
from util import rel_err

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=3, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=12, n_group=1, topk_group=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
            max_position_embeddings=256)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    "q_lora_group1": dict(),
    "no_q_lora_groups": dict(q_lora_rank=None, n_group=4, topk_group=2),
    "negative_bias_groups_yarn": dict(n_group=4, topk_group=1, num_experts_per_tok=2, rope_scaling=YARN),
    "yarn_no_qlora_noninterleaved": dict(q_lora_rank=None, rope_scaling=YARN, rope_interleave=False, n_group=2,
                                         topk_group=1, num_experts_per_tok=2),
}


def _randomize(model: DeepseekV3ForCausalLM, negative_bias: bool):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for m in model.moe_layers():
            b = m.gate.e_score_correction_bias
            # biases below -1 make every biased score negative (sigmoid < 1): the -inf group mask matters
            b.copy_(torch.randn(b.shape, generator=g) * 0.5 - (1.5 if negative_bias else 0.0))


def _hf_logits(path, ids):
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_saved_by_dsmoe(case, tmp_path):
    cfg = DeepseekV3Config(**{**BASE, **CASES[case]})
    model = DeepseekV3ForCausalLM(cfg, fp8=False).eval()
    _randomize(model, negative_bias="negative" in case)
    model.save_pretrained(tmp_path, max_shard_size=40_000)  # forces several shards
    idx = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(idx["weight_map"].values())) > 1
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids).logits
    ref, hf = _hf_logits(tmp_path, ids)
    assert ours.shape == ref.shape == (2, 37, cfg.vocab_size)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)
    if "negative" in case:  # routing really was decided by negative biased scores
        gate = model.moe_layers()[0].gate
        assert (torch.sigmoid(torch.zeros(1)) + gate.e_score_correction_bias).max() < 0.5
    # and our own loader reads it back identically
    again = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8=False)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)


@pytest.mark.parametrize("case", ["q_lora_group1", "negative_bias_groups_yarn"])
def test_logits_match_hf_saved_by_hf(case, tmp_path):
    c = {**BASE, **CASES[case], "num_nextn_predict_layers": 0}
    rs = c.pop("rope_scaling", None)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in c.items() if k != "num_nextn_predict_layers"},
                                           num_mtp_layers=0,
                                           rope_parameters=({"rope_type": "yarn", "rope_theta": 10000.0,
                                                             **{k: v for k, v in rs.items() if k != "type"}}
                                                            if rs else None))
    torch.manual_seed(7)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval().float()
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.5 - 1.5)
        for n, p in hf.named_parameters():
            if "norm" not in n:
                p.mul_(5.0)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, c["vocab_size"], (2, 29))
    with torch.no_grad():
        ref = hf(ids).logits
    ours_m = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8=False)
    assert ours_m.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        ours = ours_m(ids).logits
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


def test_config_reads_v3_style_json(tmp_path):
    d = {"model_type": "deepseek_v3", **BASE, "q_lora_rank": None, "rope_scaling": dict(YARN, type="yarn"),
         "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]}, "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = DeepseekV3Config.from_pretrained(tmp_path)
    assert cfg.q_lora_rank is None and cfg.is_fp8_checkpoint and cfg.rope_theta == 5000.0
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 4.0
    # transformers v5 spelling
    d2 = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    d2["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, **{k: v for k, v in YARN.items() if k != "type"}}
    (tmp_path / "config.json").write_text(json.dumps(d2))
    cfg2 = DeepseekV3Config.from_pretrained(tmp_path)
    assert cfg2.rope_scaling["factor"] == 4.0 and cfg2.rope_theta == 5000.0
    assert cfg2.softmax_scale == pytest.approx(cfg.softmax_scale)
    # V3's numbers: factor 40, mscale_all_dim 1 -> 0.135234
    v3 = DeepseekV3Config(rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                        "original_max_position_embeddings": 4096})
    assert v3.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    with pytest.raises(ValueError, match="n_group"):
        DeepseekV3Config(**{**BASE, "n_group": 3})
