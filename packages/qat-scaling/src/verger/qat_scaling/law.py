"""The QAT scaling law: tokens per parameter byte, the optimal QAT fraction, the loss law.

**Tokens per parameter byte.** S = D / (N B / 8): D tokens, N parameters quantized at B
bits (B = log2 3 for ternary). S_fp and S_qat use D_fp = (1 - f) D and D_qat = f D.

**Optimal QAT fraction.** f*(S) = exp(-a / ln S) (the paper fits a = 6.7297 on its runs;
:func:`fit_fraction_constant` refits ``a`` on yours).

**Loss law** (the paper's form as published in secondary sources, ``papers/DETAILS.md``)::

    L = E + A / N^alpha + B_D / D^beta                                  (Chinchilla, D = D_total)
        + theta 2^(-kappa B)                                            (irreducible QAT floor)
        + phi 2^(-chi B) / (N^psi S_qat^omega)                          (too little QAT)
        + lam 2^(-mu B) / (N^nu S_fp^xi S_qat^rho)                      (FP/QAT interaction)

Choices we had to make (the paper's fitted values and some details are not published):

- The Chinchilla D is the total token count D_fp + D_qat; N counts the quantized
  parameters (the linear layers of the blocks), not the embedding.
- Full-precision runs (``bits=None``) are fitted with the Chinchilla part alone: this is
  how we read the paper's "FP-loss regularizer" (their Appendix E).
- The penalty terms are defined for 0 < f < 1 (S_qat = 0 or S_fp = 0 makes them infinite):
  QAT records with f = 1 (QAT from scratch) are not fitted (they are counted in
  ``FittedLaw.skipped``), and the planner searches f in (0, 1).
- Fit: Huber loss (delta 1e-3, as Chinchilla) on log L_pred - log L, coefficients as
  logarithms, exponents bounded (``BOUNDS``), L-BFGS-B from the best of many random
  starts (screened by their objective); the best fit is kept. Parameters the records cannot identify are held at 0 (coefficient
  terms dropped): one model size -> A, alpha, psi, nu; one token budget -> B_D, beta
  (unless the FP runs alone span several); one bit width -> kappa, chi, mu. Two budgets
  leave E, B_D and beta free but not identified (three constants, two budgets): beta then
  runs to its bound and the law extrapolates badly in D; fit three budgets or more.
- The law's f* (and so the planner) is searched within the QAT fractions the fit saw
  (``FittedLaw.f_range``): outside them the penalty terms are extrapolations.
- Uncertainty: bootstrap over records (refits from the best parameters), percentile
  intervals; leave-one-out refits give the out-of-sample error.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from threadpoolctl import threadpool_limits

from verger.core.files import atomic_write_json
from verger.core.validation import finite_number, integer
from verger.qat_scaling.records import RunPoint, parse_records

PAPER_FRACTION_CONSTANT = 6.7297
LAW_FORMAT = 1
LN2 = math.log(2.0)
HUBER_DELTA = 1e-3
NAMES = (
    "log_E", "log_A", "alpha", "log_B", "beta",
    "log_theta", "kappa", "log_phi", "chi", "psi", "omega",
    "log_lam", "mu", "nu", "xi", "rho",
)  # fmt: skip
BOUNDS: dict[str, tuple[float, float]] = {
    "log_E": (-10.0, 5.0), "log_A": (-15.0, 25.0), "alpha": (0.0, 2.0),
    "log_B": (-15.0, 25.0), "beta": (0.0, 2.0),
    "log_theta": (-15.0, 5.0), "kappa": (-1.0, 3.0),
    "log_phi": (-15.0, 15.0), "chi": (-1.0, 3.0), "psi": (-2.0, 2.0), "omega": (0.0, 3.0),
    "log_lam": (-15.0, 15.0), "mu": (-1.0, 3.0), "nu": (-2.0, 2.0), "xi": (0.0, 3.0), "rho": (-1.0, 3.0),
}  # fmt: skip
_DROPPED = -1e4  # the log-coefficient of a dropped term (exp underflows to 0)
_COEF_BOUNDS = (-30.0, 5.0)  # a term's log value at the data's centre (the optimizer's view)


def tokens_per_parameter_byte(tokens: float, n_params: float, bits: float) -> float:
    """S = D / (N B / 8)."""
    d = finite_number("tokens", tokens, above=0.0)
    n = finite_number("n_params", n_params, above=0.0)
    b = finite_number("bits", bits, above=0.0)
    return d / (n * b / 8.0)


def optimal_fraction(s_total: float, a: float = PAPER_FRACTION_CONSTANT) -> float:
    """f*(S) = exp(-a / ln S), defined for S > 1 tokens per parameter byte."""
    s = finite_number("s_total", s_total, above=1.0)
    return math.exp(-finite_number("a", a, above=0.0) / math.log(s))


def fit_fraction_constant(s_values: Sequence[float], fractions: Sequence[float]) -> float:
    """Least-squares ``a`` of f*(S) = exp(-a / ln S) for measured optimal fractions."""
    s = np.asarray(s_values, dtype=float)
    f = np.asarray(fractions, dtype=float)
    if s.size == 0 or s.shape != f.shape:
        raise ValueError("s_values and fractions must be non-empty and of equal length")
    if not np.all(np.isfinite(s)) or np.any(s <= 1.0):
        raise ValueError("every S must be a finite number > 1")
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f > 1):
        raise ValueError("every fraction must be in [0, 1]")
    logs = np.log(s)
    res = minimize_scalar(
        lambda a: float(np.sum((np.exp(-a / logs) - f) ** 2)), bounds=(0.0, 100.0), method="bounded"
    )
    return float(res.x)


# ---------------------------------------------------------------------- the law
@dataclass(frozen=True)
class LawParams:
    """The 16 parameters (coefficients stored as natural logarithms)."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(NAMES):
            raise ValueError(f"LawParams needs {len(NAMES)} values, got {len(self.values)}")

    def as_dict(self) -> dict[str, float]:
        """Readable parameters: E, A, B_D, theta, phi, lam and the exponents."""
        v = dict(zip(NAMES, self.values))
        out = {}
        for name, value in v.items():
            if name.startswith("log_"):
                key = "B_D" if name == "log_B" else name[4:]
                out[key] = math.exp(value) if value > _DROPPED / 2 else 0.0
            else:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> LawParams:
        """From readable values (``E``, ``A``, ``alpha``, ``B_D``, ...); 0 drops a term."""
        out = []
        for name in NAMES:
            if name.startswith("log_"):
                key = "B_D" if name == "log_B" else name[4:]
                c = float(values[key])
                out.append(math.log(c) if c > 0 else _DROPPED)
            else:
                out.append(float(values[name]))
        return cls(tuple(out))


