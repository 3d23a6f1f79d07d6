"""Deterministic generator of monthly seed exports shaped like the StreamFlow lab files.

Writes ``month_000/`` … ``month_{K-1}/`` with the six CSV files of the lab export
(same headers, column order, value sets and number formats) and distributions,
correlations and month-to-month drift calibrated against the real lab months.

Randomness is counter based: every value of user ``i`` is a hash of
``(seed, month, field, i)`` (the SplitMix64 finaliser over a Weyl sequence, the
generator behind Java's ``SplittableRandom``). Nothing depends on chunk boundaries
or on how many users come after, so output is byte-identical for any chunk size,
the first N rows of a larger run equal a run of N users, and month 0 is the same
whatever ``months`` is. Memory is bounded by one chunk of users.

    python -m streamflow.seeds --users 7043 --months 2 --seed 42 --out data/seeds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from .streams import escape_unencodable

__all__ = ["DEFAULT_CHUNK_SIZE", "FILES", "HEADERS", "generate", "main"]

DEFAULT_CHUNK_SIZE = 100_000

HEADERS: dict[str, tuple[str, ...]] = {
    "users": (
        "user_id",
        "signup_date",
        "user_gender",
        "user_is_senior",
        "has_family",
        "has_dependents",
    ),
    "subscriptions": (
        "user_id",
        "months_active",
        "plan_stream_tv",
        "plan_stream_movies",
        "contract_type",
        "paperless_billing",
        "monthly_fee",
        "total_paid",
        "net_service",
    ),
    "usage_agg_30d": (
        "user_id",
        "watch_hours_30d",
        "avg_session_mins_7d",
        "unique_devices_30d",
        "skips_7d",
        "rebuffer_events_7d",
    ),
    "payments_agg_90d": ("user_id", "failed_payments_90d"),
    "support_agg_90d": ("user_id", "support_tickets_90d", "ticket_avg_resolution_hrs_90d"),
    "labels": ("user_id", "churn_label"),
}
FILES: tuple[str, ...] = tuple(f"{name}.csv" for name in HEADERS)

# ---------------------------------------------------------------------------
# Calibration. Every number below was measured on the lab's month_000/month_001
# (7,043 users); the comments give the lab figure the parameter reproduces.
# ---------------------------------------------------------------------------
CONTRACTS = ("Month-to-month", "One year", "Two year")
NET_SERVICES = ("DSL", "Fiber optic", "No")
GENDERS = ("Male", "Female")

P_MALE = 0.5048
P_SENIOR = 0.1621
P_FAMILY_BY_SENIOR = (0.4794, 0.5018)
# P(has_dependents) by [has_family][user_is_senior]: dependents mostly come with a family.
P_DEPENDENTS = ((0.1149, 0.0141), (0.5889, 0.1449))
# P(contract) by [has_family][user_is_senior]: families commit, seniors stay monthly.
P_CONTRACT = (
    ((0.6621, 0.1878, 0.1501), (0.8102, 0.1160, 0.0738)),
    ((0.3655, 0.2496, 0.3849), (0.6038, 0.2164, 0.1798)),
)
# months_active by contract, as bin counts over these inclusive ranges; 0, 1 and 72
# are their own bins because the lab has spikes there (tenure is capped at 72).
_TENURE_BINS = (
    (0, 0), (1, 1), (2, 6), (7, 12), (13, 18), (19, 24), (25, 30), (31, 36),
    (37, 42), (43, 48), (49, 54), (55, 60), (61, 66), (67, 71), (72, 72),
)  # fmt: skip
_TENURE_COUNTS = (
    (0, 604, 809, 581, 418, 319, 264, 222, 177, 139, 123, 111, 73, 33, 2),
    (1, 7, 31, 85, 90, 107, 127, 123, 132, 136, 174, 147, 159, 137, 17),
    (10, 2, 17, 39, 40, 50, 40, 56, 70, 108, 123, 154, 231, 412, 343),
)
# Tenure bands for the tables below: 0-12, 13-36, 37-60, 61-72 months.
_BAND_UPPER = np.array([12, 36, 60])
# P(net_service) by [contract][tenure band] for non-seniors: long-standing users moved
# to fibre, recent committed ones often have no internet at all.
P_NET = (
    ((0.3652, 0.4093, 0.2255), (0.3405, 0.5332, 0.1263),
     (0.3106, 0.6515, 0.0379), (0.1774, 0.8065, 0.0161)),
    ((0.3361, 0.0574, 0.6066), (0.4565, 0.1715, 0.3720),
     (0.4411, 0.3713, 0.1876), (0.2805, 0.6138, 0.1057)),
    ((0.2647, 0.0000, 0.7353), (0.2582, 0.0549, 0.6868),
     (0.3396, 0.1686, 0.4918), (0.4215, 0.3162, 0.2623)),
)  # fmt: skip
# Seniors' odds against DSL: 3x for fibre, 0.3x for no internet (73% vs 38% on fibre).
SENIOR_NET_TILT = (1.0, 3.06, 0.294)
# (tv, movies) as FF, FT, TF, TT by [net_service (DSL, Fiber optic)][tenure band]:
# add-ons accumulate with tenure. Without internet both cells are empty.
P_STREAMING = (
    ((0.6760, 0.1213, 0.1080, 0.0947), (0.5008, 0.1410, 0.1475, 0.2107),
     (0.3575, 0.1688, 0.1597, 0.3140), (0.1988, 0.1590, 0.1332, 0.5089)),
    ((0.4810, 0.1517, 0.1582, 0.2091), (0.3012, 0.1759, 0.1627, 0.3602),
     (0.1888, 0.1287, 0.1427, 0.5399), (0.1210, 0.1003, 0.0908, 0.6879)),
)  # fmt: skip
# P(paperless_billing) by [net_service][contract].
P_PAPERLESS = ((0.5904, 0.5281, 0.4889), (0.7937, 0.7421, 0.7133), (0.3340, 0.2720, 0.2696))
# monthly_fee = base + tv + movies + per_month * months_active + N(0, sd), reflected into
# [lo, hi] and rounded to 0.05 like the lab's prices (least squares on the lab rows).
FEE_MODEL = {
    "DSL": (43.35, 10.37, 10.09, 0.200, 11.59, 23.45, 94.80),
    "Fiber optic": (73.25, 11.01, 10.93, 0.178, 5.15, 67.75, 118.75),
}
# Without internet the fee is bimodal (with or without a second line), the upper
# mode getting commoner with tenure: 8% of new users, 38% of those over 3 years.
FEE_NO_LOW = (19.96, 0.50, 18.25, 21.45)
FEE_NO_HIGH = (24.97, 0.70, 22.95, 26.90)
FEE_NO_HIGH_SHARE = (0.04, 0.006)  # intercept, per month_active
# total_paid / (monthly_fee * months_active) scatters around 1 with sd ~0.2/sqrt(tenure)
# (price changes over the contract average out); it equals monthly_fee at tenure 1
# and 0.0 at tenure 0, exactly as in the lab.
TOTAL_PAID_SPREAD = 0.2
# The lab's signup_date is 2022-02-06 minus months_active *days*, never before
# 2022-01-01 (holds for all 7,043 rows); kept so generated users look like the export.
SIGNUP_ANCHOR = dt.date(2022, 2, 6)
SIGNUP_FLOOR = dt.date(2022, 1, 1)
# Month-0 churn: logistic fit on the lab (intercept, one year, two year, fibre, no
# internet, paperless, senior, log1p(months_active), family, dependents); 26.5% churn.
CHURN_LOGIT = (0.437, -0.750, -1.773, 1.111, -1.013, 0.453, 0.330, -0.676, 0.071, -0.179)
# Later months' churn (24.2% in the lab's month 1, 38% of labels flip) hardly depends on
# the profile any more, but on the month's own events: logistic fit on the lab's
# month_001 (intercept, a new failed payment, a new ticket, watching less than the lab
# month's median hours, fibre, no internet, the month-0 logit above). Lab: 40.1% churn
# with a new failed payment against 23.7% without, 38.9% with a new ticket against
# 23.4%, ~31% below the median watch hours against ~17% above (a step, not a slope:
# the step fits the lab's labels far better). The median is a constant, not this
# run's: a user's values must not depend on the other users.
CHURN_LATER_LOGIT = (-1.5229, 0.7786, 0.7348, 0.7210, -0.0997, 0.0926, 0.0413)
LOW_WATCH_HOURS = 29.1677
# watch_hours_30d = a + b * monthly_fee + c * months_active + N(0, sd) (r = 0.68 with fee);
# each later month it is multiplied by N(0.98, 0.03), so it changes for every user.
WATCH_MODEL = (19.68, 0.1512, 0.00457, 4.96)
WATCH_MONTHLY_FACTOR = (0.98, 0.03)
# One value for every user and month in the lab export (it looks imputed upstream).
AVG_SESSION_MINS = "29.14104464084511"
SKIPS_MEAN = 5.05
REBUFFER_MEAN = 2.31
REBUFFER_MONTHLY_MEAN = 0.30  # added each month: 26% of users change, all upwards
P_FAILED_PAYMENTS = (0.8471, 0.1451, 0.0078)
P_FAILED_PAYMENT_MONTHLY = 0.0287  # +1 for 202 of 7,043 lab users
TICKETS_MEAN = 0.303
P_TICKET_MONTHLY = 0.0511  # +1 for 360 of 7,043 lab users
# Resolution hours are independent of the ticket count in the lab, one decimal,
# floored at 1.0 (1.25% of rows sit exactly there).
RESOLUTION_HRS = (10.0, 4.0, 1.0)

# ---------------------------------------------------------------------------
# Counter-based randomness.
# ---------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_U11 = np.uint64(11)
_U27 = np.uint64(27)
_U30 = np.uint64(30)
_U31 = np.uint64(31)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_STATIC = -1  # month tag of values that never change


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place (uint64 arithmetic wraps by design)."""
    z ^= z >> _U30
    z *= _C1
    z ^= z >> _U27
    z *= _C2
    z ^= z >> _U31
    return z


