"""``LLM``: an offline serving engine over the paged MLA latent cache.

Each :meth:`LLM.step` admits waiting requests while free blocks allow (prefix-cache hits first), then runs
one batched decode of every running sequence (mixed lengths through ``cache_seqlens``; with MTP
speculation each row carries its drafts, verified causally in one call) and one batched, chunked
prefill of the sequences still reading their prompt. Sequences join and leave between steps; when a
sequence needs a block and none is free, the most recently admitted one is preempted and later
recomputed from its tokens (which the prefix cache mostly serves back).

All model math is the model's own (:meth:`DeepseekV3ForCausalLM.decode_step`,
:meth:`~DeepseekV3ForCausalLM.mtp_decode_step` over an :meth:`MLAKVCache.view` of the shared pool): the
engine only chooses the tokens, the blocks and the batch.
"""
from __future__ import annotations

import itertools
import os
import time

import torch

from ..models import DeepseekV3ForCausalLM
from ..nn.mla import MLAKVCache
from .block_manager import BLOCK_SIZE, BlockManager
from .params import CompletionOutput, RequestOutput, SamplingParams
from .sampler import probs_from_logits, sample_token, verify_drafts

__all__ = ["LLM"]

_WAITING, _RUNNING, _FINISHED = "waiting", "running", "finished"


class _Sequence:
    def __init__(self, req_id, prompt, prompt_ids, params, gen):
        self.req_id, self.prompt, self.params, self.gen = req_id, prompt, params, gen
        self.tokens: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.status = _WAITING
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []       # chain hashes of the blocks registered so far (prefix of blocks)
        self.prompt_chain: list[bytes] = []   # chain hashes of the full blocks it had at admission
        self.num_computed = 0               # tokens whose latents the main layers' cache holds
        self.mtp_len = 0                    # positions whose MTP-layer entry is committed
        self.num_cached_tokens = None
        self.drafts: list[int] = []
        self.draft_probs: list = []
        self.finish_reason = self.stop_reason = None
        self.text = ""
        self.num_draft = self.num_accepted = self.num_forwards = 0
        self.logprobs: list = []
        self.admitted_at = -1

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]


