"""Multinomial logistic regression for many layers and folds at once, in torch.

A probe per layer and per fold is a small convex problem; fitting them one by one (a scikit-learn loop)
pays Python and solver overhead per problem and multiplies a thin matrix each time. Here every
(layer, problem) pair is one slice of a batch: the features of all layers are a (L, N, D) tensor, each
problem (a fold of a task) is a training mask over the N items, and one L-BFGS, with its own curvature
history and line search per slice, solves them together.

The objective matches scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised intercept),
divided by the number of training items so the tolerance does not depend on the set size::

    mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n_train)

Three things keep it cheap:

* Standardisation (train-fold mean and std) is folded into the weights instead of copying the features
  once per fold: ``((x - mu) / sigma) W = x (W / sigma) - (mu / sigma) W``.
* Logits are linear in the parameters, so along a search direction ``d`` they are ``Z + t X d``: one
  matmul gives every trial step of the line search, and one more the gradient at the accepted point.
  Each iteration costs two passes over the features, however many steps the line search tries.
* Each step starts from the inverse feature correlation (plus the penalty's ridge) rather than the
  identity, which takes 2-3x fewer iterations on anisotropic hidden states and leaves the optimum alone.
  Converged slices stop costing anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_NEG = -1.0e9  # logit of a class absent from a fold's training set (finite: -inf * 0 would be NaN)
_PARALLEL_MIN = 1 << 20  # logits below this many elements: one CPU thread
_PRECOND_ROWS = 2048  # rows used to estimate each layer's feature correlation
_PRECOND_RIDGE = 1e-3  # smallest ridge added to the correlation before inverting it
_PATIENCE = 20  # iterations without a 1% smaller gradient before a slice counts as stalled
_REFRESH = 10  # iterations between exact recomputations of the running logits
_C1 = 1e-4  # Armijo's sufficient-decrease constant


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


class _Problems:
    """The data of every (layer, problem) slice, and its logits, loss and gradient, layer by layer.

    Parameters of a slice are ``theta`` (K, D + 1): weights on the standardised features, then the bias.
    Logits are laid out (p, K, N): the softmax runs over K with N contiguous underneath, which vectorises,
    where a trailing K of 3-10 classes would not (4x slower on CPU).
    """

    def __init__(self, X, y, train, n_classes, C, standardize, precondition):
        L, N, D = X.shape
        P = y.shape[0]
        self.L, self.N, self.D, self.P, self.K = L, N, D, P, n_classes
        w = (train & (y >= 0)).to(X.dtype)  # (P, N)
        self.n = w.sum(1).clamp_min(1.0)  # (P,)
        self.wn = w / self.n[:, None]  # (P, N) per-item weight of the mean
        self.yidx = y.clamp_min(0)[:, None, :]  # (P, 1, N)
        counts = torch.zeros(P, n_classes, dtype=X.dtype, device=X.device)
        counts.scatter_add_(1, y.clamp_min(0), w)  # (P, K) training items per class
        self.logit_mask = torch.where(counts > 0, 0.0, _NEG).to(X.dtype)  # (P, K) absent classes off
        self.reg = 1.0 / (C * self.n)  # (P,)
        if standardize:
            # z-scores do not depend on a column's offset or scale, so first bring every column to
            # [-1, 1] around its mean: then float32 moments are accurate even for columns living at
            # 1e-8 or 1e-32 (LayerNorm dimensions with a near-zero gain are real signal, not constants)
            shift = X.mean(1, keepdim=True)  # (L, 1, D)
            lo, hi = torch.aminmax(X, dim=1, keepdim=True)
            spread = torch.maximum(hi - shift, shift - lo)  # (L, 1, D) largest deviation from the mean
            inv_spread = 1.0 / torch.where(spread > 0, spread, torch.ones_like(spread))
            Xs = torch.addcmul(-shift * inv_spread, X, inv_spread)  # (X - shift) / spread, one pass
            self.X = Xs  # (L, N, D) the scaled copy replaces X from here on
            mu = torch.matmul(self.wn, Xs)  # (L, P, D)
            ex2 = torch.stack([self.wn @ Xs[layer].square() for layer in range(L)])  # (L, P, D)
            sigma = (ex2 - mu * mu).clamp_min(0.0).sqrt()
            # constant within a fold's training rows: scikit-learn's convention, scale 1
            self.sigma = torch.where(sigma > 1e-6, sigma, torch.ones_like(sigma))
            self.mu = mu
        else:
            self.X = X
            self.mu = torch.zeros(L, P, D, dtype=X.dtype, device=X.device)
            self.sigma = torch.ones(L, P, D, dtype=X.dtype, device=X.device)
        self.mu_over_sigma = self.mu / self.sigma  # (L, P, D)
        # curvature ~ corr / K from the data + 1 / (C n) from the penalty: the ridge is their ratio, so
        # directions the features do not span (rank-deficient hidden states) are not over-amplified
        ridge = min(max(n_classes / (C * float(self.n.min())), _PRECOND_RIDGE), 1.0)
        self.inv = self._preconditioner(ridge) if precondition else None  # (L, D, D)

    def _preconditioner(self, ridge: float) -> torch.Tensor:
        """Inverse of each layer's feature correlation plus a ridge: the curvature's shape.

        The multinomial Hessian is about ``corr(z) (x) (diag p - p p^T) + ridge``; anisotropic hidden
        states make ``corr(z)`` badly conditioned, and L-BFGS then crawls along its small directions.
        Starting each two-loop recursion from ``corr(z)^-1`` instead of the identity takes the shape away
        (a sample of rows suffices: it only has to be roughly right).
        """
        L, N, D = self.X.shape
        rows = torch.linspace(0, N - 1, min(N, _PRECOND_ROWS), device=self.X.device).long()
        Z = self.X[:, rows]  # (L, R, D)
        Z = (Z - Z.mean(1, keepdim=True)) / Z.std(1, keepdim=True).clamp_min(1e-6)
        corr = torch.bmm(Z.transpose(1, 2), Z) / len(rows)  # (L, D, D)
        corr.diagonal(dim1=1, dim2=2).add_(ridge)
        chol, info = torch.linalg.cholesky_ex(corr)
        inv = torch.cholesky_inverse(chol)
        eye = torch.eye(D, dtype=self.X.dtype, device=self.X.device).expand(L, D, D)
        return torch.where((info != 0)[:, None, None], eye, inv)  # identity where numerically singular

    def precondition(self, q: torch.Tensor) -> torch.Tensor:
        """Apply ``corr^-1`` to the weight part of (L, P, K, D + 1) directions (the bias is left alone)."""
        if self.inv is None:
            return q
        L, P, K, D1 = q.shape
        w = q[..., : D1 - 1].reshape(L, P * K, D1 - 1)
        w = torch.bmm(w, self.inv).view(L, P, K, D1 - 1)  # corr^-1 is symmetric
        return torch.cat([w, q[..., D1 - 1 :]], dim=-1)

    # A *group* is (ls, ps): a slice of layers (a view of X, no copy) and the problems to evaluate in
    # them (a slice or an index tensor). Group tensors are (l, p, K, N) logits, (l, p, K, D + 1) params.

    def linear(self, ls: slice, ps, theta: torch.Tensor) -> torch.Tensor:
        """Logits (l, p, K, N) of ``theta`` (l, p, K, D + 1), without the absent-class mask."""
        D, N = self.D, self.N
        nl, p = theta.shape[:2]
        W = theta[..., :D]  # (l, p, K, D)
        V = W / self.sigma[ls][:, ps][:, :, None, :]  # weights on the (scaled) features
        c = theta[..., D] - (W * self.mu_over_sigma[ls][:, ps][:, :, None, :]).sum(-1)  # (l, p, K)
        z = torch.matmul(V.reshape(nl, p * self.K, D), self.X[ls].transpose(1, 2)).view(nl, p, self.K, N)
        return z.add_(c[..., None])

    def logits(self, ls: slice, ps, theta: torch.Tensor) -> torch.Tensor:
        """Logits (l, p, K, N) with absent classes masked off."""
        return self.linear(ls, ps, theta).add_(self.logit_mask[ps][..., None])

    def loss(self, ps, z: torch.Tensor, W: torch.Tensor):
        """Loss (l, p) at logits ``z`` (l, p, K, N) and weights ``W`` (l, p, K, D); also softmax pieces."""
        yidx = self.yidx[ps].expand(z.shape[0], -1, -1, -1)  # (l, p, 1, N)
        zy = z.gather(2, yidx).squeeze(2)  # (l, p, N) logit of the true class
        m = z.amax(2, keepdim=True)  # (l, p, 1, N)
        e = (z - m).exp_()  # (l, p, K, N)
        s = e.sum(2)  # (l, p, N)
        nll = s.log().add_(m.squeeze(2)).sub_(zy)  # (l, p, N) logsumexp - true logit
        f = (nll * self.wn[ps]).sum(-1) + 0.5 * self.reg[ps] * W.square().sum((2, 3))
        return f, e, s

    def grad(self, ls: slice, ps, e: torch.Tensor, s: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Gradient (l, p, K, D + 1) from the softmax pieces of :meth:`loss` (``e`` is consumed)."""
        nl, p = e.shape[:2]
        wn = self.wn[ps]  # (p, N)
        R = e.mul_((wn / s)[:, :, None, :])  # (l, p, K, N) softmax * item weight
        yidx = self.yidx[ps].expand(nl, -1, -1, -1)
        R.scatter_add_(2, yidx, (-wn)[None, :, None, :].expand(nl, -1, -1, -1))  # minus the one-hot
        G = torch.matmul(R.view(nl, p * self.K, self.N), self.X[ls]).view(nl, p, self.K, self.D)  # R X
        db = R.sum(-1)  # (l, p, K)
        dW = (G - db[..., None] * self.mu[ls][:, ps][:, :, None, :]) / self.sigma[ls][:, ps][:, :, None, :]
        dW += self.reg[ps][:, None, None] * W
        return torch.cat([dW, db[..., None]], dim=-1)