def _key(seed: int, month: int, name: str) -> int:
    # crc32, not hash(): str hashes are salted per process and would break determinism.
    h = 0
    for part in (seed & _MASK64, (month + 1) & _MASK64, zlib.crc32(name.encode())):
        h = _mix_int(((h ^ part) + _GAMMA) & _MASK64)
    return h


# ---------------------------------------------------------------------------
# Elementary functions from +, -, *, /, sqrt and exact bit operations alone. IEEE 754
# rounds those the same on every CPU; numpy's log, exp and cos are vectorised per
# instruction set (on AVX-512, 1 value in 300 differs from AVX2 in its last bit) and
# libm's differ between platforms, and a last bit shows in a full-precision float such
# as watch_hours_30d: the committed seeds would only be reproducible on CPUs like the
# one that wrote them. Accurate to a few units in the last place, which is plenty.
# ---------------------------------------------------------------------------
# ln 2 in two parts (fdlibm's): k * _LN2_HI is exact for |k| < 2**11.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SQRT_HALF = 0.7071067811865476
_TWO_PI = 6.283185307179586
# log(m) = 2 atanh(s), s = (m - 1) / (m + 1): 1/(2k+1), |s| <= 0.172 so 13 terms.
_ATANH_TERMS = tuple(1.0 / (2 * k + 1) for k in range(13))
# Taylor coefficients: 1/n! for exp on |r| <= ln(2)/2, +-1/n! for cos and sin on
# |x| <= pi/4 (in x squared), to below 1e-19.
_EXP_TERMS = tuple(1.0 / math.factorial(n) for n in range(15))
_COS_TERMS = tuple((-1) ** n / math.factorial(2 * n) for n in range(11))
_SIN_TERMS = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(11))


