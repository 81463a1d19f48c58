"""Transferability scores of a source model for a target task, from one forward pass over the target's training
split, and the rank correlations that say how well a score predicts fine-tuned accuracy.

All functions take numpy arrays (features N x D, source-head probabilities N x C_s, target labels N in
[0, C_t)) and compute in float64. Higher is better for every score.

- LogME (You et al. 2021): the maximum log evidence of a Bayesian linear model from features to each one-hot
  label column, per sample, averaged over classes. Through the eigendecomposition of F^T F (D x D), never an
  N x N matrix; valid for N < D.
- LEEP (Nguyen et al. 2020): the mean log-likelihood of the target labels under the "expected empirical
  predictor" sum_z P(y|z) theta_z(x), with P(y|z) estimated from the source head's soft predictions.
- NCE (Tran et al. 2019): -H(Y|Z) with Z the source head's argmax pseudo-labels.
- H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f|y])).
"""

import numpy as np

LOGME_MAX_ITER, LOGME_TOL, LOGME_EPS = 11, 0.01, 1e-5  # tllib / thuml LogME's settings


def _onehot(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    return np.eye(int(labels.max()) + 1)[labels]


def logme_fit(
    features: np.ndarray, labels: np.ndarray, max_iter: int = LOGME_MAX_ITER, tol: float = LOGME_TOL
) -> list[dict]:
    """Per target class c: the evidence maximisation of y_c = F w + noise, w ~ N(0, alpha^-1 I),
    noise ~ N(0, beta^-1 I), by the fixed-point updates alpha = gamma / |m|^2, beta = (N - gamma) / |y - F m|^2
    (MacKay), from alpha = beta = 1, stopping when alpha/beta changes by less than `tol` (relative).

    Returns per class {"alpha", "beta", "evidence"}: the log evidence log p(y_c | F, alpha, beta) at the final
    alpha, beta, divided by N. In the eigenbasis of F^T F = V diag(s) V^T with z = V^T F^T y:
    m = V z / (t + s) (t = alpha / beta), |m|^2 = sum z^2/(t+s)^2, |y - F m|^2 = |y|^2 - sum z^2 (2t+s)/(t+s)^2,
    log|alpha I + beta F^T F| = sum log(alpha + beta s) over all D eigenvalues (zeros included)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    y = _onehot(labels)
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0.0, None)
    z2 = (v.T @ (f.T @ y)) ** 2  # D x C
    z2[s <= 1e-12 * s.max()] = 0.0  # F^T y has no component in F's null space; drop the round-off there
    y2 = (y**2).sum(0)

    def terms(t: float, c: int):
        m2 = (z2[:, c] / (t + s) ** 2).sum()
        res2 = max(y2[c] - (z2[:, c] * (2 * t + s) / (t + s) ** 2).sum(), 0.0)
        return m2, res2

    out = []
    for c in range(y.shape[1]):
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = (s / (s + t)).sum()
            m2, res2 = terms(t, c)
            alpha, beta = gamma / (m2 + LOGME_EPS), (n - gamma) / (res2 + LOGME_EPS)
            if abs(alpha / beta - t) / t < tol:
                break
        m2, res2 = terms(alpha / beta, c)
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.log(alpha + beta * s).sum()
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        out.append({"alpha": float(alpha), "beta": float(beta), "evidence": float(evidence / n)})
    return out


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the mean over target classes of the maximised log evidence per sample."""
    return float(np.mean([c["evidence"] for c in logme_fit(features, labels)]))


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: (1/N) sum_i log sum_z P(y_i | z) theta_z(x_i), P(y, z) = (1/N) sum_{i: y_i = y} theta_z(x_i)."""
    theta = np.asarray(source_probs, dtype=np.float64)
    y = _onehot(labels)
    joint = y.T @ theta / len(theta)  # C_t x C_s
    p_z = joint.sum(0, keepdims=True)
    p_y_given_z = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)
    expected = (theta @ p_y_given_z.T)[np.arange(len(theta)), np.asarray(labels, dtype=np.int64)]
    return float(np.log(expected).mean())


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE: -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), from the empirical joint of pseudo-labels Z and labels Y."""
    z = np.asarray(source_labels, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0 / len(y))
    p_z = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log((joint / np.where(p_z > 0, p_z, 1))[nz])).sum())


def h_score(features: np.ndarray, labels: np.ndarray, rcond: float = 1e-10) -> float:
    """H-score: tr(cov(f)^+ cov(g)) with g_i = E[f | y_i] (the class mean). cov(g) = sum_c n_c mu_c mu_c^T / (N-1)
    for centred class means mu_c, so the trace is sum_c n_c mu_c^T cov(f)^+ mu_c / (N-1). The pseudo-inverse
    drops eigenvalues below `rcond` x the largest (dead ReLU units, N < D)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    f = f - f.mean(0)
    n = len(f)
    cov = f.T @ f / (n - 1)
    w, v = np.linalg.eigh(cov)
    keep = w > rcond * max(w.max(), 0.0)
    counts = np.bincount(y)
    means = (_onehot(y).T @ f)[counts > 0] / counts[counts > 0, None]  # C x D, centred class means
    proj = means @ v[:, keep]
    return float((counts[counts > 0] * (proj**2 / w[keep]).sum(1)).sum() / (n - 1))


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b (ties in either ranking handled): sum_{i<j} sgn(dx) sgn(dy) / sqrt(pairs untied in x x
    pairs untied in y). NaN when either side has no untied pair."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = np.sqrt((sx != 0).sum() * (sy != 0).sum())
    return float((sx * sy).sum() / denom) if denom > 0 else float("nan")


def pearson_r(x, y) -> float:
    """Pearson's r; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


SCORES = ("logme", "leep", "nce", "hscore")


def all_scores(features: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The four scores of one candidate from its features and source-head logits on the target's training split."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return {
        "logme": logme(features, labels),
        "leep": leep(probs, labels),
        "nce": nce(logits.argmax(1), labels),
        "hscore": h_score(features, labels),
    }
