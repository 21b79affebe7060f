"""Higher derivatives of cut cross-entropy: forward mode (jvp) of the forward op, and the
derivatives of the backward op in both modes (double backward, hessian, Hessian-vector
products). The kernels compute first derivatives only; these are computed here with torch
ops, one block of the vocabulary at a time, so that memory stays O(N x block) as in the
kernels and no N x V tensor is formed.

The backward op, as a function of (grad_loss, grad_lse, hidden, classifier, bias, lse), is
(with z = softcap(h c^T + b) and p = exp(z - lse), lse an input like the others)

    dz   = a p - (1 - ls) g onehot(target) - (ls / V) g,   a = g (1 + 2 z_loss lse) + grad_lse
    dh   = (dz * softcap'(.)) @ c,   dc = (dz * softcap'(.))^T @ h,   db = sum over tokens,

zero for ignored tokens (csrc/common/linear_cross_entropy_math.h); its derivatives here are
those of that expression (without the kernels' gradient filtering, which only drops entries
below filter_eps)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, cast, overload

import torch

# Logit-block entries per step (4 MiB in float32, 8 in float64): some ten intermediates of this
# size are alive at once.
_BLOCK_ENTRIES = 1 << 20


class Options(NamedTuple):
    ignore_index: int
    softcap: float
    label_smoothing: float
    z_loss: float
    vocab_start: int
    vocab_total: int  # -1: the classifier's rows are the whole vocabulary


def _blocks(tokens: int, vocab: int) -> List[Tuple[int, int]]:
    step = max(1, min(vocab, _BLOCK_ENTRIES // max(1, tokens)))
    return [(j, min(vocab, j + step)) for j in range(0, vocab, step)]


class _Tokens(NamedTuple):
    active: torch.Tensor  # (N,) bool: the tokens that are not ignored
    valid: torch.Tensor   # (N,) accumulation dtype: active as 1 and 0
    target: torch.Tensor  # (N,) int64: the target's column in this classifier (may be outside it)
    inv_vocab: float


def _tokens(targets: torch.Tensor, classifier: torch.Tensor, opt: Options, dtype: torch.dtype) -> _Tokens:
    t = targets.long()
    vocab = classifier.shape[0] if opt.vocab_total < 0 else opt.vocab_total
    active = t != opt.ignore_index
    return _Tokens(active, active.to(dtype), t - opt.vocab_start, 1.0 / vocab)


@overload
def _up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _up(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]: ...
def _up(t, dtype):
    """Every block works in the accumulation dtype (float32 for half inputs, like the kernels),
    and sums across blocks stay in it: one rounding to the input's dtype at the end."""
    return None if t is None else t.to(dtype)


def _probabilities(z: torch.Tensor, lse: torch.Tensor, tok: _Tokens) -> torch.Tensor:
    """exp(z - lse), 0 at ignored tokens (whose lse is 0: exp(z) could overflow, and 0 * inf
    would be NaN)."""
    return torch.exp(torch.where(tok.active[:, None], z - lse[:, None], float("-inf")))