def _horner(coefficients: Sequence[float], x: np.ndarray) -> np.ndarray:
    acc = np.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = acc * x + c
    return acc


def _log(x: np.ndarray | float) -> np.ndarray:
    """Natural logarithm of positive ``x``."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)  # now in [sqrt(1/2), sqrt(2))
    e = e - low
    s = (m - 1.0) / (m + 1.0)
    return e * _LN2_HI + (e * _LN2_LO + 2.0 * s * _horner(_ATANH_TERMS, s * s))


def _exp(x: np.ndarray | float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x / (_LN2_HI + _LN2_LO))
    r = (x - k * _LN2_HI) - k * _LN2_LO
    return np.ldexp(_horner(_EXP_TERMS, r), k.astype(np.int64))


def _cos_turns(u: np.ndarray) -> np.ndarray:
    """cos(2 pi u): u's nearest quarter turn is taken off exactly, the rest is a series."""
    q = np.rint(u * 4.0)
    x = (u - q * 0.25) * _TWO_PI  # |x| <= pi/4
    x2 = x * x
    cos = _horner(_COS_TERMS, x2)
    sin = x * _horner(_SIN_TERMS, x2)
    quarter = q.astype(np.int64) % 4
    return np.choose(quarter, [cos, -sin, -cos, sin])


