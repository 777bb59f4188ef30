"""dsmoe.serve on CPU (fp32 model, bf16 latent cache): greedy equality with DeepseekV3ForCausalLM.generate
(one request, mixed batches, chunked prefill, prefix-cache hits, preemption, MTP speculation), seeded
sampling, prefix-cache accounting and eviction, bad input, stop rules, rejection sampling's distribution."""
from __future__ import annotations

import math

import pytest
import torch

from dsmoe.data import PermutedCopyTask
from dsmoe.models import DeepseekV3Config, DeepseekV3ForCausalLM
from dsmoe.serve import LLM, BlockManager, SamplingParams
from dsmoe.serve.sampler import probs_from_logits, verify_drafts
from dsmoe.tokenizer import task_tokenizer

CFG = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
           kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           num_nextn_predict_layers=1, max_position_embeddings=512)
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls: threads only contend on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(vocab=40, seed=0, **kw):
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config(vocab_size=vocab, **{**CFG, **kw}), fp8=False).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _ref(model, prompt, n):
    dev = model.lm_head.weight.device
    return model.generate(torch.tensor([prompt], device=dev), n)[0, len(prompt):].tolist()


def _prompts(lengths, vocab=40):
    return [torch.randint(3, vocab, (n,)).tolist() for n in lengths]


def test_greedy_equals_generate_one_request_and_a_mixed_batch(model):
    prompts = _prompts([9, 70, 1, 33])
    refs = [_ref(model, p, 8) for p in prompts]
    llm = LLM(model, max_model_len=256)
    (one,) = llm.generate([prompts[0]], SamplingParams(max_tokens=8, **GREEDY))
    assert one.outputs[0].token_ids == refs[0] and one.outputs[0].finish_reason == "length"
    assert one.prompt_token_ids == prompts[0] and one.num_cached_tokens == 0
    # mixed lengths in one batch; a 24-token prefill budget chunks the long prompts over several steps
    llm = LLM(model, max_model_len=256, max_num_batched_tokens=24)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.stats["prefill_tokens_computed"] == sum(map(len, prompts))
    assert not llm.has_unfinished_requests() and llm.bm.num_free_blocks == llm.bm.num_blocks


def test_requests_join_between_steps_and_eos_stops(model):
    p = _prompts([12, 20, 5])
    llm = LLM(model, max_model_len=256)
    a = llm.add_request(p[0], SamplingParams(max_tokens=12, **GREEDY))
    llm.step(), llm.step(), llm.step()
    b = llm.add_request(p[1], SamplingParams(max_tokens=6, **GREEDY))     # joins a running batch
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
    assert done[a].outputs[0].token_ids == _ref(model, p[0], 12)
    assert done[b].outputs[0].token_ids == _ref(model, p[1], 6)
    # a stop id ends the completion at its first occurrence (kept in token_ids), as transformers' eos does
    ref = _ref(model, p[2], 10)
    stop = ref[3]
    # ignore_eos: the model's own EOS may come first on another CPU's rounding; stop ids still apply
    (o,) = llm.generate([p[2]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop], ignore_eos=True))
    assert o.outputs[0].token_ids == ref[: ref.index(stop) + 1]
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == stop
    want = model.generate(torch.tensor([p[2]]), 10, eos_token_id=stop)[0, len(p[2]):].tolist()
    assert want[: len(o.outputs[0].token_ids)] == o.outputs[0].token_ids


def test_prefix_cache_second_request_reuses_three_blocks(model):
    shared = _prompts([192])[0]
    a, b = shared + _prompts([7])[0], shared + _prompts([11])[0]
    llm = LLM(model, max_model_len=320)
    (oa,) = llm.generate([a], SamplingParams(max_tokens=5, **GREEDY))
    before = llm.stats["prefill_tokens_computed"]
    (ob,) = llm.generate([b], SamplingParams(max_tokens=5, **GREEDY))
    assert oa.num_cached_tokens == 0 and ob.num_cached_tokens == 192
    assert llm.stats["prefill_tokens_computed"] - before == len(b) - 192      # only the rest was prefilled
    assert ob.outputs[0].token_ids == _ref(model, b, 5)
    assert oa.outputs[0].token_ids == _ref(model, a, 5)
    # requests sharing a prefix that arrive together: the first computes it, the others wait a step for it
    shared2 = _prompts([200])[0]
    together = [shared2 + t for t in _prompts([3, 9, 1])]
    outs = llm.generate(together, SamplingParams(max_tokens=4, **GREEDY))
    assert [o.num_cached_tokens for o in outs] == [0, 192, 192]
    assert [o.outputs[0].token_ids for o in outs] == [_ref(model, p, 4) for p in together]
    # a whole prompt that is cached still computes its last token (the logits come from it)
    (oc,) = llm.generate([shared], SamplingParams(max_tokens=3, **GREEDY))
    assert oc.num_cached_tokens == 128 and oc.outputs[0].token_ids == _ref(model, shared, 3)


