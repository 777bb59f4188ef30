"""Cutting a :class:`~dsmoe.models.DeepseekV3ForCausalLM` into pipeline stages and one pipelined
training step (what ``dsmoe train --pp N`` runs).

Stage 0 holds the embedding, the last stage the final norm, the output head and the MTP modules (which
read the token ids, carried along the pipeline as a second tensor); the decoder layers are spread as
evenly as possible between them. The stages reference the submodules of one model object, so the two
stages a DualPipe rank holds share their parameters, and the gradient of a parameter used on several
ranks is their sum (:func:`sync_grads`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .v3 import DecoderStage, _AttachAux

__all__ = ["split_stages", "LMHead", "sync_grads", "stage_indices"]


class LMHead(nn.Module):
    """``(h, ids) -> (logits, *mtp_logits)``: the last stage's part of DeepseekV3ForCausalLM.forward."""

    def __init__(self, model, aux_scale: float):
        super().__init__()
        self.m = [model]                      # a reference, not a submodule: the stages share the model
        self.aux_scale = aux_scale
        self.aux_total = 0.0

    def forward(self, h, ids):
        model = self.m[0]
        cfg = model.config
        ids = ids.long()
        T = ids.shape[1]
        logits = model.lm_head(model.model.norm(h))
        outs = [logits]
        if len(model.mtp_layers):
            emb = model.model.embed_tokens(ids)
            cos, sin = model._rope(T, ids.device)
            hk = h
            for k, mtp in enumerate(model.mtp_layers, start=1):
                if T - k <= 0:
                    break
                hk = mtp.mtp_forward(hk[:, :-1] if k > 1 else hk[:, : T - k], emb[:, k:], cos[:, : T - k], sin[:, : T - k])
                aux = getattr(mtp.mlp, "aux_loss", None)
                if model.training and aux is not None and torch.is_grad_enabled():
                    self.aux_total += float(aux.detach()) * self.aux_scale
                    hk = _AttachAux.apply(hk, aux, self.aux_scale)
                outs.append(model.lm_head(mtp.shared_head.norm(hk)))
        return tuple(outs)


def stage_indices(num_layers: int, num_stages: int) -> list:
    """Contiguous layer ranges, as even as possible, earlier stages taking the remainder."""
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def expert_parallel_layer(layer, ep_group, *, fp8: bool):
    """A shallow copy of ``layer`` whose MoE runs expert-parallel over ``ep_group``: the gate and the shared
    experts are the layer's own modules, the routed experts this rank's rows of its stacked weights
    (the same storage: an optimizer step on the full model updates them). Returns ``(copy, links)``,
    links = ``[(full param, local param, first row)]`` for :func:`sync_grads`."""
    import copy

    from ...nn.moe import MoE
    full = layer.mlp
    ep = MoE(full.cfg, fp8=fp8, ep_group=ep_group).train(full.training)
    ep.gate, ep.shared_experts = full.gate, full.shared_experts
    L = ep.experts.num_experts
    lo = ep.ep_rank * L
    links = []
    for n in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(full.experts, n)
        local = nn.Parameter(w.data[lo: lo + L])
        setattr(ep.experts, n, local)
        links.append((w, local, lo))
    out = copy.copy(layer)
    out._modules = dict(layer._modules)
    out.mlp = ep
    return out, links, (full, ep)


def split_stages(model, num_stages: int, *, aux_scale: float, ep_group=None, held=(), fp8: bool = True):
    """``num_stages`` :class:`DecoderStage` over ``model``'s layers (sharing its parameters). With
    ``ep_group``, the MoE layers of the stages in ``held`` run expert-parallel over it (see
    :func:`expert_parallel_layer`); returns ``(stages, links, moes)`` then."""
    rot = model.model.rotary_emb
    stages, links, moes = [], [], []
    for s, rng in enumerate(stage_indices(model.config.num_hidden_layers, num_stages)):
        layers = [model.model.layers[i] for i in rng]
        if ep_group is not None and s in held:
            for j, lay in enumerate(layers):
                if hasattr(lay.mlp, "experts"):
                    layers[j], lk, pair = expert_parallel_layer(lay, ep_group, fp8=fp8)
                    links += lk
                    moes.append(pair)
        stages.append(DecoderStage(layers, rot,
                                   embed=model.model.embed_tokens if s == 0 else None,
                                   head=LMHead(model, aux_scale) if s == num_stages - 1 else None,
                                   carry_ids=True, aux_scale=aux_scale))
    return (stages, links, moes) if ep_group is not None else stages


def lm_criterion(cfg, n_chunks: int, record: list):
    """``criterion(logits, *mtp_logits, labels)``: the model's LM + MTP loss for one chunk, scaled by
    ``1 / n_chunks`` so that the chunks' gradients add up to the full batch's; appends (lm, mtp) to
    ``record``."""
    V = cfg.vocab_size

    def criterion(logits, *rest):
        *mtp_logits, labels = rest
        labels = labels.long()
        T = labels.shape[1]
        lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss = lm
        ces = [F.cross_entropy(ml[:, : T - k - 1].float().reshape(-1, V), labels[:, k + 1:].reshape(-1), ignore_index=-100)
               for k, ml in enumerate(mtp_logits, start=1) if T - k - 1 > 0]
        mtp = torch.stack(ces).mean() if ces else None
        if mtp is not None:
            loss = loss + cfg.mtp_loss_weight * mtp
        record.append((lm.item(), mtp.item() if mtp is not None else float("nan")))
        return loss / n_chunks

    return criterion


def sync_grads(model, group=None, links=(), moes=()) -> None:
    """Sums every parameter's gradient (and every MoE load counter) over the ranks: a stage held by two
    ranks (DualPipe's mirrors), a parameter used by two stages (the embedding, read by stage 0 and the
    MTP head) or by several expert-parallel replicas gets its total gradient everywhere; a rank that
    never used a parameter contributes zeros. ``links``/``moes`` (from :func:`split_stages`): the local
    expert rows' gradients and loads are first put in their place in the full model's."""
    for full, local, lo in links:
        if local.grad is not None:
            if full.grad is None:
                full.grad = torch.zeros_like(full)
            full.grad[lo: lo + local.shape[0]] += local.grad
            local.grad = None
    for full, ep in moes:
        full.load += ep.load
        ep.load.zero_()
    ps = list(model.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in ps])
    dist.all_reduce(flat, group=group)
    off = 0
    for p in ps:
        n = p.numel()
        p.grad = flat[off: off + n].view_as(p).to(p.dtype).clone()
        off += n
    for m in model.moe_layers():
        dist.all_reduce(m.load, group=group)
