"""Log-probs of chosen tokens without [B, T, V] logits: the training side of the output head.

Training scores one token per position (the next token: GRPO's log-probs and entropy, the reference model's, SFT's
cross-entropy) out of a 152,064-word vocabulary. `token_logprobs` puts only the scored positions through the head,
LOGPROB_CHUNK at a time, each chunk checkpointed, with the gradients of the dense computation (verl and TRL chunk
their log-probs the same way). `policy_log_softmax` is the sampling policy (banned ids, temperature) that cof.py
samples from and the trainers score with, so the trainer's log-probs equal the sampler's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---- Log-probs of chosen tokens -----------------------------------------------------------------------------------
# Training scores a few tokens per position (the next token: GRPO's log-probs, SFT's cross-entropy) out of a
# 152,064-word vocabulary. The [B, T, V] logits of a batch are ~10 GB in fp32 at 4 x 4k tokens, and the log-softmax,
# its gradient and the copies on the way several times that. Here only the positions that are scored go through the
# head, LOGPROB_CHUNK at a time, each chunk checkpointed: its [chunk, V] logits live while it runs in the forward
# and again while its backward runs (recomputed), never all at once. verl and TRL chunk their log-probs the same way;
# Liger-Kernel fuses the head and the loss in one kernel, which GRPO's non-linear loss of the log-probs does not allow
# (the gradient of a log-prob is known only after the whole loss is).

LOGPROB_CHUNK = 512   # scored positions per chunk: [512, 152,064] fp32 logits are 0.3 GB


def policy_log_softmax(logits, banned=(), temperature=1.0):
    """The sampling policy's log-distribution: logits [..., V] with the `banned` ids at -inf, divided by the
    temperature, log-softmax in float32 -> [..., V] (cof.py samples from it; token_logprobs scores with it)."""
    x = logits.float()
    if len(banned):
        x = x.index_fill(-1, torch.as_tensor(banned, device=x.device), float("-inf"))
    return torch.log_softmax(x / temperature, dim=-1)                                      # [..., V]


def policy_logprobs(logits, tokens, banned=(), temperature=1.0):
    """log p(tokens) under the sampling policy (policy_log_softmax); tokens [...] -> [...]. The zoom loop (cof.py)
    records these at sampling time and grpo.py recomputes them in its training forward (token_logprobs), so the two
    agree when the weights have not changed."""
    x = policy_log_softmax(logits, banned, temperature)                                    # [..., V]
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)                                  # [...]


def _chunk_logprobs(h, weight, targets, banned, temperature, entropy: bool):
    """token_logprobs of one chunk: h [c, D] -> (log p(targets) [c], the entropy [c] without gradient, or None)."""
    lp = policy_log_softmax(F.linear(h, weight), banned, temperature)                      # [c, V]
    logp = lp.gather(-1, targets[:, None])[:, 0]                                           # [c]
    if not entropy:
        return logp, None
    with torch.no_grad():
        return logp, -(lp.exp() * lp.nan_to_num(0.0)).sum(-1)                              # [c] (banned ids add 0)


def token_logprobs(h, weight, targets, banned=(), temperature=1.0, entropy=False, chunk=None):
    """log p(targets) [N] under policy_log_softmax(h @ weight.T, banned, temperature), for hidden states h [N, D] and
    the head weight [V, D], `chunk` positions at a time (default LOGPROB_CHUNK; see above); with `entropy`, also the
    distribution's entropy at each position [N] (no gradient), else None. Values and gradients are the dense
    computation's (tests/test_model.py)."""
    chunk = chunk or LOGPROB_CHUNK
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for i in range(0, max(1, h.shape[0]), chunk):   # no position: one empty chunk (the graph stays connected)
        args = (h[i:i + chunk], weight, targets[i:i + chunk], banned, temperature, entropy)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    logp, ent = zip(*parts)
    return torch.cat(logp), (torch.cat(ent) if entropy else None)                          # [N], [N]