def test_preemption_by_recompute_keeps_greedy_outputs(model):
    prompts = _prompts([40, 50, 30, 45])
    refs = [_ref(model, p, 30) for p in prompts]
    # 5 blocks of 64 tokens for 4 sequences of up to 80 tokens: they cannot all stay
    llm = LLM(model, max_model_len=128, num_blocks=5)
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=30, **GREEDY))
    done = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            done[o.request_id] = o
        llm.bm.check_invariants([s.blocks for s in llm.running])
    assert llm.stats["preemptions"] > 0
    assert [done[str(i)].outputs[0].token_ids for i in range(4)] == refs


def test_eviction_never_takes_a_block_in_use():
    bm = BlockManager(4)
    toks = list(range(64 * 3 + 1))
    hs = bm.chain_hashes(toks)
    held = [bm.allocate() for _ in range(3)]
    for b, h in zip(held, hs):
        bm.register(b, h)
    bm.release(held[2])                       # cached, unreferenced: evictable
    bm.release(held[1])
    assert bm.num_free_blocks == 3 and bm.match_prefix(toks, 3) == held
    new = [bm.allocate() for _ in range(3)]   # the empty block first, then LRU: held[2] before held[1]
    assert new[1:] == [held[2], held[1]] and held[0] not in new and bm.num_evictions == 2
    bm.check_invariants([[held[0]], new])
    with pytest.raises(RuntimeError, match="no free block"):
        bm.allocate()
    assert bm.match_prefix(toks, 3) == [held[0]]        # the chain breaks at the first evicted block
    assert not bm.can_allocate(1)


def test_prefix_cache_under_memory_pressure(model):
    shared = _prompts([128])[0]
    prompts = [shared + t for t in _prompts([10, 20, 5, 30, 15, 8])]
    refs = [_ref(model, p, 6) for p in prompts]
    llm = LLM(model, max_model_len=192, num_blocks=7)
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=6, **GREEDY))
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
        llm.bm.check_invariants([s.blocks for s in llm.running])
    assert [done[str(i)].outputs[0].token_ids for i in range(6)] == refs
    assert llm.stats["cached_prompt_tokens"] >= 128 * 3


def test_seeded_sampling_is_reproducible_across_runs_and_batches(model):
    p = _prompts([10, 23, 64, 7])
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=20, seed=1234)
    alone = LLM(model, max_model_len=256).generate([p[0]], sp)[0].outputs[0].token_ids
    again = LLM(model, max_model_len=256).generate([p[0]], sp)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=9, temperature=1.0, seed=s) for s in (1, 2, 3)]
    batch = LLM(model, max_model_len=256, max_num_batched_tokens=16).generate(p[1:] + p[:1], others + [sp])
    assert alone == again == batch[3].outputs[0].token_ids
    other_seed = LLM(model, max_model_len=256).generate(
        [p[0]], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=20, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone
    # top_k=1 and a tiny top_p leave one token: greedy
    ref = _ref(model, p[1], 8)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        o = LLM(model, max_model_len=256).generate([p[1]], SamplingParams(max_tokens=8, temperature=1.5, ignore_eos=True,
                                                                          **kw))
        assert o[0].outputs[0].token_ids == ref


def test_processed_distribution():
    logits = torch.randn(3, 11, dtype=torch.float64)
    p = probs_from_logits(logits, 0.7, 5, 0.8)
    for r in range(3):
        q = torch.softmax(logits[r] / 0.7, -1)
        order = torch.argsort(q, descending=True)[:5]
        keep, mass = [], 0.0
        for i in order.tolist():                   # top-k, then top-p over the renormalized top-k
            keep.append(i)
            mass += float(q[i] / q[order].sum())
            if mass >= 0.8:
                break
        want = torch.zeros(11, dtype=torch.float64)
        want[keep] = q[keep] / q[keep].sum()
        torch.testing.assert_close(p[r], want)


@pytest.mark.parametrize("bad, arg", [
    (dict(prompt=[]), "prompts"), (dict(prompt=[1, 2, 40]), "prompts"), (dict(prompt=[-1]), "prompts"),
    (dict(prompt=list(range(3, 40)) * 8), "prompts"), (dict(prompt="text"), "prompts"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-2), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(stop="x"), "sampling_params")])