class _Draws:
    """Random variates for one block of users and one (seed, month); each field has its own
    named stream, so adding a field never shifts the values of the others.
    """

    def __init__(self, seed: int, month: int, index: np.ndarray) -> None:
        self._seed = seed
        self._month = month
        self._weyl = index.astype(np.uint64) * np.uint64(_GAMMA)

    def bits(self, name: str) -> np.ndarray:
        return _mix(self._weyl + np.uint64(_key(self._seed, self._month, name)))

    def uniform(self, name: str) -> np.ndarray:
        """Uniform on [0, 1) with 53 random bits."""
        return (self.bits(name) >> _U11).astype(np.float64) * 2.0**-53

    def normal(self, name: str, mean: float = 0.0, sd: float = 1.0) -> np.ndarray:
        # Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
        u1 = 1.0 - self.uniform(name + ":r")
        u2 = self.uniform(name + ":theta")
        return mean + sd * np.sqrt(-2.0 * _log(u1)) * _cos_turns(u2)

    def bernoulli(self, name: str, p: np.ndarray | float) -> np.ndarray:
        return self.uniform(name) < p

    def categorical(self, name: str, probs: np.ndarray) -> np.ndarray:
        """One draw per row from ``probs`` (shape (k,) or (n, k), rows summing to 1)."""
        cum = np.cumsum(probs, axis=-1)[..., :-1]
        u = self.uniform(name)
        if cum.ndim == 1:
            return np.searchsorted(cum, u, side="right")
        return (u[:, None] >= cum).sum(axis=1)

    def poisson(self, name: str, lam: float) -> np.ndarray:
        # Inverse CDF against a table: exact for the small means used here.
        kmax = int(lam + 12 * math.sqrt(lam) + 20)
        k = np.arange(kmax + 1)
        log_factorial = np.concatenate([[0.0], np.cumsum(_log(k[1:]))])
        log_pmf = k * _log(lam) - lam - log_factorial
        return np.searchsorted(np.cumsum(_exp(log_pmf))[:-1], self.uniform(name), "right")


# ---------------------------------------------------------------------------
# User ids: a keyed bijection from the row index onto every lab-style id
# ("7590-VHVEG": 10**4 * 26**5 ids), so ids are unique without remembering any.
# ---------------------------------------------------------------------------
_ID_SPACE = 10**4 * 26**5
_HALF_BITS = 19  # 2**38 > _ID_SPACE; cycle walking maps the excess back in range
_HALF_MASK = np.uint64((1 << _HALF_BITS) - 1)
_DIGITS = np.array([f"{i:04d}-" for i in range(10**4)], dtype=object)
_LETTERS = [chr(ord("A") + i) for i in range(26)]
_LETTERS2 = np.array([a + b for a in _LETTERS for b in _LETTERS], dtype=object)
_LETTERS3 = np.array([a + b for a in _LETTERS2.tolist() for b in _LETTERS], dtype=object)


