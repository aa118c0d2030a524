"""Multinomial logistic regression for many layers and folds at once, in torch.

A probe per layer and per fold is a small convex problem; fitting them one by one (a scikit-learn loop)
pays Python and solver overhead per problem and multiplies a thin matrix each time. Here every
(layer, problem) pair is one slice of a batch: the features of all layers are a (L, N, D) tensor, each
problem (a fold of a task) is a training mask over the N items, and one L-BFGS with a line search per
slice solves them together with two batched matmuls per iteration.

The objective matches scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised intercept),
divided by the number of training items so the tolerance does not depend on the set size::

    mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n_train)

Standardisation (train-fold mean and std) is folded into the weights instead of copying the features
once per fold: ``((x - mu) / sigma) W = x (W / sigma) - (mu / sigma) W``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_NEG = -1.0e9  # logit of a class absent from a fold's training set (finite: -inf * 0 would be NaN)
_PARALLEL_MIN = 1 << 20  # logits below this many elements: one CPU thread
_PRECOND_ROWS = 1024  # rows used to estimate each layer's feature correlation
_PRECOND_RIDGE = 1e-3  # smallest ridge added to the correlation before inverting it
_PATIENCE = 20
_GAMMA0 = lambda K: 1.0
_FIRST_T1 = False  # iterations without a 1% smaller gradient before a slice counts as stalled


@contextlib.contextmanager
def _threads_for(n_logits: int, device: torch.device):
    """Run small CPU problems on one thread.

    Their ops take microseconds; intra-op threads then only add barrier waits, and on a busy machine a
    waiting thread turns each op into a scheduler time slice (measured: 40 ms per tiny bmm, 50x slower).
    """
    if device.type != "cpu" or n_logits >= _PARALLEL_MIN or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class BatchedFit:
    """What :func:`fit_logistic` returns.

    Attributes:
        pred: (L, P, N) predicted class of every item under every (layer, problem) probe.
        n_iter: iterations run (the slowest slice's).
        iters: (L, P) iterations each slice ran before it converged or stalled.
        converged: (L, P) True where the max-abs gradient reached ``tol``.
        grad_max: (L, P) final max-abs gradient.
        weight: (L, P, K, D) weights in standardised space; bias: (L, P, K) likewise.
    """

    pred: torch.Tensor
    n_iter: int
    iters: torch.Tensor
    converged: torch.Tensor
    grad_max: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


class _Objective:
    """Loss and gradient of every (layer, problem) slice at once.

    Logits are laid out (L, P, K, N): the softmax then runs over K with N contiguous underneath,
    which vectorises, where a trailing K of 3-10 classes would not (4x slower on CPU).
    """

    def __init__(self, X, y, train, n_classes, C, standardize, precondition=True):
        L, N, D = X.shape
        P = y.shape[0]
        self.L, self.N, self.D, self.P, self.K = L, N, D, P, n_classes
        self.X = X  # (L, N, D)
        w = (train & (y >= 0)).to(X.dtype)  # (P, N)
        self.n = w.sum(1).clamp_min(1.0)  # (P,)
        self.wn = w / self.n[:, None]  # (P, N) per-item weight of the mean
        self.yidx = y.clamp_min(0)[None, :, None, :].expand(L, P, 1, N)  # (L, P, 1, N)
        counts = torch.zeros(P, n_classes, dtype=X.dtype, device=X.device)
        counts.scatter_add_(1, y.clamp_min(0), w)  # (P, K) training items per class
        self.logit_mask = torch.where(counts > 0, 0.0, _NEG).to(X.dtype)  # (P, K) absent classes off
        self.reg = 1.0 / (C * self.n)  # (P,)
        if standardize:
            # z-scores do not depend on a column's offset or scale, so first bring every column to
            # [-1, 1] around its mean: then float32 moments are accurate even for columns living at
            # 1e-8 or 1e-32 (LayerNorm dimensions with a near-zero gain are real signal, not constants)
            shift = X.mean(1, keepdim=True)  # (L, 1, D)
            Xs = X - shift
            spread = Xs.abs().amax(1, keepdim=True)  # (L, 1, D)
            Xs /= torch.where(spread > 0, spread, torch.ones_like(spread))
            self.X = Xs  # (L, N, D) the scaled copy replaces X from here on
            mu = torch.matmul(self.wn, Xs)  # (L, P, D)
            ex2 = torch.matmul(self.wn, Xs.square())  # (L, P, D)
            sigma = (ex2 - mu * mu).clamp_min(0.0).sqrt()
            # constant within a fold's training rows: scikit-learn's convention, scale 1
            self.sigma = torch.where(sigma > 1e-6, sigma, torch.ones_like(sigma))
            self.mu = mu
        else:
            self.mu = torch.zeros(L, P, D, dtype=X.dtype, device=X.device)
            self.sigma = torch.ones(L, P, D, dtype=X.dtype, device=X.device)
        self.mu_over_sigma = self.mu / self.sigma  # (L, P, D)
        # curvature ~ corr / K from the data + 1 / (C n) from the penalty: the ridge is their ratio, so
        # directions the features do not span (rank-deficient hidden states) are not over-amplified
        ridge = min(max(n_classes / (C * float(self.n.min())), _PRECOND_RIDGE), 1.0)
        self.chol = self._preconditioner(self.X, ridge) if precondition else None  # (L, D, D)

    def _preconditioner(self, X: torch.Tensor, ridge: float) -> torch.Tensor:
        """Cholesky factor of each layer's feature correlation (+ a ridge): the curvature's shape.

        The multinomial Hessian is about ``c * corr(z) (x) (diag p - p p^T) + ridge``; anisotropic
        hidden states make ``corr(z)`` badly conditioned, and L-BFGS then crawls along its small
        directions. Starting each two-loop recursion from ``corr(z)^-1`` instead of the identity takes
        the shape away (a few rows suffice: it only has to be roughly right).
        """
        L, N, D = X.shape
        rows = torch.linspace(0, N - 1, min(N, _PRECOND_ROWS), device=X.device).long()
        Z = X[:, rows]  # (L, R, D)
        Z = (Z - Z.mean(1, keepdim=True)) / Z.std(1, keepdim=True).clamp_min(1e-6)
        corr = torch.bmm(Z.transpose(1, 2), Z) / len(rows)  # (L, D, D)
        corr.diagonal(dim1=1, dim2=2).add_(ridge)
        chol, info = torch.linalg.cholesky_ex(corr)
        if bool((info != 0).any()):  # numerically singular: fall back to the identity on those layers
            eye = torch.eye(D, dtype=X.dtype, device=X.device).expand(L, D, D)
            chol = torch.where((info != 0)[:, None, None], eye, chol)
        return chol

    def precondition(self, q: torch.Tensor) -> torch.Tensor:
        """Apply ``corr^-1`` to the weight part of (L, P, K, D + 1) directions (the bias is left alone)."""
        if self.chol is None:
            return q
        L, P, K, D1 = q.shape
        D = D1 - 1
        w = q[..., :D].permute(0, 3, 1, 2).reshape(L, D, P * K)  # (L, D, P*K)
        w = torch.cholesky_solve(w, self.chol).view(L, D, P, K).permute(0, 2, 3, 1)
        return torch.cat([w, q[..., D:]], dim=-1)

    def subset(self, keep: torch.Tensor) -> _Objective:
        """The same objective restricted to the layers where ``keep`` (L,) is True."""
        sub = object.__new__(_Objective)
        sub.__dict__.update(self.__dict__)
        sub.X, sub.mu, sub.sigma = self.X[keep], self.mu[keep], self.sigma[keep]
        sub.mu_over_sigma = self.mu_over_sigma[keep]
        sub.chol = None if self.chol is None else self.chol[keep]
        sub.L = int(sub.X.shape[0])
        sub.yidx = self.yidx[:1].expand(sub.L, -1, -1, -1)
        return sub

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """(L, P, K, N) logits for parameters ``theta`` of shape (L, P, K, D + 1)."""
        L, N, D, P, K = self.L, self.N, self.D, self.P, self.K
        W = theta[..., :D]  # (L, P, K, D)
        V = W / self.sigma[:, :, None, :]  # (L, P, K, D) weights on raw features
        c = theta[..., D] - (W * self.mu_over_sigma[:, :, None, :]).sum(-1)  # (L, P, K)
        z = torch.bmm(V.reshape(L, P * K, D), self.X.transpose(1, 2)).view(L, P, K, N)
        return z.add_((c + self.logit_mask)[..., None])

    def __call__(self, theta: torch.Tensor, grad: bool = True):
        """Loss (L, P) and, if asked, gradient (L, P, K, D + 1)."""
        L, N, D, P, K = self.L, self.N, self.D, self.P, self.K
        W = theta[..., :D]
        z = self.logits(theta)  # (L, P, K, N)
        zy = z.gather(2, self.yidx).squeeze(2)  # (L, P, N) logit of the true class
        m = z.amax(2, keepdim=True)  # (L, P, 1, N)
        e = z.sub_(m).exp_()  # (L, P, K, N), z is consumed
        s = e.sum(2)  # (L, P, N)
        nll = s.log().add_(m.squeeze(2)).sub_(zy)  # (L, P, N) logsumexp - true logit
        loss = (nll * self.wn).sum(-1) + 0.5 * self.reg * W.square().sum((2, 3))  # (L, P)
        if not grad:
            return loss, None
        R = e.mul_((self.wn / s)[:, :, None, :])  # (L, P, K, N) softmax * item weight
        R.scatter_add_(2, self.yidx, -self.wn.expand(L, P, N)[:, :, None, :])  # minus one-hot
        G = torch.bmm(R.view(L, P * K, N), self.X).view(L, P, K, D)  # R X (X as scaled above)
        db = R.sum(-1)  # (L, P, K)
        dW = (G - db[..., None] * self.mu[:, :, None, :]) / self.sigma[:, :, None, :]
        dW += self.reg[None, :, None, None] * W
        return loss, torch.cat([dW, db[..., None]], dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice inner product of (L, P, ...) tensors -> (L, P)."""
    return (a * b).flatten(2).sum(-1)


@torch.no_grad()
def fit_logistic(
    X: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    n_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-4,
    standardize: bool = True,
    history: int = 10,
    max_linesearch: int = 30,
    precondition: bool = True,
) -> BatchedFit:
    """Fit one multinomial probe per (layer, problem) with a batched L-BFGS.

    Each slice keeps its own curvature history and its own backtracking (Armijo) step, so a hard
    layer does not slow the step of an easy one; converged slices stop moving.

    Args:
        X: (L, N, D) features of L layers (same dimension) for N items.
        y: (P, N) class index per problem and item in ``[0, n_classes)``; -1 = unlabelled.
        train: (P, N) bool training mask per problem (e.g. the folds of one or more tasks).
        n_classes: K, shared by every problem.
        C: inverse L2 strength, scikit-learn's ``C``.
        max_iter: L-BFGS iterations at most.
        tol: stop a slice when its max-abs gradient (of the per-item mean objective) is below this.
        standardize: z-score features with each problem's training mean and std.
        history: L-BFGS memory.
        max_linesearch: backtracking halvings before a slice is declared stalled.
        precondition: start each L-BFGS step from the inverse feature correlation (fewer iterations on
            anisotropic features; the optimum is the same).

    Returns:
        A :class:`BatchedFit`; ``pred`` covers every item so test masks can be applied afterwards.

    Example:
        >>> X = torch.randn(3, 100, 8); y = (X[0, :, 0] > 0).long()[None]
        >>> fit = fit_logistic(X, y, torch.ones(1, 100, dtype=torch.bool), 2)
        >>> fit.pred.shape
        torch.Size([3, 1, 100])
    """
    X = X.float()
    y = y.to(X.device).long()
    train = train.to(X.device).bool()
    with _threads_for(X.shape[0] * X.shape[1] * y.shape[0] * n_classes, X.device):
        return _solve(
            X, y, train, n_classes, C, max_iter, tol, standardize, history, max_linesearch, precondition
        )


def _solve(X, y, train, n_classes, C, max_iter, tol, standardize, history, max_linesearch, precondition):
    """The batched L-BFGS behind :func:`fit_logistic`."""
    full = _Objective(X, y, train, n_classes, C, standardize, precondition)
    L, P, D, K = full.L, full.P, full.D, full.K
    theta_out = torch.zeros(L, P, K, D + 1, dtype=X.dtype, device=X.device)
    gmax_out = torch.zeros(L, P, dtype=X.dtype, device=X.device)
    iters_out = torch.zeros(L, P, dtype=torch.long, device=X.device)

    obj = full
    live = torch.arange(L, device=X.device)  # layers still being solved; finished ones drop out
    theta = theta_out.clone()
    f, g = obj(theta)
    gmax = g.abs().flatten(2).amax(-1)  # (L, P)
    active = gmax > tol
    S: list[torch.Tensor] = []
    Yh: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = torch.full((L, P), float(_GAMMA0(K)), dtype=X.dtype, device=X.device)
    iters = torch.zeros(L, P, dtype=torch.long, device=X.device)
    best = gmax.clone()  # smallest gradient seen, and iterations since it last improved by 1%
    flat = torch.zeros(L, P, dtype=torch.long, device=X.device)
    eps = 8 * torch.finfo(X.dtype).eps  # relative noise of a loss summed in this precision
    n_iter = 0
    for it in range(max_iter):
        # layers whose every problem is done leave the batch: the cost follows the live slices
        done = ~active.any(1)  # (L_live,)
        if bool(done.any()):
            theta_out[live[done]], gmax_out[live[done]], iters_out[live[done]] = (
                theta[done],
                gmax[done],
                iters[done],
            )
            keep = ~done
            if not bool(keep.any()):
                live = live[keep]
                break
            live, theta, f, g, gmax = live[keep], theta[keep], f[keep], g[keep], gmax[keep]
            active, gamma, iters, flat, best = active[keep], gamma[keep], iters[keep], flat[keep], best[keep]
            S, Yh, rho = [v[keep] for v in S], [v[keep] for v in Yh], [v[keep] for v in rho]
            obj = obj.subset(keep)
        n_iter = it + 1
        iters += active
        # two-loop recursion, per slice
        q = g.clone()
        alphas = []
        for s_i, y_i, r_i in zip(reversed(S), reversed(Yh), reversed(rho), strict=True):
            a = r_i * _dot(s_i, q)  # (L, P)
            q -= a[..., None, None] * y_i
            alphas.append(a)
        r = gamma[..., None, None] * obj.precondition(q)
        for s_i, y_i, r_i, a in zip(S, Yh, rho, reversed(alphas), strict=True):
            beta = r_i * _dot(y_i, r)
            r += s_i * (a - beta)[..., None, None]
        d = -r
        gd = _dot(g, d)  # (L, P) directional derivative
        bad = gd >= 0  # not a descent direction: fall back to steepest descent
        if bool(bad.any()):
            d = torch.where(bad[..., None, None], -g, d)
            gd = torch.where(bad, -_dot(g, g), gd)
        d = d * active[..., None, None]
        # first step: scaled like torch's LBFGS, the history has no curvature yet
        t = torch.clamp(1.0 / g.abs().flatten(2).sum(-1), max=1.0) if (it == 0 and not _FIRST_T1) else torch.ones_like(f)
        # backtracking line search (Armijo), every slice with its own step. Near the optimum the loss
        # changes less than its own rounding noise, and a strict Armijo test would reject the very step
        # that reaches tol; the test is relaxed by that noise (Hager & Zhang's approximate Wolfe idea).
        noise = eps * f.abs()
        step = torch.zeros_like(f)
        f_new, g_new = obj(theta + t[..., None, None] * d)
        ok = active & (f_new <= f + 1e-4 * t * gd + noise)
        step = torch.where(ok, t, step)
        accepted = ~active | ok
        exact = bool(accepted.all())  # f_new, g_new are already at the accepted point
        for _ in range(max_linesearch):
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
            f_try, _ = obj(theta + t[..., None, None] * d, grad=False)
            ok = ~accepted & (f_try <= f + 1e-4 * t * gd + noise)
            step = torch.where(ok, t, step)
            accepted = accepted | ok
        stalled = active & (step == 0)  # no decrease even at a tiny step: float precision reached
        theta_new = theta + step[..., None, None] * d
        if not exact:
            f_new, g_new = obj(theta_new)
        s = theta_new - theta
        yv = g_new - g
        ys = _dot(s, yv)
        good = ys > 1e-10
        S.append(s * good[..., None, None])
        Yh.append(yv * good[..., None, None])
        rho.append(torch.where(good, 1.0 / ys.clamp_min(1e-10), torch.zeros_like(ys)))
        gamma = torch.where(good, ys / _dot(yv, obj.precondition(yv)).clamp_min(1e-30), gamma)
        if len(S) > history:
            S.pop(0), Yh.pop(0), rho.pop(0)
        theta, f, g = theta_new, f_new, g_new
        gmax = g.abs().flatten(2).amax(-1)
        improved = gmax < 0.99 * best
        best = torch.minimum(best, gmax)
        flat = torch.where(improved, torch.zeros_like(flat), flat + 1)
        stalled = stalled | (flat >= _PATIENCE)  # the gradient stopped shrinking: float precision reached
        active = active & (gmax > tol) & ~stalled
    if len(live):  # max_iter reached with slices still live
        theta_out[live], gmax_out[live], iters_out[live] = theta, gmax, iters
    pred = full.logits(theta_out).argmax(2)  # (L, P, N)
    return BatchedFit(
        pred=pred,
        n_iter=n_iter,
        iters=iters_out,
        converged=gmax_out <= tol,
        grad_max=gmax_out,
        weight=theta_out[..., :D],
        bias=theta_out[..., D],
    )