def test_bad_input_is_a_value_error_and_the_engine_keeps_serving(model, bad, arg):
    p = _prompts([12, 6])
    llm = LLM(model, max_model_len=256, num_blocks=4)          # 256 tokens: the 296-token prompt is too long
    a = llm.add_request(p[0], SamplingParams(max_tokens=7, **GREEDY))
    llm.step()
    prompt = bad.pop("prompt", p[1])
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        llm.add_request(prompt, SamplingParams(**{"max_tokens": 4, **GREEDY, **bad}))
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
    assert list(done) == [a] and done[a].outputs[0].token_ids == _ref(model, p[0], 7)


def test_text_prompts_stop_strings_and_eos_with_the_task_tokenizer():
    task = PermutedCopyTask(num_symbols=8, length=4)
    tok = task_tokenizer(task)
    m = _model(vocab=task.vocab_size, seed=1)
    llm = LLM(m, tokenizer=tok, max_model_len=64)
    text = "<s> 1 2 3 4 |"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [0, 4, 5, 6, 7, 2]
    ref = _ref(m, ids, 12)
    (o,) = llm.generate(text, SamplingParams(max_tokens=12, **GREEDY))
    assert o.outputs[0].token_ids == ref and o.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    # a stop string: the text ends before it, the ids run to the token that completed it
    words = o.outputs[0].text.split(" ")
    stop = " ".join(words[2:4])
    (s,) = llm.generate(text, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop))
    assert s.outputs[0].finish_reason == "stop" and s.outputs[0].stop_reason == stop
    assert s.outputs[0].text == o.outputs[0].text[: o.outputs[0].text.index(stop)]
    # EOS (id 1) ends a completion unless ignore_eos
    (e,) = llm.generate([0, 1, 1, 1], SamplingParams(max_tokens=12, temperature=0))
    got = e.outputs[0].token_ids
    assert (got[-1] == 1 and e.outputs[0].finish_reason == "stop") or (1 not in got and len(got) == 12)
    with pytest.raises(ValueError, match=r"argument 'prompts': prompt 0 has token ids outside"):
        llm.generate("<s> 1 zebra", SamplingParams(max_tokens=2))     # an unknown word


# ----------------------------------------------------------------------------- MTP speculative decoding
def _repeat_drafter(m):
    """The MTP block made a pass-through (zero attention output and MLP, eh_proj = [0 | I]):
    its logits at i are then the main head's at i, a draft that says "the next token repeats". Random
    models' greedy outputs repeat a lot, so drafts are sometimes accepted and sometimes not."""
    mtp = m.mtp_layers[0]
    H = m.config.hidden_size
    with torch.no_grad():
        mtp.self_attn.o_proj.weight.zero_()
        for prm in mtp.mlp.parameters():
            prm.zero_()
        mtp.eh_proj.weight.copy_(torch.cat([torch.zeros(H, H), torch.eye(H)], 1))
    return m


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculation_greedy_equals_generate(k):
    m = _repeat_drafter(_model(vocab=12, seed=2))   # seed 2: outputs with runs and changes
    prompts = _prompts([6, 70, 17], vocab=12)
    refs = [_ref(m, p, 20) for p in prompts]
    llm = LLM(m, speculative="mtp", num_speculative_tokens=k, max_model_len=256, max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == refs
    for o in outs:
        assert 0 <= o.num_accepted_tokens <= o.num_draft_tokens and o.num_draft_tokens > 0
    assert llm.stats["accepted_tokens"] == sum(o.num_accepted_tokens for o in outs)
    assert llm.acceptance_rate() == llm.stats["accepted_tokens"] / llm.stats["draft_tokens"]
    if k == 1:
        # independent count: with one draft, the draft at committed position i is the MTP head's argmax
        # there (full forward); it is accepted iff it equals the generated token at i + 2
        for p, ref, o in zip(prompts, refs, outs):
            seq = torch.tensor([p + ref])
            with torch.no_grad():
                mtp = m(seq, return_mtp=True).mtp_logits[0][0].argmax(-1).tolist()
            i, g, drafts, acc = len(p) - 1, 1, 0, 0
            while g < 20:
                drafts += 1
                ok = mtp[i] == seq[0, i + 2].item() if i + 2 < seq.shape[1] else False
                acc += ok
                step = 2 if ok else 1
                i, g = i + step, g + step
            assert (o.num_draft_tokens, o.num_accepted_tokens) == (drafts, acc)
        assert llm.stats["accepted_tokens"] > 0


def test_mtp_speculation_under_preemption_and_prefix_hits():
    m = _repeat_drafter(_model(vocab=12, seed=10))
    shared = _prompts([128], vocab=12)[0]
    prompts = [shared + t for t in _prompts([5, 9, 3], vocab=12)]
    refs = [_ref(m, p, 25) for p in prompts]
    llm = LLM(m, speculative="mtp", num_speculative_tokens=2, max_model_len=192, num_blocks=6)
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=25, **GREEDY))
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
        llm.bm.check_invariants([s.blocks for s in llm.running])
    assert [done[str(i)].outputs[0].token_ids for i in range(3)] == refs
    assert llm.stats["cached_prompt_tokens"] > 0