def _permute_ids(index: np.ndarray, seed: int) -> np.ndarray:
    keys = [np.uint64(_key(seed, _STATIC, f"user_id:{r}")) for r in range(4)]
    shift = np.uint64(_HALF_BITS)

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & _HALF_MASK
        for k in keys:
            left, right = right, left ^ (_mix(right + k) & _HALF_MASK)
        return (left << shift) | right

    v = feistel(index.astype(np.uint64))
    out = v >= _ID_SPACE
    while out.any():
        v[out] = feistel(v[out])
        out[out] = v[out] >= _ID_SPACE
    return v


def _user_ids(index: np.ndarray, seed: int) -> list[str]:
    v = _permute_ids(index, seed).astype(np.int64)
    digits, letters = np.divmod(v, 26**5)
    hi, lo = np.divmod(letters, 26**3)
    return (_DIGITS[digits] + _LETTERS2[hi] + _LETTERS3[lo]).tolist()


# ---------------------------------------------------------------------------
# Formatting, vectorised over a block. Floats are written like the lab's
# (pandas' shortest round-trip repr: 45.0, 1889.5, 29.85).
# ---------------------------------------------------------------------------
_BOOL_OR_EMPTY = np.array(["False", "True", ""], dtype=object)
_SMALL_INTS = np.array([str(i) for i in range(1000)], dtype=object)
_FRACTIONS = {
    1: np.array([f".{k}" for k in range(10)], dtype=object),
    2: np.array([f".{k // 10}" if k % 10 == 0 else f".{k:02d}" for k in range(100)], dtype=object),
}


def _ints(values: np.ndarray) -> np.ndarray:
    if values.size and values.max() < len(_SMALL_INTS):
        return _SMALL_INTS[values]
    return np.array(list(map(str, values.tolist())), dtype=object)


def _bools(values: np.ndarray) -> np.ndarray:
    return _BOOL_OR_EMPTY[values.astype(np.intp)]


def _fixed(units: np.ndarray, decimals: int) -> np.ndarray:
    """``units`` counted in 10**-decimals, as the shortest repr of the float."""
    whole, frac = np.divmod(units, 10**decimals)
    return _ints(whole) + _FRACTIONS[decimals][frac]


def _lines(columns: Sequence[np.ndarray | list[str]]) -> str:
    parts = [c.tolist() if isinstance(c, np.ndarray) else c for c in columns]
    return "\n".join(map(",".join, zip(*parts, strict=True))) + "\n"


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------
@dataclass
class _Profile:
    """What does not change between months, plus the month-0 churn risk."""

    ids: list[str]
    users_csv: str
    subscriptions_csv: str
    monthly_fee: np.ndarray
    months_active: np.ndarray
    net_service: np.ndarray
    churn_logit: np.ndarray
    churn_risk: np.ndarray


@dataclass
class _Activity:
    """Monthly values, each month derived from the previous one."""

    watch_hours: np.ndarray
    devices: np.ndarray
    skips: np.ndarray
    rebuffers: np.ndarray
    failed_payments: np.ndarray
    tickets: np.ndarray
    resolution_tenths: np.ndarray
    churn: np.ndarray


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Folding the tails back in avoids the spikes clipping would pile up at the bounds.
    x = np.where(x < lo, 2 * lo - x, x)
    x = np.where(x > hi, 2 * hi - x, x)
    return np.clip(x, lo, hi)


def _tenure(d: _Draws, contract: np.ndarray) -> np.ndarray:
    counts = np.array(_TENURE_COUNTS, dtype=np.float64)
    bins = d.categorical(
        "months_active:bin", (counts / counts.sum(axis=1, keepdims=True))[contract]
    )
    lo = np.array([b[0] for b in _TENURE_BINS])[bins]
    width = np.array([b[1] - b[0] + 1 for b in _TENURE_BINS])[bins]
    return lo + (d.uniform("months_active:offset") * width).astype(np.int64)


