"""DeepseekV3ForCausalLM: gradients everywhere (FP8 training), MTP, latent-cache decode == prefill,
torch.compile(fullgraph=True), and the training demo's FP8-vs-BF16 agreement."""
from __future__ import annotations

import pytest
import torch

from dsmoe.models import DeepseekV3Config, DeepseekV3ForCausalLM
from util import calc_diff, rel_err

SMALL = dict(vocab_size=40, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
             v_head_dim=32, num_nextn_predict_layers=2)


def test_every_parameter_gets_a_gradient_fp8_training():
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**SMALL), fp8=True).train()
    ids = torch.randint(0, 40, (3, 19))
    out = m(ids, labels=torch.roll(ids, -1, 1))
    assert out.logits.shape == (3, 19, 40)
    assert [t.shape for t in out.mtp_logits] == [(3, 18, 40), (3, 17, 40)]
    assert out.aux_loss is not None and out.aux_loss > 0 and out.mtp_loss is not None
    out.loss.backward()
    none = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert none == []
    loads = m.update_expert_bias()
    # one MoE layer in the trunk + one in each MTP block; each counts tokens x top_k
    assert loads.shape == (3, 4) and loads.sum(1).tolist() == [3 * 19 * 2, 3 * 18 * 2, 3 * 17 * 2]


def test_mtp_logits_follow_the_definition():
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**{**SMALL, "num_nextn_predict_layers": 1}), fp8=False).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        out = m(ids, return_mtp=True)
        mtp = m.mtp_layers[0]
        emb = m.model.embed_tokens(ids)
        cos, sin = m.model.rotary_emb(torch.arange(8).unsqueeze(0))
        h = torch.cat([mtp.enorm(emb[:, 1:]), mtp.hnorm(out.hidden_states[:, :8])], -1)
        h = mtp.eh_proj(h)
        h = h + mtp.self_attn(mtp.input_layernorm(h), cos, sin)
        h = h + mtp.mlp(mtp.post_attention_layernorm(h))
        ref = m.lm_head(mtp.shared_head.norm(h))
    assert torch.allclose(out.mtp_logits[0], ref, atol=1e-6)


@pytest.mark.parametrize("q_lora", [None, 96])
def test_latent_cache_decode_equals_prefill(q_lora):
    cfg = DeepseekV3Config(**{**SMALL, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "q_lora_rank": q_lora,
                              "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                               "mscale": 1.0, "mscale_all_dim": 1.0}})
    m = DeepseekV3ForCausalLM(cfg, fp8=False).eval()
    ids = torch.randint(0, 40, (3, 23))
    with torch.no_grad():
        ref = m(ids).logits
        cache = m.new_cache(3, 40)
        pre = m.prefill_with_cache(ids[:, :15], cache)        # s_q = 15 causal over the latent cache
        steps = [m.decode_step(ids[:, t: t + 1], cache) for t in range(15, 23)]
    assert cache.seqlens.tolist() == [23, 23, 23]
    dec = torch.cat([pre] + steps, 1)
    # the cache and the absorbed query are bf16 (the kernel's formats): agreement within bf16 rounding
    assert rel_err(dec, ref) < 4e-2 and calc_diff(dec, ref) < 1e-3, (rel_err(dec, ref), calc_diff(dec, ref))
    assert (dec[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()
    gen = m.generate(ids[:, :10], 5)
    gen_nc = m.generate(ids[:, :10], 5, use_cache=False)
    assert gen.shape == gen_nc.shape == (3, 15) and torch.equal(gen[:, :10], ids[:, :10])
    assert torch.equal(gen[:, 10], gen_nc[:, 10])      # later tokens may diverge after a bf16 near-tie


def test_torch_compile_fullgraph_forward():
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**SMALL), fp8=True).eval()
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        eager = m(ids).logits
        compiled = torch.compile(lambda x: m(x).logits, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(ids), eager, atol=1e-5, rtol=1e-5)


def test_fp8_vs_bf16_training_gap_micro():
    """FP8 and BF16 training from the same seed on the demo task stay within a small loss gap."""
    from dsmoe.train import loss_gap, train
    _, _, h8 = train("micro", fp8=True, steps=20, batch=8, progress=False)
    _, _, h16 = train("micro", fp8=False, steps=20, batch=8, progress=False)
    assert h8["lm_loss"][-1] < h8["lm_loss"][0] - 0.1          # it learns
    gap = loss_gap(h8, h16, 5)
    assert abs(gap) < 0.02, gap


def test_input_checks_and_generate_without_a_decodable_cache():
    """Bad token ids fail with the argument named (not an IndexError from the embedding); a config whose
    latent sizes the decode ops cannot take generates through the full forward by default and says why
    when the cache is forced."""
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**SMALL), fp8=False).eval()
    ids = torch.randint(0, 40, (2, 7))
    with pytest.raises(ValueError, match=r"forward: argument 'input_ids': token ids must be in \[0, vocab_size=40\), got range \[.*, 40\]"):
        m(torch.cat([ids, torch.full((2, 1), 40)], 1))
    with pytest.raises(TypeError, match=r"argument 'input_ids' must be an int64/int32 tensor \[B, T\], got torch.float32"):
        m(ids.float())
    with pytest.raises(TypeError, match=r"argument 'input_ids' must be an int64/int32 tensor \[B, T\], got torch.int64 tensor of shape \(7,\)"):
        m(ids[0])
    with pytest.raises(ValueError, match=r"argument 'labels' must have the shape of input_ids \(2, 7\)"):
        m(ids, labels=ids[:, 1:])
    assert not m.supports_latent_cache()
    with torch.no_grad():
        gen = m.generate(ids, 3)                         # default: no cache for these sizes
        ref = ids
        for _ in range(3):
            ref = torch.cat([ref, m(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, ref)
    assert torch.equal(m.generate(ids, 0), ids)
    with pytest.raises(ValueError, match=r"needs kv_lora_rank=512 and qk_rope_head_dim=64.*kv_lora_rank=64 and qk_rope_head_dim=16"):
        m.generate(ids, 3, use_cache=True)
    with pytest.raises(ValueError, match=r"'max_new_tokens' must be an int >= 0"):
        m.generate(ids, -1)


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", -8), ("vocab_size", 1.5),
                                         ("n_group", 0), ("q_lora_rank", 0), ("num_nextn_predict_layers", -1)])
def test_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=f"DeepseekV3Config: {field} must be an int >= "):
        DeepseekV3Config(**{**SMALL, field: value})