# Each term of the law is linear in the parameters once in log space: log term_k = F_k . theta
# with per-point features F_k. ``_TERMS`` lists, per term, (parameter, feature) pairs; the
# feature of a log-coefficient is 1 and an exponent's is minus its variable.
_TERMS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("log_E", "one"),),
    (("log_A", "one"), ("alpha", "log_n")),
    (("log_B", "one"), ("beta", "log_d")),
    (("log_theta", "one"), ("kappa", "bits_ln2")),
    (("log_phi", "one"), ("chi", "bits_ln2"), ("psi", "log_n"), ("omega", "log_s_qat")),
    (("log_lam", "one"), ("mu", "bits_ln2"), ("nu", "log_n"), ("xi", "log_s_fp"), ("rho", "log_s_qat")),
)  # fmt: skip
_QAT_TERMS = (3, 4, 5)
_INDEX = {name: i for i, name in enumerate(NAMES)}


def _variables(n: Any, d: Any, f: Any, b: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-point variables of the law and the QAT mask (B = 0 or NaN marks an FP point)."""
    n, d, f, b = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (n, d, f, b)))
    qat = np.isfinite(b) & (b > 0)
    safe_b = np.where(qat, b, 1.0)
    byte = n * safe_b / 8.0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s_qat = np.where(qat, np.log(d * f / byte), 0.0)
        log_s_fp = np.where(qat, np.log(d * (1.0 - f) / byte), 0.0)
    v = {
        "one": np.ones_like(n),
        "log_n": np.log(n),
        "log_d": np.log(d),
        "bits_ln2": np.where(qat, b, 0.0) * LN2,
        "log_s_qat": log_s_qat,
        "log_s_fp": log_s_fp,
    }
    return v, qat


def _design(v: dict[str, np.ndarray], qat: np.ndarray, centre: dict[str, float]) -> np.ndarray:
    """``F`` [terms, points, params]: log term_k = F[k] @ theta (with centred variables)."""
    points = v["one"].shape[0] if v["one"].ndim else 1
    out = np.zeros((len(_TERMS), points, len(NAMES)))
    for k, term in enumerate(_TERMS):
        for name, var in term:
            x = np.ravel(v[var]) - (0.0 if var == "one" else centre.get(var, 0.0))
            out[k, :, _INDEX[name]] = x if var == "one" else -x
    return out


def _log_terms(theta: np.ndarray, design: np.ndarray, qat: np.ndarray) -> np.ndarray:
    t = design @ theta  # [terms, points]
    t[list(_QAT_TERMS)] = np.where(np.ravel(qat)[None, :], t[list(_QAT_TERMS)], -np.inf)
    return t


def _logsumexp(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log sum exp over terms, and the softmax weights of the terms (for gradients)."""
    top = t.max(axis=0)
    e = np.exp(t - top)
    total = e.sum(axis=0)
    return top + np.log(total), e / total


def predict_loss(
    params: LawParams, n_params: Any, tokens: Any, qat_fraction: Any, bits: Any
) -> np.ndarray:
    """Predicted loss (broadcast over the arguments). ``bits`` 0 or NaN = a full-precision
    run (Chinchilla part only); QAT points need 0 < f < 1."""
    v, qat = _variables(n_params, tokens, qat_fraction, bits)
    f = np.broadcast_to(np.asarray(qat_fraction, dtype=float), qat.shape)
    if np.any(qat & ((f <= 0.0) | (f >= 1.0))):
        raise ValueError(
            "QAT points need 0 < qat_fraction < 1 (the penalty terms diverge at 0 and 1)"
        )
    log_l, _ = _logsumexp(_log_terms(np.asarray(params.values), _design(v, qat, {}), qat))
    return np.exp(log_l).reshape(qat.shape)


# ---------------------------------------------------------------------- fitting
def _free_mask(points: Sequence[RunPoint]) -> dict[str, bool]:
    qat = [p for p in points if not p.is_fp]
    sizes = {p.n_params for p in points}
    budgets = {p.tokens for p in points}
    bits = {p.effective_bits for p in qat}
    free = dict.fromkeys(NAMES, True)
    if len(sizes) < 2:
        for k in ("log_A", "alpha", "psi", "nu"):
            free[k] = False
    if len(budgets) < 2:
        for k in ("log_B", "beta"):
            free[k] = False
    if len(bits) < 2:
        for k in ("kappa", "chi", "mu"):
            free[k] = False
    if not qat:
        for k in NAMES[5:]:
            free[k] = False
    return free


@dataclass
class FittedLaw:
    """A fitted law: best parameters, bootstrap samples, which parameters were free."""

    params: LawParams
    free: dict[str, bool]
    objective: float
    n_points: int
    skipped: int = 0
    bootstrap: list[LawParams] = field(default_factory=list)
    n_range: tuple[float, float] = (0.0, 0.0)
    f_range: tuple[float, float] = (0.0, 1.0)

    def predict(self, n_params: Any, tokens: Any, qat_fraction: Any, bits: Any) -> np.ndarray:
        return predict_loss(self.params, n_params, tokens, qat_fraction, bits)

    def interval(
        self,
        n_params: float,
        tokens: float,
        qat_fraction: float,
        bits: float,
        confidence: float = 0.95,
    ) -> tuple[float, float] | None:
        """Bootstrap percentile interval of the prediction (None without bootstrap)."""
        if not self.bootstrap:
            return None
        preds = np.array(
            [float(predict_loss(p, n_params, tokens, qat_fraction, bits)) for p in self.bootstrap]
        )
        tail = 50.0 * (1.0 - confidence)
        lo, hi = np.percentile(preds, [tail, 100.0 - tail])
        return float(lo), float(hi)

    def optimal_fraction(self, n_params: float, tokens: float, bits: float) -> float:
        """The loss-minimizing QAT fraction of the law for (N, D, B), within ``f_range``
        (the fractions the law was fitted on) and (0, 1)."""
        return _argmin_fraction(self.params, n_params, tokens, bits, self.f_range)

    def free_readable(self, key: str) -> bool:
        """Whether the readable parameter ``key`` (``E``, ``B_D``, ``alpha``...) was fitted."""
        name = "log_B" if key == "B_D" else key if key in self.free else f"log_{key}"
        return self.free[name]

    def param_intervals(self, confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """``{name: (best, low, high)}`` of the readable parameters (bootstrap percentiles)."""
        best = self.params.as_dict()
        tail = 50.0 * (1.0 - confidence)
        out = {}
        for key, value in best.items():
            if self.bootstrap:
                samples = [b.as_dict()[key] for b in self.bootstrap]
                lo, hi = np.percentile(samples, [tail, 100.0 - tail])
                out[key] = (value, float(lo), float(hi))
            else:
                out[key] = (value, value, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the raw parameters (``NAMES`` order), readable ones, and the fit's facts."""
        return {
            "format": LAW_FORMAT,
            "names": list(NAMES),
            "values": list(self.params.values),
            "params": self.params.as_dict(),
            "free": dict(self.free),
            "objective": self.objective,
            "n_points": self.n_points,
            "skipped": self.skipped,
            "n_range": list(self.n_range),
            "f_range": list(self.f_range),
            "bootstrap": [list(b.values) for b in self.bootstrap],
        }

    @classmethod
    def from_dict(cls, data: Any) -> FittedLaw:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != LAW_FORMAT:
            raise ValueError(f"not a fitted law (format {LAW_FORMAT} expected)")
        if data.get("names") != list(NAMES):
            raise ValueError(
                f"a fitted law lists the parameters {list(NAMES)}, got {data.get('names')}"
            )
        try:
            values = [float(v) for v in data["values"]]
            free = {name: bool(data["free"][name]) for name in NAMES}
            boot = [LawParams(tuple(float(v) for v in b)) for b in data.get("bootstrap", [])]
            lo, hi = (float(x) for x in data["n_range"])
            f_lo, f_hi = (float(x) for x in data.get("f_range", (0.0, 1.0)))
            if not 0.0 <= f_lo <= f_hi <= 1.0:
                raise ValueError(f"f_range={[f_lo, f_hi]} must lie in [0, 1]")
            return cls(
                LawParams(tuple(values)), free, float(data["objective"]), int(data["n_points"]),
                int(data.get("skipped", 0)), boot, (lo, hi), (f_lo, f_hi),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a fitted law is malformed: {exc}") from None


def save_law(law: FittedLaw, path: str | os.PathLike[str]) -> Path:
    """Write ``law`` as JSON, atomically."""
    atomic_write_json(path, law.to_dict())
    return Path(path)


def load_law(path: str | os.PathLike[str]) -> FittedLaw:
    """Read a law written by :func:`save_law`; errors name the file."""
    target = Path(path)
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        raise ValueError(f"{target} does not exist (write one with `fit`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{target} is not JSON ({exc})") from None
    try:
        return FittedLaw.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{target}: {exc}") from None


def _argmin_fraction(
    params: LawParams, n: float, d: float, b: float, f_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    grid = np.linspace(max(f_range[0], 0.005), min(f_range[1], 0.995), 199)
    losses = predict_loss(params, n, d, grid, b)
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(
        lambda f: float(predict_loss(params, n, d, f, b)), bounds=(lo, hi), method="bounded",
        options={"xatol": 1e-5},
    )  # fmt: skip
    return float(res.x) if res.fun <= losses[i] else float(grid[i])


class _Objective:
    """Huber loss of log-residuals over ``points``, with centred variables for conditioning:
    the optimizer sees each term's log-coefficient at the data's mean (log N, log D, B, log S)."""

    def __init__(
        self,
        points: Sequence[RunPoint],
        free: dict[str, bool],
        delta: float,
        centre: dict[str, float] | None = None,
    ) -> None:
        n = [p.n_params for p in points]
        d = [p.tokens for p in points]
        f = [p.qat_fraction for p in points]
        b = [p.effective_bits or 0.0 for p in points]
        v, self.qat = _variables(n, d, f, b)
        if centre is None:
            centre = {
                k: float(np.mean(x[self.qat]))
                if self.qat.any() and k.startswith(("log_s", "bits"))
                else float(np.mean(x))
                for k, x in v.items()
                if k != "one"
            }
        self.centre = centre
        self.design = _design(v, self.qat, centre)
        self.log_loss = np.log([p.val_loss for p in points])
        self.free_idx = np.array([i for i, name in enumerate(NAMES) if free[name]])
        self.delta = delta
        self.base = np.array(
            [_DROPPED if (not free[n] and n.startswith("log_")) else 0.0 for n in NAMES]
        )

    def full(self, z: np.ndarray) -> np.ndarray:
        theta = self.base.copy()
        theta[self.free_idx] = z
        return theta

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        log_l, weights = _logsumexp(_log_terms(self.full(z), self.design, self.qat))
        r = log_l - self.log_loss
        a = np.abs(r)
        value = np.where(a <= self.delta, 0.5 * r**2, self.delta * (a - 0.5 * self.delta)).sum()
        dr = np.clip(r, -self.delta, self.delta)  # Huber's derivative
        grad = np.einsum("kp,kpj->j", weights * dr[None, :], self.design)
        return float(value), grad[self.free_idx]

    def standard(self, z: np.ndarray) -> LawParams:
        """Parameters in the law's own (uncentred) form."""
        theta = self.full(z)
        for term in _TERMS:
            coef = _INDEX[term[0][0]]
            if theta[coef] <= _DROPPED / 2:
                continue
            for name, var in term[1:]:
                theta[coef] += theta[_INDEX[name]] * self.centre.get(var, 0.0)
        return LawParams(tuple(float(x) for x in theta))

    def centred(self, params: LawParams) -> np.ndarray:
        """Inverse of :meth:`standard`, restricted to the free parameters."""
        theta = np.array(params.values, dtype=float)
        for term in _TERMS:
            coef = _INDEX[term[0][0]]
            if theta[coef] <= _DROPPED / 2:
                continue
            for name, var in term[1:]:
                theta[coef] -= theta[_INDEX[name]] * self.centre.get(var, 0.0)
        return theta[self.free_idx]


def _starts(
    points: Sequence[RunPoint], free: dict[str, bool], count: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Starting points in the centred parametrization: each term a plausible share of the
    lowest loss at the data's mean, exponents spread over their bounds."""
    low = min(p.val_loss for p in points)
    share = {
        "log_E": 0.6,
        "log_A": 0.15,
        "log_B": 0.15,
        "log_theta": 0.02,
        "log_phi": 0.05,
        "log_lam": 0.02,
    }
    names = [n for n in NAMES if free[n]]
    out = []
    for i in range(count):
        z = []
        for name in names:
            if name in share:
                jitter = 0.0 if i == 0 else rng.normal(0.0, 1.0)
                z.append(math.log(share[name] * low) + jitter)
            else:
                lo, hi = BOUNDS[name]
                mid = min(max(0.4, lo), hi)
                z.append(mid if i == 0 else rng.uniform(max(lo, -0.5), min(hi, 1.5)))
        out.append(np.array(z))
    return out


def _minimize(obj: _Objective, starts: Iterable[np.ndarray]) -> tuple[np.ndarray, float]:
    with threadpool_limits(1):  # tiny vectors: threaded BLAS only contends (10x slower)
        return _minimize_all(obj, starts)


def _minimize_all(obj: _Objective, starts: Iterable[np.ndarray]) -> tuple[np.ndarray, float]:
    bounds = [
        _COEF_BOUNDS if NAMES[i].startswith("log_") else BOUNDS[NAMES[i]] for i in obj.free_idx
    ]
    best: tuple[np.ndarray, float] | None = None
    for z0 in starts:
        res = minimize(
            obj, z0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 3000}
        )
        if np.isfinite(res.fun) and (best is None or res.fun < best[1]):
            best = (res.x, float(res.fun))
    if best is None:
        raise RuntimeError("the law fit did not converge from any start")
    return best


def fit_law(
    records: Iterable[object],
    *,
    starts: int = 12,
    bootstrap: int = 0,
    seed: int = 0,
    huber_delta: float = HUBER_DELTA,
) -> FittedLaw:
    """Fit the loss law to run records (dicts with the fields of :mod:`.records`).

    ``starts``: the best of ``20 x starts`` random initializations (by objective) are refined
    and the best fit is kept. ``bootstrap`` resamples of the
    records, each refitted from the best parameters, give intervals. Records with
    ``qat_fraction`` 1 or (for QAT runs) 0 are skipped; see the module doc.
    """
    points = parse_records(records)
    integer("starts", starts, at_least=1)
    integer("bootstrap", bootstrap, at_least=0)
    finite_number("huber_delta", huber_delta, above=0.0)
    usable = [p for p in points if p.is_fp or 0.0 < p.qat_fraction < 1.0]
    skipped = len(points) - len(usable)
    free = _free_mask(usable)
    if len(usable) < sum(free.values()):
        raise ValueError(
            f"{len(usable)} usable records cannot constrain {sum(free.values())} free parameters; "
            "add runs (more sizes, budgets, bit widths or fractions)"
        )
    rng = np.random.default_rng(seed)
    obj = _Objective(usable, free, huber_delta)
    # screen many random starting points by their objective (cheap), refine the best ones
    pool = _starts(usable, free, max(200, 20 * starts), rng)
    ranked = sorted(pool, key=lambda z0: obj(z0)[0])
    z, value = _minimize(obj, ranked[:starts])
    params = obj.standard(z)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(usable), len(usable))
        resampled = _Objective([usable[i] for i in pick], free, huber_delta, obj.centre)
        zb, _ = _minimize(resampled, [z])
        samples.append(resampled.standard(zb))
    sizes = [p.n_params for p in usable]
    fractions = [p.qat_fraction for p in usable if not p.is_fp] or [0.0, 1.0]
    return FittedLaw(
        params, free, value, len(usable), skipped, samples, (min(sizes), max(sizes)),
        (min(fractions), max(fractions)),
    )  # fmt: skip


def leave_one_out(records: Iterable[object], *, starts: int = 4, seed: int = 0) -> dict[str, float]:
    """Refit without each usable record in turn and predict it: ``rmse`` and ``mae`` (nats)
    and ``n`` (records). The refits start from the full fit's best parameters."""
    points = parse_records(records)
    usable = [p for p in points if p.is_fp or 0.0 < p.qat_fraction < 1.0]
    full = fit_law(usable_records(usable), starts=starts, seed=seed)
    centre = _Objective(usable, full.free, HUBER_DELTA).centre
    errors = []
    for i, held in enumerate(usable):
        obj = _Objective(usable[:i] + usable[i + 1 :], full.free, HUBER_DELTA, centre)
        z, _ = _minimize(obj, [obj.centred(full.params)])
        params = obj.standard(z)
        pred = float(
            predict_loss(
                params, held.n_params, held.tokens, held.qat_fraction, held.effective_bits or 0.0
            )
        )
        errors.append(pred - held.val_loss)
    e = np.asarray(errors)
    return {"rmse": float(np.sqrt(np.mean(e**2))), "mae": float(np.mean(np.abs(e))), "n": len(e)}


def usable_records(points: Iterable[RunPoint]) -> list[dict[str, Any]]:
    """RunPoints back to the record fields the law reads."""
    return [
        {"n_params": p.n_params, "tokens": p.tokens, "qat_fraction": p.qat_fraction, "bits": p.bits, "val_loss": p.val_loss}
        for p in points
    ]  # fmt: skip