def _monthly_fee_cents(
    d: _Draws, net: np.ndarray, tv: np.ndarray, movies: np.ndarray, tenure: np.ndarray
) -> np.ndarray:
    fee = np.zeros(len(net))
    for code, name in enumerate(NET_SERVICES[:2]):
        base, tv_add, mov_add, per_month, sd, lo, hi = FEE_MODEL[name]
        raw = base + tv_add * tv + mov_add * movies + per_month * tenure
        raw = _reflect(raw + d.normal(f"monthly_fee:{name}", 0.0, sd), lo, hi)
        fee = np.where(net == code, raw, fee)
    high_share = FEE_NO_HIGH_SHARE[0] + FEE_NO_HIGH_SHARE[1] * tenure
    high = d.bernoulli("monthly_fee:No:mode", high_share)
    mean, sd, lo, hi = FEE_NO_LOW
    low_fee = _reflect(d.normal("monthly_fee:No:low", mean, sd), lo, hi)
    mean, sd, lo, hi = FEE_NO_HIGH
    high_fee = _reflect(d.normal("monthly_fee:No:high", mean, sd), lo, hi)
    fee = np.where(net == 2, np.where(high, high_fee, low_fee), fee)
    return np.rint(fee * 20).astype(np.int64) * 5


def _profile(seed: int, index: np.ndarray) -> _Profile:
    d = _Draws(seed, _STATIC, index)
    male = d.bernoulli("user_gender", P_MALE)
    senior = d.bernoulli("user_is_senior", P_SENIOR)
    family = d.bernoulli("has_family", np.array(P_FAMILY_BY_SENIOR)[senior.astype(np.intp)])
    dependents = d.bernoulli("has_dependents", np.array(P_DEPENDENTS)[family * 1, senior * 1])
    contract = d.categorical("contract_type", np.array(P_CONTRACT)[family * 1, senior * 1])
    tenure = _tenure(d, contract)
    band = np.searchsorted(_BAND_UPPER, tenure)
    net_weights = np.array(P_NET)[contract, band] * np.where(
        senior[:, None], np.array(SENIOR_NET_TILT), 1.0
    )
    net = d.categorical("net_service", net_weights / net_weights.sum(axis=1, keepdims=True))
    internet = net != 2
    streaming = d.categorical("plan_stream", np.array(P_STREAMING)[np.minimum(net, 1), band])
    tv = internet & (streaming >= 2)
    movies = internet & (streaming % 2 == 1)
    paperless = d.bernoulli("paperless_billing", np.array(P_PAPERLESS)[net, contract])
    fee_cents = _monthly_fee_cents(d, net, tv, movies, tenure)

    spread = TOTAL_PAID_SPREAD / np.sqrt(np.maximum(tenure, 1))
    ratio = np.maximum(1.0 + spread * d.normal("total_paid"), 0.5)
    ratio = np.where(tenure <= 1, 1.0, ratio)
    # In steps of 0.05, like every lab total (they add up prices that move in 0.05).
    paid_cents = np.rint(fee_cents * tenure * ratio / 5).astype(np.int64) * 5

    signup_offset = np.minimum(tenure, (SIGNUP_ANCHOR - SIGNUP_FLOOR).days)
    dates = np.array(
        [
            (SIGNUP_ANCHOR - dt.timedelta(days=k)).isoformat()
            for k in range(signup_offset.max() + 1)
        ],
        dtype=object,
    )

    b0, one, two, fibre, no_net, paper, sen, log_t, fam, dep = CHURN_LOGIT
    logit = (
        b0
        + one * (contract == 1)
        + two * (contract == 2)
        + fibre * (net == 1)
        + no_net * (net == 2)
        + paper * paperless
        + sen * senior
        + log_t * _log(1.0 + tenure)
        + fam * family
        + dep * dependents
    )
    # Nobody in the lab churns before their first bill.
    risk = np.where(tenure == 0, 0.0, 1.0 / (1.0 + _exp(-logit)))

    ids = _user_ids(index, seed)
    plan = np.where(internet, 0, 2)
    users_csv = _lines(
        [
            ids,
            dates[signup_offset],
            np.array(GENDERS, dtype=object)[np.where(male, 0, 1)],
            _bools(senior),
            _bools(family),
            _bools(dependents),
        ]
    )
    subscriptions_csv = _lines(
        [
            ids,
            _ints(tenure),
            _BOOL_OR_EMPTY[plan + tv],
            _BOOL_OR_EMPTY[plan + movies],
            np.array(CONTRACTS, dtype=object)[contract],
            _bools(paperless),
            _fixed(fee_cents, 2),
            _fixed(paid_cents, 2),
            np.array(NET_SERVICES, dtype=object)[net],
        ]
    )
    return _Profile(ids, users_csv, subscriptions_csv, fee_cents / 100, tenure, net, logit, risk)


