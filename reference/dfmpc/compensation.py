"""Data-free compensation: BatchNorm record, scale absorption, the objective and its closed form.

Notation (paper Sec. 4; W is OIHW, one output channel j of layer l is a filter W_j):

    Xhat_j = gammahat_j / sigmahat_j * What_j        X_j = gamma_j / sigma_j * W_j
    yhat_j = betahat_j - gammahat_j muhat_j / sigmahat_j
    y_j    = beta_j    - gamma_j    mu_j    / sigma_j

    Gamma_j = c_j Xhat_j - X_j                        Eq. (20)
    Theta_j = c_j yhat_j - y_j                        Eq. (21)
    L_j(c_j) = ||Gamma_j||^2 + lambda1 Theta_j^2 + lambda2 c_j^2          Eq. (22)

    c_j = (<Xhat_j, X_j> + lambda1 yhat_j y_j) / (||Xhat_j||^2 + lambda1 yhat_j^2 + lambda2)   Eq. (27)

c_j scales input channel j of layer l+1 (Eq. (7)); because ReLU is positively
homogeneous it can equally be folded into gamma_j, beta_j of BN^l (Sec. 4.3).
Derivations: ``data_free_derivations/05_objective.md`` .. ``08_folding.md``.

Dtypes: everything here computes in float64 and returns float64; array input of any real dtype
(integer, bool, float16, float32) is converted to float64 first. W and W_hat are OIHW conv weights
(4-D): the pairs DF-MPC compensates are conv -> BN -> ReLU -> conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import as_float_array, check_scalar

__all__ = [
    "BatchNorm",
    "absorb_scale",
    "data_free_loss",
    "quadratic_coefficients",
    "compensation_coefficients",
    "closed_form",
    "fold_into_bn",
    "scale_input_channels",
]


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """Inference-mode BatchNorm: ``BN(x)_j = gamma_j (x_j - mean_j) / sigma_j + beta_j``.

    ``sigma_j = sqrt(var_j + eps)``. The arrays are validated and stored as float64 (whatever
    their real dtype); the record is immutable, every operation returns a new one.

    Parameters
    ----------
    gamma, beta, mean, var : array_like, shape (C,)
        Scale, shift, running mean and running variance. ``var >= 0``.
    eps : float, default 1e-5
        ``eps >= 0`` with ``var + eps > 0`` for every channel.

    Raises
    ------
    ValueError
        Mismatched lengths, non-1-D or empty arrays, NaN/Inf, negative variance or eps,
        or a channel with ``var + eps == 0``.
    """

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 1e-5

    def __post_init__(self):
        arrays = {name: as_float_array(getattr(self, name), name, ndim=1).astype(np.float64, copy=False)
                  for name in ("gamma", "beta", "mean", "var")}
        C = arrays["gamma"].shape[0]
        for name, a in arrays.items():
            if a.shape != (C,):
                raise ValueError(f"{name}: expected shape ({C},) like gamma, got {a.shape}")
            object.__setattr__(self, name, a)
        eps = check_scalar(self.eps, "eps", min_value=0.0)
        object.__setattr__(self, "eps", eps)
        if np.any(self.var < 0):
            raise ValueError(f"var: expected running variances >= 0, got min {self.var.min():.3g}")
        if np.any(self.var + eps <= 0):
            raise ValueError("var: var + eps must be > 0 for every channel (sigma would be 0)")

    @property
    def sigma(self) -> np.ndarray:
        """``sqrt(var + eps)``, shape (C,)."""
        return np.sqrt(self.var + self.eps)

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])

    def __call__(self, x):
        """Apply BN to ``x`` of shape (N, C, ...) (channel axis 1)."""
        x = np.asarray(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (self.gamma.reshape(shape) * (x - self.mean.reshape(shape)) / self.sigma.reshape(shape)
                + self.beta.reshape(shape))

    def affine(self):
        """The per-channel affine form ``BN(x) = a x + b``: ``a = gamma/sigma``, ``b = beta - gamma mu/sigma``."""
        a = self.gamma / self.sigma
        return a, self.beta - a * self.mean

    def replace(self, **changes) -> "BatchNorm":
        """A new record with some fields replaced (validated again)."""
        fields = dict(gamma=self.gamma, beta=self.beta, mean=self.mean, var=self.var, eps=self.eps)
        fields.update(changes)
        return BatchNorm(**fields)


def _check_bn(bn, name):
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"{name}: expected a dfmpc.BatchNorm, got {type(bn).__name__}")
    return bn


def _check_c(c, C, name="c"):
    c = as_float_array(c, name, ndim=1).astype(np.float64, copy=False)
    if c.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},), one coefficient per channel, got {c.shape}")
    if np.any(c < 0):
        raise ValueError(f"{name}: expected c >= 0 (ReLU is positively homogeneous only for c >= 0), "
                         f"got min {c.min():.3g}")
    return c


def absorb_scale(bn, s):
    """BN for the integer-grid weights: ``muhat = mu / s``, ``sigmahat = sigma / s``.

    If a layer's quantized weights are ``W_q = s * What`` then ``Xhat = X_q / s`` and
    ``BN(X_q) = gamma (Xhat - mu/s) / (sigma/s) + beta``: the dropped factor s is
    absorbed by dividing BN's mean and standard deviation by s (gamma, beta unchanged).

    To keep ``sigmahat = sqrt(varhat + epshat) = sigma / s`` exact with a valid
    (non-negative) variance, ``epshat = eps / max(s)^2`` and
    ``varhat = (var + eps) / s^2 - epshat``; for a scalar s this is simply
    ``varhat = var / s^2``, ``epshat = eps / s^2``.

    Parameters
    ----------
    bn : BatchNorm with C channels
        The BN that follows the full-precision layer.
    s : float > 0 or array_like, shape (C,), all > 0
        The dropped quantizer factor (TWN alpha, DoReFa max|W|, or a per-channel scale).

    Returns
    -------
    BatchNorm
        ``bn_hat`` with ``BN_hat(X_q / s) == BN(X_q)`` for every input.

    Raises
    ------
    ValueError
        If s is not finite and > 0, or its length differs from the BN's channel count.

    Examples
    --------
    >>> bn = BatchNorm(gamma=[1.5, -0.5], beta=[0.1, 0.2], mean=[0.3, -1.0], var=[2.0, 0.5])
    >>> X_q = np.array([[[0.7]], [[-0.2]]])[None]          # (N=1, C=2, 1, 1)
    >>> bn_hat = absorb_scale(bn, 0.25)
    >>> bool(np.allclose(bn_hat(X_q / 0.25), bn(X_q)))
    True
    """
    bn = _check_bn(bn, "bn")
    s = as_float_array(s, "s", ndim=(0, 1)).astype(np.float64, copy=False)
    if s.ndim == 1 and s.shape != (bn.channels,):
        raise ValueError(f"s: expected a scalar or shape ({bn.channels},), got {s.shape}")
    if np.any(s <= 0):
        raise ValueError(f"s: expected a quantizer scale > 0, got min {s.min():.3g} "
                         "(an all-zero layer has scale 0 and nothing to absorb)")
    eps_hat = bn.eps / float(s.max()) ** 2
    var_hat = np.maximum((bn.var + bn.eps) / s**2 - eps_hat, 0.0)
    return BatchNorm(gamma=bn.gamma, beta=bn.beta, mean=bn.mean / s, var=np.broadcast_to(var_hat, bn.var.shape).copy(),
                     eps=eps_hat)


def _per_channel_terms(W, W_hat, bn, bn_hat):
    """Xhat, X (shape (O, n)) and yhat, y (shape (O,)) in float64."""
    W = as_float_array(W, "W", ndim=4, layout="OIHW conv weights (4-D) of layer l").astype(np.float64, copy=False)
    W_hat = as_float_array(W_hat, "W_hat", ndim=4,
                           layout="OIHW conv weights (4-D), the quantized layer l").astype(np.float64, copy=False)
    bn, bn_hat = _check_bn(bn, "bn"), _check_bn(bn_hat, "bn_hat")
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat: expected the shape of W {W.shape}, got {W_hat.shape}")
    O = W.shape[0]
    for name, b in (("bn", bn), ("bn_hat", bn_hat)):
        if b.channels != O:
            raise ValueError(f"{name}: expected {O} channels (W has {O} output channels), got {b.channels}")
    a, y = bn.affine()
    a_hat, y_hat = bn_hat.affine()
    X = a[:, None] * W.reshape(O, -1)
    X_hat = a_hat[:, None] * W_hat.reshape(O, -1)
    return X_hat, X, y_hat, y


def _lambdas(lambda1, lambda2):
    return check_scalar(lambda1, "lambda1", min_value=0.0), check_scalar(lambda2, "lambda2", min_value=0.0)


def data_free_loss(c, W, W_hat, bn, bn_hat, lambda1=0.5, lambda2=0.0):
    """Per-channel data-free objective ``L_j = ||Gamma_j||^2 + lambda1 Theta_j^2 + lambda2 c_j^2``.

    Paper Eq. (20)-(22). Vectorised over the output channels j of layer l.

    Parameters
    ----------
    c : array_like, shape (O,)
        Compensation coefficients (any real values are evaluated; only c >= 0 is meaningful).
    W : array_like, shape (O, I, kh, kw)
        Full-precision weights of layer l (OIHW; any real dtype, computed in float64).
    W_hat : array_like, same shape as W
        Quantized weights of layer l, in the form that matches ``bn_hat`` (grid weights with
        an ``absorb_scale``d BN, or dequantized weights with the original BN).
    bn, bn_hat : BatchNorm with O channels
        BN^l of the full-precision and of the quantized layer.
    lambda1, lambda2 : float >= 0
        Weight of the bias term Theta and of the ridge term on c (paper defaults 0.5, 0).

    Returns
    -------
    ndarray, shape (O,), float64
        ``L_j(c_j)`` for every channel.

    Examples
    --------
    With ``W_hat = W`` and the same BN, c = 1 reproduces the layer exactly: zero loss.

    >>> W = np.arange(8.0).reshape(2, 4, 1, 1)
    >>> bn = BatchNorm(gamma=[1.0, 2.0], beta=[0.5, 0.0], mean=[0.0, 1.0], var=[1.0, 4.0])
    >>> data_free_loss(np.ones(2), W, W, bn, bn)
    array([0., 0.])
    >>> float(data_free_loss(np.array([2.0, 1.0]), W, W, bn, bn, lambda1=0.0)[0]) == float(np.sum((W[0] / bn.sigma[0]) ** 2))
    True
    """
    X_hat, X, y_hat, y = _per_channel_terms(W, W_hat, bn, bn_hat)
    lambda1, lambda2 = _lambdas(lambda1, lambda2)
    c = as_float_array(c, "c", ndim=1).astype(np.float64, copy=False)
    if c.shape != (X.shape[0],):
        raise ValueError(f"c: expected shape ({X.shape[0]},), got {c.shape}")
    Gamma = c[:, None] * X_hat - X                          # Eq. (20)
    Theta = c * y_hat - y                                   # Eq. (21)
    return np.sum(Gamma**2, axis=1) + lambda1 * Theta**2 + lambda2 * c**2   # Eq. (22)


def quadratic_coefficients(W, W_hat, bn, bn_hat, lambda1=0.5, lambda2=0.0):
    """Eq. (22) expanded per channel: ``L_j(c_j) = den_j c_j^2 - 2 num_j c_j + const_j`` (Eq. (25)-(26)).

    ``num_j = <Xhat_j, X_j> + lambda1 yhat_j y_j``, ``den_j = ||Xhat_j||^2 + lambda1 yhat_j^2 + lambda2``,
    ``const_j = ||X_j||^2 + lambda1 y_j^2`` (derivation 06). Evaluating ``L_j`` this way costs one pass
    over the weights for any number of c vectors; :func:`data_free_loss` is the literal form.

    Parameters
    ----------
    W, W_hat : array_like, shape (O, I, kh, kw)
        OIHW weights, any real dtype (computed in float64).
    bn, bn_hat : BatchNorm with O channels
    lambda1, lambda2 : float >= 0

    Returns
    -------
    den, num, const : ndarray, shape (O,), float64

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> W, W_hat = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=(3, 2, 3, 3))
    >>> bn = BatchNorm(gamma=[1.0, 0.5, 2.0], beta=[0.1, 0.0, -0.3], mean=[0.0, 1.0, 0.2], var=[1.0, 2.0, 0.5])
    >>> den, num, const = quadratic_coefficients(W, W_hat, bn, bn)
    >>> c = np.array([0.3, 1.0, 2.5])
    >>> bool(np.allclose(den * c**2 - 2 * num * c + const, data_free_loss(c, W, W_hat, bn, bn)))
    True
    """
    X_hat, X, y_hat, y = _per_channel_terms(W, W_hat, bn, bn_hat)
    lambda1, lambda2 = _lambdas(lambda1, lambda2)
    num = np.einsum("jn,jn->j", X_hat, X) + lambda1 * y_hat * y              # Eq. (27), numerator
    den = np.einsum("jn,jn->j", X_hat, X_hat) + lambda1 * y_hat**2 + lambda2  # Eq. (27), denominator; (25)
    const = np.einsum("jn,jn->j", X, X) + lambda1 * y**2
    return den, num, const


def compensation_coefficients(W, W_hat, bn, bn_hat, lambda1=0.5, lambda2=0.0):
    """Closed-form minimiser of Eq. (22) over ``c_j >= 0``: ``c_j = max(0, num_j / den_j)``.

    ``num_j = <Xhat_j, X_j> + lambda1 yhat_j y_j`` and
    ``den_j = ||Xhat_j||^2 + lambda1 yhat_j^2 + lambda2`` (paper Eq. (26)-(27)).

    L_j is a convex quadratic in c_j with curvature ``den_j >= 0`` (Eq. (25)), so:

    * ``den_j > 0``: the unconstrained minimiser is ``num_j / den_j``; on ``c_j >= 0`` the
      minimiser of a 1-D convex quadratic is its projection, ``max(0, num_j / den_j)``
      (our addition: the paper does not state the constraint's effect; c >= 0 is needed by
      Lemma 2 and by folding into BN).
    * ``den_j == 0`` (quantized filter all zero, and ``lambda1 yhat_j^2 + lambda2 == 0``):
      L_j does not depend on c_j; we return ``c_j = 1``, i.e. leave the channel as the
      quantizer made it (our rule; ``data_free_derivations/09_our_additions.md``).

    Parameters
    ----------
    W, W_hat : array_like, shape (O, I, kh, kw)
        Full-precision and quantized OIHW weights of layer l (W_hat in the form matching bn_hat);
        any real dtype, computed in float64. A 2-D W is refused (the pairs are conv -> BN -> ReLU -> conv).
    bn, bn_hat : BatchNorm with O channels
    lambda1, lambda2 : float >= 0

    Returns
    -------
    c : ndarray, shape (O,), float64, all >= 0
        ``argmin_{c >= 0} sum_j L_j(c_j)``.

    Raises
    ------
    ValueError
        W or W_hat not 4-D (OIHW), NaN/Inf, empty or mismatched shapes, channel count of a BN
        differing from W's output channels, negative lambdas.

    References
    ----------
    J. Chen et al., Pattern Recognition 143 (2023) 109780, Eq. (20)-(27).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(4, 3, 3, 3))
    >>> bn = BatchNorm(gamma=rng.uniform(0.5, 1.5, 4), beta=rng.normal(size=4),
    ...                mean=rng.normal(size=4), var=rng.uniform(0.5, 2, 4))
    >>> from dfmpc.quantizers import ternary
    >>> W_hat, alpha, _ = ternary(W)
    >>> bn_hat = absorb_scale(bn, alpha)
    >>> c = compensation_coefficients(W, W_hat, bn, bn_hat)
    >>> L = lambda c: data_free_loss(c, W, W_hat, bn, bn_hat)
    >>> bool(np.all(L(c) <= L(c * 1.01)) and np.all(L(c) <= L(c * 0.99)))   # stationary
    True
    """
    den, num, _ = quadratic_coefficients(W, W_hat, bn, bn_hat, lambda1, lambda2)   # Eq. (26)
    return closed_form(den, num)                                                    # Eq. (27), c >= 0


def closed_form(den, num):
    """Minimiser of ``den_j c_j^2 - 2 num_j c_j`` over ``c_j >= 0``: ``c_j = max(0, num_j / den_j)`` (Eq. (27)).

    The second step of :func:`compensation_coefficients`, for callers that already hold the
    coefficients of :func:`quadratic_coefficients`. ``den_j = 0`` (L_j flat in c_j) gives ``c_j = 1``.

    Parameters
    ----------
    den, num : array_like, shape (O,)
        Curvature (>= 0) and linear coefficient of each channel's quadratic.

    Returns
    -------
    c : ndarray, shape (O,), float64, all >= 0

    Raises
    ------
    ValueError
        NaN/Inf, shapes that differ, a negative ``den``.

    Examples
    --------
    >>> closed_form(np.array([2.0, 1.0, 0.0]), np.array([1.0, -3.0, 5.0]))
    array([0.5, 0. , 1. ])
    """
    den = as_float_array(den, "den", ndim=1).astype(np.float64)
    num = as_float_array(num, "num", ndim=1).astype(np.float64)
    if num.shape != den.shape:
        raise ValueError(f"num: expected the shape of den {den.shape}, got {num.shape}")
    if np.any(den < 0):
        raise ValueError("den: expected non-negative curvatures (Eq. (25)), found a negative entry")
    flat = den == 0.0                                                    # L_j constant in c_j
    c = np.where(flat, 1.0, num / np.where(flat, 1.0, den))
    return np.maximum(c, 0.0)                                            # projection onto c >= 0


def fold_into_bn(bn, c):
    """Fold c into BN^l: ``gamma'_j = c_j gamma_j``, ``beta'_j = c_j beta_j``.

    For ``c_j >= 0``, ``ReLU(c_j BN(x)_j) = c_j ReLU(BN(x)_j)``, so this equals scaling
    input channel j of layer l+1 by c_j (:func:`scale_input_channels`), and layer l+1
    stays exactly on its k-bit grid (paper Sec. 4.3).

    Parameters
    ----------
    bn : BatchNorm with C channels
    c : array_like, shape (C,), all >= 0

    Returns
    -------
    BatchNorm
        A new record; mean, var and eps unchanged.

    Examples
    --------
    >>> bn = BatchNorm(gamma=[1.0, -2.0], beta=[0.5, 1.0], mean=[0.0, 0.0], var=[1.0, 1.0], eps=0.0)
    >>> x = np.array([[[[0.3]], [[-0.4]]]])                  # (N=1, C=2, 1, 1)
    >>> c = np.array([2.0, 0.5])
    >>> bool(np.allclose(np.maximum(fold_into_bn(bn, c)(x), 0), c[None, :, None, None] * np.maximum(bn(x), 0)))
    True
    """
    bn = _check_bn(bn, "bn")
    c = _check_c(c, bn.channels)
    return bn.replace(gamma=c * bn.gamma, beta=c * bn.beta)


def scale_input_channels(W_next, c, group: int = 1):
    """Scale input channel j of layer l+1 by c_j: ``W~_{:, j} = c_j W_{:, j}`` (paper Eq. (7)).

    Exact whatever the activation between the layers: convolving the activation ``A`` with ``W~``
    equals convolving ``c_j A_j`` with ``W`` (derivation 17, E.1), so this is how c is applied
    through a ReLU6 / Clip, where :func:`fold_into_bn` is not exact.

    Parameters
    ----------
    W_next : array_like, shape (O', C / group, kh, kw) or (O', C)
        Weights of layer l+1 (usually already quantized, ``kQ(W^{l+1})``), any real dtype.
    c : array_like, shape (C,), all >= 0
        One coefficient per channel of the tensor layer l+1 reads.
    group : int
        Conv groups of layer l+1 (``C`` / ``O'`` divisible by it): weight ``W[o, i]`` reads input channel
        ``(o // (O' / group)) * (C / group) + i``; for a depthwise conv (``group = C``) that is channel o.

    Returns
    -------
    ndarray, same shape as W_next, float64

    Raises
    ------
    ValueError
        Wrong shapes, ``c_j < 0``, or ``group`` not dividing O'.

    Examples
    --------
    >>> scale_input_channels(np.ones((1, 3)), np.array([0.0, 1.0, 2.5]))
    array([[0. , 1. , 2.5]])
    >>> scale_input_channels(np.ones((2, 1, 1, 1)), np.array([0.5, 3.0]), group=2).ravel()   # depthwise
    array([0.5, 3. ])
    """
    W_next = as_float_array(W_next, "W_next", ndim=(2, 4),
                            layout="OIHW conv (4-D) or (out, in) Gemm (2-D) weights").astype(np.float64, copy=False)
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 \
            or W_next.shape[0] % group or (group > 1 and W_next.ndim != 4):
        raise ValueError(f"group: expected a positive integer dividing the {W_next.shape[0]} output channels "
                         f"of a 4-D conv weight, got {group!r} for shape {W_next.shape}")
    O, Cg = W_next.shape[:2]
    c = _check_c(c, Cg * group)
    if group == 1:
        shape = (1, -1) + (1,) * (W_next.ndim - 2)
        return W_next * c.reshape(shape)                                     # Eq. (7)
    channel = (np.arange(O)[:, None] // (O // group)) * Cg + np.arange(Cg)[None, :]   # input channel of W[o, i]
    return W_next * c[channel][:, :, None, None]                             # Eq. (7), grouped