def _logprob_entry(logits: torch.Tensor, token: int, k: int):
    lp = torch.log_softmax(logits.double(), dim=-1)
    top = torch.topk(lp, min(k, lp.numel())) if k else None
    return float(lp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


class LLM:
    """``LLM(model_or_checkpoint_path, ...)``; ``generate(prompts, sampling_params)`` -> ``list[RequestOutput]``.

    ``model_or_checkpoint_path``: a :class:`DeepseekV3ForCausalLM` or a checkpoint folder (its tokenizer
    files, if any, are loaded with ``AutoTokenizer``; ``tokenizer=`` overrides). ``num_blocks``: 64-token
    blocks in the latent-cache pool (default: ``max_num_seqs`` sequences of ``max_model_len`` tokens).
    ``max_model_len``: longest sequence (default ``max_position_embeddings``). ``kv_cache_dtype``: "bf16"
    or "fp8" (the 656-byte layout; V3's latent sizes only). ``speculative="mtp"``
    drafts ``num_speculative_tokens`` tokens per step with the model's first MTP module (reused for
    every draft step). ``max_num_batched_tokens``: prefill tokens per step (longer prompts are chunked).
    """

    def __init__(self, model_or_checkpoint_path, *, tokenizer=None, dtype=None, device=None, max_num_seqs: int = 32,
                 num_blocks: int | None = None, max_model_len: int | None = None, speculative: str | None = None,
                 num_speculative_tokens: int = 1, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = 512, fp8: bool | None = None, seed: int = 0,
                 kv_cache_dtype: str = "bf16"):
        if isinstance(model_or_checkpoint_path, DeepseekV3ForCausalLM):
            model = model_or_checkpoint_path
            if dtype is not None or device is not None:
                model = model.to(device=device, dtype=dtype)
            model_id = f"{type(model).__name__}@{id(model):x}"
        elif isinstance(model_or_checkpoint_path, (str, os.PathLike)):
            path = os.fspath(model_or_checkpoint_path)
            kw = {} if fp8 is None else {"fp8": fp8}
            model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, device=device, **kw)
            model_id = os.path.abspath(path)
            if tokenizer is None:
                from ..tokenizer import load_tokenizer
                tokenizer = load_tokenizer(path)
        else:
            raise TypeError(f"LLM: argument 'model_or_checkpoint_path' must be a DeepseekV3ForCausalLM or a "
                            f"checkpoint folder, got {type(model_or_checkpoint_path).__name__}")
        self.model = model.eval()
        self.config = cfg = model.config
        self.tokenizer = tokenizer
        self.device = model.lm_head.weight.device
        for name, v, lo in (("max_num_seqs", max_num_seqs, 1), ("num_speculative_tokens", num_speculative_tokens, 1),
                            ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"LLM: argument '{name}' must be an int >= {lo}, got {v!r}")
        if speculative not in (None, "none", "mtp"):
            raise ValueError(f"LLM: argument 'speculative' must be None, 'none' or 'mtp', got {speculative!r}")
        self.spec = speculative == "mtp"
        if self.spec and cfg.num_nextn_predict_layers < 1:
            raise ValueError("LLM: argument 'speculative'='mtp' needs a model with an MTP module "
                             "(num_nextn_predict_layers >= 1), this one has none")
        self.k = num_speculative_tokens if self.spec else 0
        self.max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
        if not isinstance(self.max_model_len, int) or self.max_model_len < 1:
            raise ValueError(f"LLM: argument 'max_model_len' must be an int >= 1, got {max_model_len!r}")
        per_seq = -(-(self.max_model_len + 2 * self.k + 1) // BLOCK_SIZE)
        num_blocks = max_num_seqs * per_seq if num_blocks is None else num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.bm = BlockManager(num_blocks, enable_prefix_caching=enable_prefix_caching, model_id=model_id,
                               lookahead_token=self.spec)
        n_layers = cfg.num_hidden_layers + (1 if self.spec else 0)
        dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # one pool per layer (the MTP module's included); a block id names the same page in all of them
        if kv_cache_dtype not in ("bf16", "fp8"):
            raise ValueError(f"LLM: argument 'kv_cache_dtype' must be 'bf16' or 'fp8', got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8" and (cfg.kv_lora_rank, cfg.qk_rope_head_dim) != (512, 64):
            raise ValueError(f"LLM: argument 'kv_cache_dtype'='fp8': the FP8 (656-byte) latent cache holds V3's "
                             f"kv_lora_rank 512 + qk_rope_head_dim 64, this model has {cfg.kv_lora_rank} + "
                             f"{cfg.qk_rope_head_dim}")
        # FP8: e4m3 latent with one scale per 128 values and the rope part in bf16, inline (656 bytes per token)
        shape = (num_blocks, BLOCK_SIZE, 1, 656 if kv_cache_dtype == "fp8" else dim)
        dt = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.bfloat16
        self.kv = [torch.zeros(shape, dtype=dt, device=self.device) for _ in range(n_layers)]
        self.eos_ids = set()
        if cfg.eos_token_id is not None:
            self.eos_ids.add(int(cfg.eos_token_id))
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self._seed_gen = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self._admissions = itertools.count()
        self.stats = dict(steps=0, main_forward_calls=0, mtp_forward_calls=0, prompt_tokens=0, cached_prompt_tokens=0,
                          prefill_tokens_computed=0, generated_tokens=0, draft_tokens=0, accepted_tokens=0,
                          preemptions=0)

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, i: int, prompt) -> tuple[str | None, list[int]]:
        V = self.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"LLM: argument 'prompts': prompt {i} is text but this engine has no tokenizer "
                                 f"(pass token ids, or a checkpoint with tokenizer files, or tokenizer=)")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            text = prompt
        else:
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.reshape(-1).tolist()
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                for t in prompt):
                raise ValueError(f"LLM: argument 'prompts': prompt {i} must be a string or a list of token ids, "
                                 f"got {type(prompt).__name__}")
            ids, text = list(prompt), None
        if not ids:
            raise ValueError(f"LLM: argument 'prompts': prompt {i} is empty (at least one token is needed)")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"LLM: argument 'prompts': prompt {i} has token ids outside [0, vocab_size={V}): "
                             f"{bad[:5]}")
        cap = self.bm.num_blocks * BLOCK_SIZE
        if len(ids) > min(cap, self.max_model_len) - 1:
            raise ValueError(f"LLM: argument 'prompts': prompt {i} has {len(ids)} tokens; the longest prompt this "
                             f"engine takes is {min(cap, self.max_model_len) - 1} (cache: {self.bm.num_blocks} blocks x "
                             f"{BLOCK_SIZE} = {cap} tokens, max_model_len={self.max_model_len}; one slot is left "
                             f"for a generated token)")
        return text, ids

    def _check_params(self, i: int, p) -> SamplingParams:
        if p is None:
            return SamplingParams()
        if not isinstance(p, SamplingParams):
            raise ValueError(f"LLM: argument 'sampling_params': entry {i} must be a SamplingParams, got "
                             f"{type(p).__name__}")
        p.validate()
        if p.stop and self.tokenizer is None:
            raise ValueError("LLM: argument 'sampling_params': stop strings need a tokenizer (use stop_token_ids)")
        return p

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queues one request (checked first: a bad one raises ValueError and changes nothing)."""
        return self._add([(prompt, params)], [request_id])[0]

    def _add(self, items, ids) -> list[str]:
        checked = []
        for i, (prompt, params) in enumerate(items):
            text, toks = self._prompt_ids(i, prompt)
            checked.append((text, toks, self._check_params(i, params)))
        out = []
        for (text, toks, p), rid in zip(checked, ids):
            rid = str(next(self._ids)) if rid is None else rid
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seed_gen))
            self.waiting.append(_Sequence(rid, text, toks, p, torch.Generator().manual_seed(seed)))
            self.stats["prompt_tokens"] += len(toks)
            out.append(rid)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_request(self, request_id: str) -> bool:
        """Drops a queued or running request and frees its blocks (a client that went away); False when
        no unfinished request has that id."""
        for s in self.waiting:
            if s.req_id == request_id:
                self.waiting.remove(s)
                s.status = _FINISHED
                return True
        for s in self.running:
            if s.req_id == request_id:
                s.status = _FINISHED
                self._release(s)
                return True
        return False

    def partial_output_ids(self) -> dict[str, list[int]]:
        """Tokens each unfinished request has generated so far (what a streaming server sends)."""
        return {s.req_id: list(s.output_ids) for s in self.running + self.waiting}

    def partial_logprobs(self) -> dict[str, list]:
        """The logprobs entries recorded so far for each unfinished request that asked for them (aligned
        with :meth:`partial_output_ids`)."""
        return {s.req_id: list(s.logprobs) for s in self.running + self.waiting if s.params.logprobs is not None}

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs in the order of ``prompts``. Requests already queued
        with :meth:`add_request` advance too (their outputs come from :meth:`step`)."""
        if isinstance(prompts, (str, torch.Tensor)) or (isinstance(prompts, list) and prompts and
                                                        isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"LLM: argument 'prompts' must be a string, a list of ids or a list of them, "
                             f"got {type(prompts).__name__}")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"LLM: argument 'sampling_params' has {len(sampling_params)} entries for "
                                 f"{len(prompts)} prompts")
            plist = list(sampling_params)
        else:
            plist = [sampling_params] * len(prompts)
        rids = self._add(list(zip(prompts, plist)), [None] * len(prompts))
        want, done = set(rids), {}
        while want - done.keys():
            for o in self.step():
                if o.request_id in want:
                    done[o.request_id] = o
        return [done[r] for r in rids]

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            n = len(s.tokens)
            hits = self.bm.match_prefix(s.tokens, (n - 1) // BLOCK_SIZE)   # >= 1 token left to compute
            chain = self.bm.chain_hashes(s.tokens, (n - 1) // BLOCK_SIZE) if self.bm.enable_prefix_caching else []
            if len(chain) > len(hits) and chain[len(hits)] in self._computing():
                # its next block is being computed by a running sequence: wait a step and reuse it rather
                # than compute the same prefix twice (requests sharing a system prompt arrive together)
                break
            need = self.bm.blocks_for(n + 1) - len(hits)
            if not self.bm.can_allocate(need, hits):
                if not self.running and not self.bm.can_allocate(need + len(hits)):
                    # alone and still too big: cannot happen for checked prompts; fail it rather than spin
                    self.waiting.pop(0)
                    self._finish(s, "length")
                    continue
                break
            self.waiting.pop(0)
            for b in hits:
                self.bm.acquire(b)
            # the prompt's blocks now, so that the next admission sees what is left
            s.blocks = list(hits) + [self.bm.allocate() for _ in range(self.bm.blocks_for(n) - len(hits))]
            s.hashes = [self.bm.block_hash[b] for b in hits]
            s.prompt_chain = chain
            s.num_computed = s.mtp_len = len(hits) * BLOCK_SIZE
            if s.num_cached_tokens is None:
                s.num_cached_tokens = min(s.num_computed, s.num_prompt)
                self.stats["cached_prompt_tokens"] += s.num_cached_tokens
            s.drafts, s.draft_probs = [], []
            s.prefilling = True
            s.status = _RUNNING
            s.admitted_at = next(self._admissions)
            self.running.append(s)

    def _computing(self) -> set:
        """Hashes of prompt blocks that running sequences are computing and have not registered yet."""
        return {h for r in self.running if r.status == _RUNNING for h in r.prompt_chain[len(r.hashes):]}

    def _preempt(self, s: _Sequence) -> None:
        for b in reversed(s.blocks):
            self.bm.release(b)
        s.blocks, s.hashes = [], []
        s.num_computed = s.mtp_len = 0
        s.drafts, s.draft_probs = [], []
        s.status = _WAITING
        self.running.remove(s)
        self.waiting.insert(0, s)
        self.stats["preemptions"] += 1

    def _reserve(self, s: _Sequence, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` positions; preempts the newest other sequences when none is free.
        False when ``s`` itself had to go (or, alone, cannot fit)."""
        while len(s.blocks) < self.bm.blocks_for(num_tokens):
            if self.bm.num_free_blocks:
                s.blocks.append(self.bm.allocate())
                continue
            victims = [v for v in self.running if v is not s and v.admitted_at > s.admitted_at]
            if victims:
                self._preempt(max(victims, key=lambda v: v.admitted_at))
                continue
            if len(self.running) == 1:
                self._finish(s, "length")       # the whole pool is too small for this sequence
            else:
                self._preempt(s)
            return False
        return True

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished in it."""
        self._done: list[_Sequence] = []
        self.stats["steps"] += 1
        self._admit()
        decode, prefill = [], []
        budget = self.max_num_batched_tokens
        for s in sorted(self.running, key=lambda v: v.admitted_at):
            if s.status != _RUNNING:
                continue
            pending = len(s.tokens) - s.num_computed
            if pending == 1:
                feed = [s.tokens[-1]] + s.drafts
                if self._reserve(s, s.num_computed + len(feed) + self.k):
                    decode.append((s, feed))
            else:
                m = min(pending, max(budget, 1))
                if budget <= 0:
                    continue
                if self._reserve(s, s.num_computed + m + self.k):
                    prefill.append((s, s.tokens[s.num_computed: s.num_computed + m]))
                    budget -= m
        # a later reservation may have preempted a sequence scheduled before it
        decode = [(s, f) for s, f in decode if s.status == _RUNNING]
        prefill = [(s, f) for s, f in prefill if s.status == _RUNNING]
        mtp_rows = []
        if decode:
            mtp_rows += self._run(decode, verify=True)
        if prefill:
            mtp_rows += self._run(prefill, verify=False)
        if mtp_rows:
            self._mtp(mtp_rows)
        for s in list(self.running):
            self._register(s)
            if s.status == _FINISHED:
                self._release(s)
        return [self._output(s) for s in self._done]

    def _view(self, seqs, lens) -> MLAKVCache:
        width = max(len(s.blocks) for s in seqs)
        bt = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            bt[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        return MLAKVCache.view(self.kv, bt.to(self.device), torch.tensor(lens, dtype=torch.int32, device=self.device))

    def _batch(self, rows):
        """Left-padded ids ``[B, s]`` and mask (None when every row has the same length)."""
        s_max = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), s_max, dtype=torch.long)
        mask = torch.zeros(len(rows), s_max, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, s_max - len(r):] = torch.tensor(r)
                mask[i, s_max - len(r):] = True
        same = all(len(r) == s_max for r in rows)
        return ids.to(self.device), (None if same else mask.to(self.device))

    def _run(self, batch, *, verify: bool):
        """One main-model call over ``batch`` = [(seq, tokens to feed)]; samples or verifies; returns the
        MTP rows to feed [(seq, hidden [m, H], next ids [m])]."""
        seqs = [s for s, _ in batch]
        ids, mask = self._batch([f for _, f in batch])
        cache = self._view(seqs, [s.num_computed for s in seqs])
        logits, h = self.model.decode_step(ids, cache, attention_mask=mask, return_hidden=True)
        self.stats["main_forward_calls"] += 1
        logits = logits.float().cpu()
        s_max = ids.shape[1]
        mtp_rows = []
        for i, (s, feed) in enumerate(batch):
            m = len(feed)
            lg = logits[i, s_max - m:]
            hs = h[i, s_max - m:]
            s.num_forwards += 1
            c = s.num_computed
            if verify and s.drafts:
                emitted, a = verify_drafts(lg, s.drafts, s.draft_probs, s.params, s.gen)
                s.num_draft += len(s.drafts)
                s.num_accepted += a
                self.stats["draft_tokens"] += len(s.drafts)
                self.stats["accepted_tokens"] += a
                s.num_computed = c + 1 + a
                used = a + 1
                rows = lg        # row j of the verify logits gave emitted token j
            else:
                if s.prefilling:
                    self.stats["prefill_tokens_computed"] += m
                s.num_computed = c + m
                used = m
                emitted = []
                rows = lg[-1:]
                if s.num_computed == len(s.tokens):
                    emitted = [sample_token(lg[-1], s.params, s.gen)[0]]
                    s.prefilling = False
            s.drafts, s.draft_probs = [], []
            for j, t in enumerate(emitted):
                if s.params.logprobs is not None:
                    s.logprobs.append(_logprob_entry(rows[j], t, s.params.logprobs))
                self._append(s, t)
                if s.status == _FINISHED:
                    break
            if self.spec and s.status == _RUNNING:
                # MTP entries for the newly committed positions: (h_i, token i + 1)
                mtp_rows.append((s, hs[:used], s.tokens[c + 1: c + used + 1]))
        return mtp_rows

    def _mtp(self, rows) -> None:
        """Catches the MTP cache up with the committed positions, then drafts k tokens per sequence."""
        seqs = [s for s, _, _ in rows]
        for s, hs, nxt in rows:
            assert s.mtp_len + len(nxt) == s.num_computed, (s.mtp_len, len(nxt), s.num_computed)
        ids, mask = self._batch([nxt for _, _, nxt in rows])
        s_max = ids.shape[1]
        H = self.config.hidden_size
        hp = torch.zeros(len(rows), s_max, H, dtype=rows[0][1].dtype, device=self.device)
        for i, (_, hs, _) in enumerate(rows):
            hp[i, s_max - hs.shape[0]:] = hs
        cache = self._view(seqs, [s.mtp_len for s in seqs])
        h, logits = self.model.mtp_decode_step(0, hp, ids, cache, attention_mask=mask)
        self.stats["mtp_forward_calls"] += 1
        for s in seqs:
            s.mtp_len = s.num_computed
        # drafts only for sequences whose next step is a decode (a prompt still being prefilled draws
        # nothing: its random stream must not depend on how its prompt was chunked)
        need = [i for i, s in enumerate(seqs) if len(s.tokens) - s.num_computed == 1]
        if not need:
            return
        seqs = [seqs[i] for i in need]
        h_last, lg_last = h[need, -1:], logits[need, -1].float().cpu()
        if self.k > 1:
            cache = self._view(seqs, [s.mtp_len for s in seqs])
        for j in range(self.k):
            toks = []
            for i, s in enumerate(seqs):
                t, q = sample_token(lg_last[i], s.params, s.gen)
                s.drafts.append(t)
                s.draft_probs.append(q)
                toks.append(t)
            if j + 1 == self.k:
                break
            # later drafts chain on the module's own hidden state; their cache entries are provisional
            # (overwritten by the next catch-up) and positions past the committed ones
            h_last, lg = self.model.mtp_decode_step(j + 1, h_last, torch.tensor(toks, device=self.device)[:, None], cache)
            self.stats["mtp_forward_calls"] += 1
            lg_last = lg[:, -1].float().cpu()

    def _register(self, s: _Sequence) -> None:
        committed = min(s.num_computed, s.mtp_len) if self.spec else s.num_computed
        n_full = min(committed // BLOCK_SIZE, self.bm.hashable_blocks(len(s.tokens)), len(s.blocks))
        while len(s.hashes) < n_full:
            j = len(s.hashes)
            hsh = self.bm.block_hash_of(s.tokens, j, s.hashes[-1] if s.hashes else None)
            self.bm.register(s.blocks[j], hsh)
            s.hashes.append(hsh)

    def _release(self, s: _Sequence) -> None:
        for b in reversed(s.blocks):
            self.bm.release(b)
        s.blocks = []
        self.running.remove(s)

    # ------------------------------------------------------------------ stopping
    def _append(self, s: _Sequence, t: int) -> None:
        s.tokens.append(t)
        self.stats["generated_tokens"] += 1
        p = s.params
        if p.stop_token_ids and t in p.stop_token_ids:
            return self._finish(s, "stop", t)
        if not p.ignore_eos and t in self.eos_ids:
            return self._finish(s, "stop")
        if p.stop:
            text = self._detok(s.output_ids)
            hits = [(text.find(x), x) for x in p.stop if x in text]
            if hits:
                idx, x = min(hits)
                s.text = text[:idx]
                return self._finish(s, "stop", x, keep_text=True)
        if len(s.output_ids) >= p.max_tokens or len(s.tokens) >= self.max_model_len:
            return self._finish(s, "length")

    def _finish(self, s: _Sequence, reason: str, stop_reason=None, keep_text: bool = False) -> None:
        s.status = _FINISHED
        s.finish_reason, s.stop_reason = reason, stop_reason
        if not keep_text:
            s.text = self._detok(s.output_ids)
        self._done.append(s)

    def _detok(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _output(self, s: _Sequence) -> RequestOutput:
        return RequestOutput(request_id=s.req_id, prompt=s.prompt, prompt_token_ids=s.tokens[: s.num_prompt],
                             outputs=[CompletionOutput(0, s.text, list(s.output_ids), s.finish_reason, s.stop_reason,
                                                       list(s.logprobs) if s.params.logprobs is not None else None)],
                             finished=True, num_cached_tokens=s.num_cached_tokens or 0,
                             num_draft_tokens=s.num_draft, num_accepted_tokens=s.num_accepted,
                             num_forward_passes=s.num_forwards)

    # ------------------------------------------------------------------ figures
    def acceptance_rate(self) -> float | None:
        d = self.stats["draft_tokens"]
        return self.stats["accepted_tokens"] / d if d else None