def _first_month(seed: int, index: np.ndarray, profile: _Profile) -> _Activity:
    d = _Draws(seed, 0, index)
    a, per_fee, per_month, sd = WATCH_MODEL
    watch = a + per_fee * profile.monthly_fee + per_month * profile.months_active
    mean, sd_hrs, floor = RESOLUTION_HRS
    resolution = np.maximum(np.rint(d.normal("resolution_hrs", mean, sd_hrs) * 10), floor * 10)
    return _Activity(
        watch_hours=np.maximum(watch + d.normal("watch_hours", 0.0, sd), 0.5),
        devices=1 + d.categorical("unique_devices", np.full(3, 1 / 3)),
        skips=d.poisson("skips", SKIPS_MEAN),
        rebuffers=d.poisson("rebuffer_events", REBUFFER_MEAN),
        failed_payments=d.categorical("failed_payments", np.array(P_FAILED_PAYMENTS)),
        tickets=d.poisson("support_tickets", TICKETS_MEAN),
        resolution_tenths=resolution.astype(np.int64),
        churn=d.bernoulli("churn", profile.churn_risk),
    )


def _next_month(
    seed: int, month: int, index: np.ndarray, profile: _Profile, prev: _Activity
) -> _Activity:
    d = _Draws(seed, month, index)
    factor = np.maximum(d.normal("watch_hours", *WATCH_MONTHLY_FACTOR), 0.5)
    watch_hours = prev.watch_hours * factor
    failed_payment = d.bernoulli("failed_payments", P_FAILED_PAYMENT_MONTHLY)
    ticket = d.bernoulli("support_tickets", P_TICKET_MONTHLY)
    b0, paid_late, complained, watched_less, fibre, no_net, month0 = CHURN_LATER_LOGIT
    logit = (
        b0
        + paid_late * failed_payment
        + complained * ticket
        + watched_less * (watch_hours < LOW_WATCH_HOURS)
        + fibre * (profile.net_service == 1)
        + no_net * (profile.net_service == 2)
        + month0 * profile.churn_logit
    )
    return _Activity(
        watch_hours=watch_hours,
        devices=prev.devices,
        skips=prev.skips,
        rebuffers=prev.rebuffers + d.poisson("rebuffer_events", REBUFFER_MONTHLY_MEAN),
        failed_payments=prev.failed_payments + failed_payment,
        tickets=prev.tickets + ticket,
        resolution_tenths=prev.resolution_tenths,
        churn=d.bernoulli("churn", 1.0 / (1.0 + _exp(-logit))),
    )


def _monthly_csv(ids: list[str], act: _Activity) -> dict[str, str]:
    return {
        "usage_agg_30d": _lines(
            [
                ids,
                list(map(repr, act.watch_hours.tolist())),
                [AVG_SESSION_MINS] * len(ids),
                _ints(act.devices),
                _ints(act.skips),
                _ints(act.rebuffers),
            ]
        ),
        "payments_agg_90d": _lines([ids, _ints(act.failed_payments)]),
        "support_agg_90d": _lines([ids, _ints(act.tickets), _fixed(act.resolution_tenths, 1)]),
        "labels": _lines([ids, _bools(act.churn)]),
    }


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------
def _blocks(users: int, chunk_size: int) -> Iterator[np.ndarray]:
    for start in range(0, users, chunk_size):
        yield np.arange(start, min(start + chunk_size, users), dtype=np.int64)


