"""Sampled-token log-probabilities from an LM head a block of vocabulary columns at a time, over every position
at once.

Why: the advantage objectives (`sampled`, `grpo`) need of the student only log pi(y_t) of each sampled token (and
its entropy, a metric), and of a teacher only its log pi_T(y_t). Cutting the positions into blocks bounds the
[positions, V] logits, but a block of few rows makes the head's GEMMs slow on a CPU: every block streams the whole
[V, H] weight and, in backward, reads and writes the whole weight gradient, so at 32 rows a block the weight
gradient's GEMM ran at 45 GFLOP/s against 216 at 2,048 rows (2 Xeon cores, H = 256, V = 151,936; issue 35). Cut
the vocabulary instead and every GEMM has all N positions as its rows, while the logits held are [N, block]:

    forward   per column block: s = h W_b^T; an online log-sum-exp (running max m, sum of exp(s - m), and of
              exp(s - m) s for the entropy); the target's logit where it falls in the block
              log pi(y) = s_y - lse,  entropy = lse - sum_v p_v s_v
    backward  per column block again: p = exp(s - lse); G = -g p (plus the one-hot part, added once, sparse)
              dh += G W_b,  dW_b = G^T h

Two head projections and two gradient GEMMs, as a checkpointed block of positions does, but no [rows, block, V]
autograd graph is recomputed and every GEMM runs at the batch's full row count. The blocks' buffers are kept
between blocks (a fresh buffer above glibc's mmap threshold is a fresh mapping, paid in page faults). With a
`temperature` != 1 the tempered log-probability (the importance ratio's numerator) comes out of the same
blocks. Equal to log_softmax over the whole vocabulary up to float rounding: `tests/test_vocab_blocks.py`.
"""

from __future__ import annotations

import torch


def _blocks(V: int, block: int) -> list[tuple[int, int]]:
    if block <= 0:
        raise ValueError(f"a vocabulary block must be positive, got {block}")
    return [(v, min(v + block, V)) for v in range(0, V, block)]


class _Online:
    """A running log-sum-exp over column blocks (and, optionally, the sum of exp(s - max) * s for an entropy)."""

    def __init__(self, N: int, like: torch.Tensor, entropy: bool):
        self.max = like.new_full((N,), float("-inf"))
        self.total = like.new_zeros(N)
        self.dot = like.new_zeros(N) if entropy else None

    def add(self, s_N_n: torch.Tensor, e_buf: torch.Tensor) -> None:
        new_max = torch.maximum(self.max, s_N_n.amax(-1))
        scale = torch.exp(self.max - new_max)
        e = torch.sub(s_N_n, new_max[:, None], out=e_buf).exp_()
        self.total.mul_(scale).add_(e.sum(-1))
        if self.dot is not None:
            self.dot.mul_(scale).add_(torch.linalg.vecdot(e, s_N_n))
        self.max = new_max

    def lse(self) -> torch.Tensor:
        return self.max + self.total.log()


def _project(h_N_H: torch.Tensor, w_n_H: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """h W^T into the kept buffer when the block is whole (the last, narrower block gets its own)."""
    if buf.shape[1] == w_n_H.shape[0]:
        return torch.mm(h_N_H, w_n_H.T, out=buf)
    return h_N_H @ w_n_H.T


def _forward(h_N_H: torch.Tensor, w_V_H: torch.Tensor, y_N: torch.Tensor, block: int, temperature: float,
             entropy: bool) -> tuple[torch.Tensor, ...]:
    """(log pi(y), tempered log pi(y) or None, entropy or None, lse, tempered lse or None), all [N]."""
    N, V = h_N_H.shape[0], w_V_H.shape[0]
    width = min(block, V)
    s_buf, e_buf = h_N_H.new_empty(N, width), h_N_H.new_empty(N, width)
    plain = _Online(N, h_N_H, entropy)
    tempered = _Online(N, h_N_H, False) if temperature != 1.0 else None
    picked = h_N_H.new_zeros(N)
    for v0, v1 in _blocks(V, block):
        s = _project(h_N_H, w_V_H[v0:v1], s_buf)
        e = e_buf[:, : v1 - v0]
        plain.add(s, e)
        if tempered is not None:
            tempered.add(s / temperature, e)
        here = ((y_N >= v0) & (y_N < v1)).nonzero().flatten()
        if here.numel():
            picked[here] = s[here, y_N[here] - v0]
    lse = plain.lse()
    ent = lse - plain.dot / plain.total if plain.dot is not None else None
    t_lse = tempered.lse() if tempered is not None else None
    t_lp = picked / temperature - t_lse if t_lse is not None else None
    return picked - lse, t_lp, ent, lse, t_lse


class _SampledTokenHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_N_H, w_V_H, y_N, block, temperature):
        lp, t_lp, ent, lse, t_lse = _forward(h_N_H, w_V_H, y_N, block, temperature, entropy=True)
        ctx.block, ctx.temperature = block, temperature
        ctx.save_for_backward(h_N_H, w_V_H, y_N, lse, t_lse if t_lse is not None else lse)
        ctx.mark_non_differentiable(ent)
        return lp, (t_lp if t_lp is not None else lp.detach().clone()), ent

    @staticmethod
    def backward(ctx, g_lp, g_tlp, _g_ent):
        h, w, y, lse, t_lse = ctx.saved_tensors
        tau = ctx.temperature
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        if tau == 1.0 and g_tlp is not None:  # the "tempered" output is the plain one
            g_lp, g_tlp = g_lp + g_tlp, None
        g_t = None if g_tlp is None else g_tlp / tau
        want_h, want_w = ctx.needs_input_grad[:2]
        gh = torch.zeros_like(h) if want_h else None
        gw = torch.empty_like(w) if want_w else None  # every row is written by its block below
        N, V = h.shape[0], w.shape[0]
        width = min(ctx.block, V)
        s_buf, p_buf = h.new_empty(N, width), h.new_empty(N, width)
        for v0, v1 in _blocks(V, ctx.block):
            s = _project(h, w[v0:v1], s_buf)
            G = torch.sub(s, lse[:, None], out=p_buf[:, : v1 - v0]).exp_().mul_(-g_lp[:, None])
            if g_t is not None:
                G.sub_((s / tau).sub_(t_lse[:, None]).exp_().mul_(g_t[:, None]))
            if gh is not None:
                gh.addmm_(G, w[v0:v1])
            if gw is not None:
                torch.mm(G.T, h, out=gw[v0:v1])
        c = g_lp if g_t is None else g_lp + g_t  # the one-hot part: d log pi(y) / d s_y = 1 (1 / tau tempered)
        if gh is not None:
            gh.add_(w[y] * c[:, None])
        if gw is not None:
            gw.index_add_(0, y, h * c[:, None])
        return gh, gw, None, None, None


def sampled_token_head(h_N_H: torch.Tensor, w_V_H: torch.Tensor, y_N: torch.Tensor, block: int,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log softmax(h W^T)[y], log softmax(h W^T / temperature)[y], entropy of softmax(h W^T)), [N] each: the
    first two differentiable wrt `h` and `w`, the entropy a metric; `block` vocabulary columns at a time."""
    return _SampledTokenHead.apply(h_N_H, w_V_H, y_N, block, float(temperature))


@torch.no_grad()
def sampled_token_logprobs(h_N_H: torch.Tensor, w_V_H: torch.Tensor, y_N: torch.Tensor, block: int) -> torch.Tensor:
    """log softmax(h W^T)[y], [N], without a graph (a teacher's score), `block` vocabulary columns at a time."""
    return _forward(h_N_H, w_V_H, y_N, block, 1.0, entropy=False)[0]