def test_mtp_speculation_seeded_sampling_is_reproducible():
    m = _model(vocab=12, seed=5)
    p = _prompts([9, 15], vocab=12)
    sp = SamplingParams(max_tokens=15, temperature=0.8, seed=7)
    a = LLM(m, speculative="mtp", num_speculative_tokens=2, max_model_len=128).generate([p[0]], sp)
    b = LLM(m, speculative="mtp", num_speculative_tokens=2, max_model_len=128).generate(
        [p[1], p[0]], [SamplingParams(max_tokens=10, seed=3), sp])
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids and a[0].num_draft_tokens > 0


def _chi2_crit(df: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(df) at the normal z (Wilson-Hilferty); z = 4: p ~ 3e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    e = probs * n
    keep = e > 0
    if counts[~keep].sum() > 0:                 # a draw the distribution forbids
        return float("inf"), int(keep.sum()) - 1
    return float(((counts[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def test_rejection_sampling_preserves_the_target_distribution():
    V, N = 6, 12000
    g = torch.Generator().manual_seed(11)
    target = torch.randn(3, V, dtype=torch.float64) * 1.5          # rows: draft slot 0, slot 1, bonus
    draft = torch.randn(2, V, dtype=torch.float64) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    p = probs_from_logits(target, 0.8, 5, 1.0)
    q = probs_from_logits(draft, 0.8, 5, 1.0)
    first, second = torch.zeros(V), torch.zeros(V)
    accepted = 0
    for _ in range(N):
        d = [int(torch.multinomial(q[j].float(), 1, generator=g)) for j in range(2)]
        out, a = verify_drafts(target, d, [q[0], q[1]], params, g)
        assert len(out) == a + 1
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        accepted += a
    for counts, probs in ((first, p[0]), (second, p[1])):
        stat, df = _chi2(counts, probs)
        assert stat < _chi2_crit(df), (stat, df, counts, probs)
    # the first draft is accepted (a second token follows) with probability sum_x min(p(x), q(x))
    want = float(torch.minimum(p[0], q[0]).sum())
    assert abs(second.sum() / N - want) < 4 * math.sqrt(want * (1 - want) / N)
    # a wrong sampler fails: emitting the draft unconditionally gives q, far from p
    stat, df = _chi2(torch.bincount(torch.multinomial(q[0].float(), N, True, generator=g), minlength=V).float(), p[0])
    assert stat > _chi2_crit(df)


def test_dsmoe_generate_cli(tmp_path, capsys):
    from dsmoe.__main__ import main
    from dsmoe.tokenizer import save_task_tokenizer

    task = PermutedCopyTask(num_symbols=8, length=4)
    m = _repeat_drafter(_model(vocab=task.vocab_size, seed=2, max_position_embeddings=64))
    m.save_pretrained(tmp_path)
    save_task_tokenizer(task, tmp_path)
    prompts = ["<s> 1 2 3 4 |", "<s> 7 7 0 1 |"]
    assert main(["generate", str(tmp_path), "--prompt", prompts[0], "--prompt", prompts[1], "--max-tokens", "6",
                 "--speculative", "mtp"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    llm = LLM(str(tmp_path))               # the same loading path (and the checkpoint's own tokenizer)
    assert llm.tokenizer is not None
    want = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    for line, o in zip(lines, want):
        assert line.startswith(o.prompt + " -> " + o.outputs[0].text + "  [")
    assert lines[2].startswith("stats: 2 requests") and "MTP acceptance" in lines[2] and "tokens per forward" in lines[2]
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path), "--prompt", "<s> 1 2", "--max-tokens", "0"])
    assert "argument 'max_tokens'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", ["kernel", "reference"])
def test_serve_on_cuda_greedy_equals_generate(sizes):
    """On a GPU: V3's latent sizes (512 + 64) run the sm_90a decode/append kernels, the small ones the
    reference on CUDA tensors; the engine's batched, mixed-length calls give generate's tokens."""
    kw = dict(kv_lora_rank=512, qk_rope_head_dim=64) if sizes == "kernel" else {}
    m = _model(vocab=64, seed=0, **kw).cuda()
    prompts = _prompts([5, 70, 130], vocab=64)
    refs = [_ref(m, p, 8) for p in prompts]
    for spec in (None, "mtp"):
        llm = LLM(m, speculative=spec, num_speculative_tokens=2, max_model_len=256, max_num_batched_tokens=64)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
        assert [o.outputs[0].token_ids for o in outs] == refs


def test_fp8_latent_cache():
    """The FP8 (656-byte) pool: the model's decode over it equals decode over its dequantized copy (up to
    the one new token's own entry), the engine's greedy tokens equal a plain loop over an FP8 cache, and
    other latent sizes are refused by name."""
    from dsmoe import ops
    from dsmoe.nn.mla import MLAKVCache
    from util import rel_err

    m = _model(vocab=40, seed=6, kv_lora_rank=512, qk_rope_head_dim=64)
    ids = torch.randint(0, 40, (1, 100))

    def pool(dtype, width):
        return [torch.zeros(2, 64, 1, width, dtype=dtype) for _ in range(2)]

    bt = torch.arange(2, dtype=torch.int32)[None]
    c8 = MLAKVCache.view(pool(torch.float8_e4m3fn, 656), bt, torch.zeros(1, dtype=torch.int32))
    cb = MLAKVCache.view(pool(torch.bfloat16, 576), bt, torch.zeros(1, dtype=torch.int32))
    m.decode_step(ids[:, :99], c8), m.decode_step(ids[:, :99], cb)
    cd = MLAKVCache.view([ops.dequantize_mla_kvcache_fp8(k) for k in c8.kv], bt, c8.seqlens.clone())
    lg8, lgd, lgb = (m.decode_step(ids[:, 99:], c) for c in (c8, cd, cb))
    e_deq, e_bf16 = rel_err(lg8, lgd), rel_err(lg8, lgb)
    # measured: 1.5e-3 (the new token's own quantized entry) and 2.5e-2 (every key quantized); bounds ~3x
    assert e_deq < 5e-3 and 5 * e_deq < e_bf16 < 0.075, (e_deq, e_bf16)

    prompts = _prompts([20, 70])
    outs = LLM(m, kv_cache_dtype="fp8", max_model_len=256).generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    for p, o in zip(prompts, outs):
        c = MLAKVCache.view(pool(torch.float8_e4m3fn, 656), bt, torch.zeros(1, dtype=torch.int32))
        toks = [int(m.decode_step(torch.tensor([p]), c)[0, -1].argmax())]
        for _ in range(5):
            toks.append(int(m.decode_step(torch.tensor([toks[-1:]]), c)[0, -1].argmax()))
        assert o.outputs[0].token_ids == toks
    with pytest.raises(ValueError, match="argument 'kv_cache_dtype'"):
        LLM(_model(), kv_cache_dtype="fp8")


def test_logprobs_equal_the_full_forward(model):
    """Returned log-probabilities are the model's own (log-softmax of the raw logits): the full forward over
    prompt + output gives them too (within the bf16 latent cache's rounding), with and without MTP
    verification supplying the logits rows."""
    prompts = _prompts([7, 30, 1])
    for spec in (None, "mtp"):
        llm = LLM(model, max_model_len=256, speculative=spec)
        outs = llm.generate(prompts, [SamplingParams(max_tokens=6, logprobs=3, **GREEDY),
                                      SamplingParams(max_tokens=5, logprobs=0, temperature=0.7, seed=3),
                                      SamplingParams(max_tokens=4, **GREEDY)])
        assert outs[2].outputs[0].logprobs is None
        for p, o, k in zip(prompts[:2], outs[:2], (3, 0)):
            c = o.outputs[0]
            assert len(c.logprobs) == len(c.token_ids)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].double(), -1)
            for j, (t, (tl, top)) in enumerate(zip(c.token_ids, c.logprobs)):
                ref = lp[len(p) - 1 + j]
                assert abs(tl - float(ref[t])) < 2e-2, (spec, j, tl, float(ref[t]))
                assert len(top) == k
                if k:
                    assert top[0][0] == t                      # greedy: the sampled token is the most likely
                    vals = [v for _, v in top]
                    assert vals == sorted(vals, reverse=True)
                    assert all(abs(v - float(ref[i])) < 2e-2 for i, v in top)
                    torch.testing.assert_close(torch.tensor(vals, dtype=torch.float64), ref.topk(k).values,
                                               atol=2e-2, rtol=0)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)