def generate(
    out_dir: Path,
    users: int,
    months: int,
    seed: int = 42,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Path]:
    """Write ``months`` month folders of ``users`` users under ``out_dir``; return them.

    Output depends only on ``users``, ``months`` (month k never on later ones) and
    ``seed``; ``chunk_size`` only bounds memory. Files are written beside their final
    name and renamed once complete, so an interrupted run leaves no truncated CSV
    under a real name. Existing files of the same names are replaced. Later month
    folders of an earlier, longer run are refused (ValueError), not left beside these
    months as if they followed them.
    """
    if not 0 <= seed <= _MASK64:
        # Seeds are reduced to 64 bits: -1 would silently be 2**64 - 1.
        raise ValueError(f"seed must be between 0 and {_MASK64}, got {seed}")
    if not 1 <= users <= _ID_SPACE:
        raise ValueError(f"users must be between 1 and {_ID_SPACE}, got {users}")
    if months < 1:
        raise ValueError(f"months must be at least 1, got {months}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    folders = [Path(out_dir) / f"month_{m:03d}" for m in range(months)]
    stale = sorted(
        p.name
        for p in (Path(out_dir).glob("month_*") if Path(out_dir).is_dir() else ())
        if p not in folders
    )
    if stale:
        raise ValueError(
            f"{out_dir} already holds {', '.join(stale)}, which a run of {months} "
            f"month(s) does not write: they would sit beside the new months as if they "
            f"followed them. Remove them, or choose another output folder"
        )
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []
    try:
        _write_all(folders, users, seed, chunk_size, pending)
    except BaseException:
        for partial, _ in pending:
            partial.unlink(missing_ok=True)
        raise
    for partial, final in pending:
        os.replace(partial, final)
    return folders


def _write_all(
    folders: list[Path], users: int, seed: int, chunk_size: int, pending: list[tuple[Path, Path]]
) -> None:
    with contextlib.ExitStack() as stack:
        handles: list[dict[str, IO[str]]] = []
        for folder in folders:
            month_handles: dict[str, IO[str]] = {}
            for table, header in HEADERS.items():
                final = folder / f"{table}.csv"
                partial = final.with_name(final.name + ".partial")
                fh = stack.enter_context(
                    open(partial, "w", encoding="utf-8", newline="\n", buffering=1 << 20)
                )
                pending.append((partial, final))
                fh.write(",".join(header) + "\n")
                month_handles[table] = fh
            handles.append(month_handles)

        for index in _blocks(users, chunk_size):
            profile = _profile(seed, index)
            activity = _first_month(seed, index, profile)
            for month, month_handles in enumerate(handles):
                if month:
                    activity = _next_month(seed, month, index, profile, activity)
                month_handles["users"].write(profile.users_csv)
                month_handles["subscriptions"].write(profile.subscriptions_csv)
                for table, text in _monthly_csv(profile.ids, activity).items():
                    month_handles[table].write(text)


def _out_dir(value: str) -> Path:
    if not value.strip():
        # Path("") is the current folder: an empty variable would scatter months there.
        raise argparse.ArgumentTypeError("the output folder is empty")
    return Path(value)


def main(argv: Sequence[str] | None = None) -> int:
    escape_unencodable()  # it prints the month folders it wrote, under --out
    parser = argparse.ArgumentParser(
        prog="python -m streamflow.seeds",
        description="Generate deterministic monthly seed exports shaped like the lab files.",
    )
    parser.add_argument("--users", type=int, default=7043, help="users per month (default 7043)")
    parser.add_argument("--months", type=int, default=2, help="month folders (default 2)")
    parser.add_argument(
        "--seed", type=int, default=42, help="random seed, 0 to 2**64 - 1 (default 42)"
    )
    parser.add_argument(
        "--out",
        type=_out_dir,
        required=True,
        help="output folder, e.g. data/seeds (its month folders are replaced)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"users held in memory at once; does not change the output "
        f"(default {DEFAULT_CHUNK_SIZE})",
    )
    args = parser.parse_args(argv)
    try:
        folders = generate(args.out, args.users, args.months, args.seed, chunk_size=args.chunk_size)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        # A file where a folder is wanted, no permission, a full disk: one line.
        where = exc.filename or args.out
        print(f"{parser.prog}: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