def _groups(active: torch.Tensor) -> list:
    """Split the active (L, P) slices into groups: runs of layers with every problem active share one
    batched matmul over a view of X; a partly active layer is a group of its own with its live problems."""
    L, P = active.shape
    counts = active.sum(1).tolist()
    groups, start = [], None
    for layer in range(L + 1):
        full = layer < L and counts[layer] == P
        if full and start is None:
            start = layer
        if not full and start is not None:
            groups.append((slice(start, layer), slice(None)))
            start = None
        if layer < L and 0 < counts[layer] < P:
            groups.append((slice(layer, layer + 1), active[layer].nonzero().squeeze(1)))
    return groups


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
        prob = _Problems(X, y, train, n_classes, C, standardize, precondition)
        return _lbfgs(prob, max_iter, tol, history, max_linesearch)


def _lbfgs(prob: _Problems, max_iter: int, tol: float, history: int, max_linesearch: int) -> BatchedFit:
    """The batched L-BFGS behind :func:`fit_logistic`."""
    L, P, K, D, N = prob.L, prob.P, prob.K, prob.D, prob.N
    dev, dt = prob.X.device, prob.X.dtype
    theta = torch.zeros(L, P, K, D + 1, dtype=dt, device=dev)
    Z = prob.logit_mask[None, :, :, None].expand(L, P, K, N).clone()  # (L, P, K, N) logits at theta
    f, e, s = prob.loss(slice(None), Z, theta[..., :D])  # (L, P)
    g = prob.grad(slice(None), slice(None), e, s, theta[..., :D])
    gmax = g.abs().flatten(2).amax(-1)  # (L, P)
    active = gmax > tol
    S: list[torch.Tensor] = []
    Yh: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = torch.ones(L, P, dtype=dt, device=dev)
    iters = torch.zeros(L, P, dtype=torch.long, device=dev)
    best = gmax.clone()  # smallest gradient seen, and iterations since it last improved by 1%
    flat = torch.zeros(L, P, dtype=torch.long, device=dev)
    eps = 8 * torch.finfo(dt).eps  # relative noise of a loss summed in this precision
    n_iter = 0
    for it in range(max_iter):
        if not bool(active.any()):
            break
        n_iter = it + 1
        iters += active
        # two-loop recursion, every slice at once
        q = g.clone()
        alphas = []
        for s_i, y_i, r_i in zip(reversed(S), reversed(Yh), reversed(rho), strict=True):
            a = r_i * _dot(s_i, q)  # (L, P)
            q -= a[..., None, None] * y_i
            alphas.append(a)
        r = gamma[..., None, None] * prob.precondition(q)
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
        # a cold first step is scaled like torch's LBFGS: the history has no curvature yet
        t0 = torch.clamp(1.0 / g.abs().flatten(2).sum(-1), max=1.0) if it == 0 else torch.ones_like(f)
        # Near the optimum the loss changes less than its own rounding noise, and a strict Armijo test
        # would reject the very step that reaches tol: the test is relaxed by that noise (the idea of
        # Hager & Zhang's approximate Wolfe conditions).
        bound = f + eps * f.abs()  # (L, P) plus c1 * t * gd below
        step = torch.zeros_like(f)
        f_new, g_new = f.clone(), g.clone()
        refresh = (it + 1) % _REFRESH == 0
        for ls, ps in _groups(active):
            dg = d[ls][:, ps]  # (l, p, K, D + 1)
            zd = prob.linear(ls, ps, dg)  # logits move by t * zd along dg: one matmul for every trial
            z0, w0 = Z[ls][:, ps], theta[ls][:, ps][..., :D]
            t = t0[ls][:, ps]  # (l, p)
            ok_t = torch.zeros_like(t)
            done = torch.zeros_like(t, dtype=torch.bool)
            trials = 0
            for _ in range(max_linesearch + 1):  # backtracking (Armijo)
                trials += 1
                zt = z0 + t[..., None, None] * zd
                ft, e, s = prob.loss(ps, zt, w0 + t[..., None, None] * dg[..., :D])
                ok = ~done & (ft <= bound[ls][:, ps] + _C1 * t * gd[ls][:, ps])
                ok_t = torch.where(ok, t, ok_t)
                done = done | ok
                if bool(done.all()):
                    break
                t = torch.where(done, t, 0.5 * t)
            theta_g = theta[ls][:, ps] + ok_t[..., None, None] * dg
            if refresh:  # running logits drift by rounding: recompute them exactly now and then
                z1 = prob.logits(ls, ps, theta_g)
                f1, e, s = prob.loss(ps, z1, theta_g[..., :D])
            elif trials == 1:  # every slice took the first step: its softmax is the one we need
                z1, f1 = zt, ft
            else:
                z1 = z0 + ok_t[..., None, None] * zd
                f1, e, s = prob.loss(ps, z1, theta_g[..., :D])
            g_new[ls][:, ps] = prob.grad(ls, ps, e, s, theta_g[..., :D])
            f_new[ls][:, ps] = f1
            step[ls][:, ps] = ok_t
            Z[ls][:, ps] = z1
        stalled = active & (step == 0)  # no decrease even at a tiny step: float precision reached
        s_vec = step[..., None, None] * d
        yv = g_new - g
        ys = _dot(s_vec, yv)
        good = ys > 1e-10
        S.append(s_vec * good[..., None, None])
        Yh.append(yv * good[..., None, None])
        rho.append(torch.where(good, 1.0 / ys.clamp_min(1e-10), torch.zeros_like(ys)))
        gamma = torch.where(good, ys / _dot(yv, prob.precondition(yv)).clamp_min(1e-30), gamma)
        if len(S) > history:
            S.pop(0), Yh.pop(0), rho.pop(0)
        theta = theta + s_vec
        f, g = f_new, g_new
        gmax = torch.where(active, g.abs().flatten(2).amax(-1), gmax)
        improved = gmax < 0.99 * best
        best = torch.minimum(best, gmax)
        flat = torch.where(improved, torch.zeros_like(flat), flat + 1)
        stalled = stalled | (flat >= _PATIENCE)  # the gradient stopped shrinking: float precision reached
        active = active & (gmax > tol) & ~stalled
    pred = prob.logits(slice(None), slice(None), theta).argmax(2)  # (L, P, N)
    return BatchedFit(
        pred=pred,
        n_iter=n_iter,
        iters=iters,
        converged=gmax <= tol,
        grad_max=gmax,
        weight=theta[..., :D],
        bias=theta[..., D],
    )