def _onehot(tok: _Tokens, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
    cols = torch.arange(j0, j1, device=tok.target.device)
    return (tok.target[:, None] == cols[None, :]).to(dtype)


def _logits(h: torch.Tensor, c: torch.Tensor, b: Optional[torch.Tensor], softcap: float):
    """(z, tanh(a / softcap) or None) for raw logits a = h c^T + b."""
    a = h @ c.T
    if b is not None:
        a = a + b
    if not softcap:
        return a, None
    t = torch.tanh(a / softcap)
    return softcap * t, t


def _backward_block(grad_loss, grad_lse, h, c, b, lse, tok: _Tokens, onehot, opt: Options):
    """The backward op's (dh part, dc rows, db rows) for classifier rows c (one block)."""
    z, t = _logits(h, c, b, opt.softcap)
    p = _probabilities(z, lse, tok)
    g = grad_loss * tok.valid
    scale = g * (1 + 2 * opt.z_loss * lse)
    if grad_lse is not None:
        scale = scale + grad_lse * tok.valid
    dz = scale[:, None] * p - (g * (1 - opt.label_smoothing))[:, None] * onehot
    if opt.label_smoothing:
        dz = dz - (g * (opt.label_smoothing * tok.inv_vocab))[:, None]
    if t is not None:
        dz = dz * (1 - t * t)
    return dz @ c, dz.T @ h, None if b is None else dz.sum(0)


def _zeros_if_none(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t


def _down(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype)


def backward_vjp(cotangents, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, opt: Options,
                 output_mask) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor,
                                       Optional[torch.Tensor], torch.Tensor]:
    """Gradients of <cotangents, backward op's (dh, dc, db)> with respect to (grad_loss,
    grad_lse, hidden, classifier, bias, lse); grad_lse's and bias's are None where they are."""
    acc = lse.dtype
    h, c, b_all = _up(hidden, acc), _up(classifier, acc), _up(bias, acc)
    u_h, u_c, u_b = cotangents
    u_h = u_h.to(acc) if output_mask[0] and u_h is not None else torch.zeros_like(h)
    u_c = u_c.to(acc) if output_mask[1] and u_c is not None else torch.zeros_like(c)
    if b_all is not None:
        u_b = u_b.to(acc) if output_mask[2] and u_b is not None else torch.zeros_like(b_all)
    tok = _tokens(targets, classifier, opt, acc)
    d_g, d_gl, d_h, d_lse = (torch.zeros_like(grad_loss), None if grad_lse is None else torch.zeros_like(grad_lse),
                             torch.zeros_like(h), torch.zeros_like(lse))
    d_c_parts: List[torch.Tensor] = []
    d_b_parts: List[torch.Tensor] = []
    for j0, j1 in _blocks(h.shape[0], c.shape[0]):
        onehot = _onehot(tok, j0, j1, acc)
        b = None if b_all is None else b_all[j0:j1]
        primals = (grad_loss, grad_lse, h, c[j0:j1], b, lse)
        present = [i for i, p in enumerate(primals) if p is not None]

        def block(*args, present=present, onehot=onehot):
            full: List[Optional[torch.Tensor]] = [None] * 6
            for i, a in zip(present, args):
                full[i] = a
            dh, dc, db = _backward_block(*full, tok, onehot, opt)
            return (dh, dc) if db is None else (dh, dc, db)

        pull = torch.func.vjp(block, *(primals[i] for i in present))[1]
        pulled = dict(zip(present, pull((u_h, u_c[j0:j1]) if b is None else (u_h, u_c[j0:j1], u_b[j0:j1]))))
        d_g, d_h, d_lse = d_g + pulled[0], d_h + pulled[2], d_lse + pulled[5]
        if d_gl is not None:
            d_gl = d_gl + pulled[1]
        d_c_parts.append(pulled[3])
        if b is not None:
            d_b_parts.append(pulled[4])
    d_c = _down(torch.cat(d_c_parts), classifier) if d_c_parts else torch.zeros_like(classifier)
    d_b = None if bias is None else (_down(torch.cat(d_b_parts), bias) if d_b_parts else torch.zeros_like(bias))
    return d_g, d_gl, _down(d_h, hidden), d_c, d_b, d_lse


def _block_jvp(primals, tangents, tok: _Tokens, onehot, opt: Options):
    """The tangents of _backward_block's (dh part, dc rows, db rows), written out: torch.func.jvp
    cannot run inside an eager forward-mode level (fwAD.dual_level)."""
    grad_loss, grad_lse, h, c, b, lse = primals
    t_g, t_gl, t_h, t_c, t_b, t_lse = tangents
    z, t = _logits(h, c, b, opt.softcap)
    da = t_h @ c.T + h @ t_c.T
    if b is not None:
        da = da + t_b
    if t is not None:
        slope = 1 - t * t
        dz_in, d_slope = slope * da, -2 * t * slope * da / opt.softcap
    else:
        dz_in, slope, d_slope = da, None, None
    p = _probabilities(z, lse, tok)
    dp = p * (dz_in - t_lse[:, None])
    g, dg = grad_loss * tok.valid, t_g * tok.valid
    scale = g * (1 + 2 * opt.z_loss * lse)
    d_scale = dg * (1 + 2 * opt.z_loss * lse) + g * (2 * opt.z_loss) * t_lse
    if grad_lse is not None:
        scale, d_scale = scale + grad_lse * tok.valid, d_scale + t_gl * tok.valid
    ls = opt.label_smoothing
    G = scale[:, None] * p - (g * (1 - ls))[:, None] * onehot
    dG = d_scale[:, None] * p + scale[:, None] * dp - (dg * (1 - ls))[:, None] * onehot
    if ls:
        G, dG = G - (g * (ls * tok.inv_vocab))[:, None], dG - (dg * (ls * tok.inv_vocab))[:, None]
    if slope is not None:
        G, dG = G * slope, dG * slope + G * d_slope
    return dG @ c + G @ t_c, dG.T @ h + G.T @ t_h, None if b is None else dG.sum(0)


def backward_jvp(primals, tangents, targets, opt: Options, output_mask):
    """Tangents of the backward op's (dh, dc, db), primals and tangents being (grad_loss,
    grad_lse, hidden, classifier, bias, lse) (None for an absent argument or tangent)."""
    grad_loss, grad_lse, hidden, classifier, bias, lse = primals
    acc = lse.dtype
    full = [None if p is None else _zeros_if_none(t, p) for p, t in zip(primals, tangents)]
    t_g, t_gl, t_h, t_c, t_b, t_lse = (_up(t, acc) for t in full)
    h, c, b_all = _up(hidden, acc), _up(classifier, acc), _up(bias, acc)
    tok = _tokens(targets, classifier, opt, acc)
    o_h = torch.zeros_like(h)
    o_c_parts: List[torch.Tensor] = []
    o_b_parts: List[torch.Tensor] = []
    for j0, j1 in _blocks(h.shape[0], c.shape[0]):
        onehot = _onehot(tok, j0, j1, acc)
        b, tb = (None, None) if b_all is None else (b_all[j0:j1], cast(torch.Tensor, t_b)[j0:j1])
        part_h, part_c, part_b = _block_jvp((grad_loss, grad_lse, h, c[j0:j1], b, lse),
                                            (t_g, t_gl, t_h, cast(torch.Tensor, t_c)[j0:j1], tb, t_lse), tok, onehot,
                                            opt)
        o_h = o_h + part_h
        o_c_parts.append(part_c)
        if b is not None:
            o_b_parts.append(part_b)
    out_h = _down(o_h, hidden) if output_mask[0] else hidden.new_zeros((0,))
    out_c = (_down(torch.cat(o_c_parts), classifier) if o_c_parts else torch.zeros_like(classifier)) \
        if output_mask[1] else classifier.new_zeros((0,))
    if bias is not None and output_mask[2]:
        out_b = _down(torch.cat(o_b_parts), bias) if o_b_parts else torch.zeros_like(bias)
    else:
        out_b = hidden.new_zeros((0,)) if bias is None else bias.new_zeros((0,))
    return out_h, out_c, out_b


def forward_jvp(hidden, classifier, targets, bias, lse, tangents, opt: Options):
    """Tangents of the forward op's (loss, lse), tangents being those of (hidden, classifier,
    bias) (None: no tangent)."""
    acc = lse.dtype
    t_h, t_c, t_b = tangents
    t_h, t_c = _zeros_if_none(t_h, hidden).to(acc), _zeros_if_none(t_c, classifier).to(acc)
    t_b = None if bias is None else _zeros_if_none(t_b, bias).to(acc)
    h, c, b_all = _up(hidden, acc), _up(classifier, acc), _up(bias, acc)
    tok = _tokens(targets, classifier, opt, acc)
    d_lse = torch.zeros_like(lse)
    d_target = torch.zeros_like(lse)
    d_sum = torch.zeros_like(lse)
    for j0, j1 in _blocks(h.shape[0], c.shape[0]):
        cb, tc = c[j0:j1], t_c[j0:j1]
        b = None if b_all is None else b_all[j0:j1]
        z, t = _logits(h, cb, b, opt.softcap)
        dz = t_h @ cb.T + h @ tc.T
        if b is not None:
            dz = dz + cast(torch.Tensor, t_b)[j0:j1]
        if t is not None:
            dz = (1 - t * t) * dz
        d_lse = d_lse + (_probabilities(z, lse, tok) * dz).sum(1)
        d_target = d_target + (_onehot(tok, j0, j1, acc) * dz).sum(1)
        if opt.label_smoothing:
            d_sum = d_sum + dz.sum(1)
    ls = opt.label_smoothing
    d_loss = d_lse * (1 + 2 * opt.z_loss * lse) - (1 - ls) * d_target - ls * tok.inv_vocab * d_sum
    return d_loss * tok.valid, d_lse * tok.valid
