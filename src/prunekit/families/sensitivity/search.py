"""The size search of sensitivity pruning (seed 002; methods/sensitivity.md §6): Brent's method on the kept-count
error over the internal budget ratio κ′, started from the allocation's prediction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


from .scores import KAPPA_MIN


# ----------------------------------------------------------------------------------------------- size search (§6)


@dataclass
class Candidate:
    kappa: float
    kept: int
    f: float
    result: object


def _brent(fn: Callable[[float], float], a: float, fa: float, b: float, fb: float, evals: int, tol_f: float,
           xtol: float = 1e-12) -> None:
    """Brent's zero finder (inverse quadratic / secant steps, bisection when they do not shrink the bracket) on a
    sign-changing bracket; stops after ``evals`` calls, when |f| ≤ tol_f, or when the bracket collapses."""
    c, fc = a, fa
    d = e = b - a
    for _ in range(evals):
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol1 = 2.0 * 2.2e-16 * abs(b) + 0.5 * xtol * max(abs(b), 1e-300)
        xm = 0.5 * (c - b)
        if abs(xm) <= tol1 or abs(fb) <= tol_f:
            return
        if abs(e) >= tol1 and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:
                p, q = 2.0 * xm * s, 1.0 - s
            else:
                q, r = fa / fc, fb / fc
                p = s * (2.0 * xm * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            p = abs(p)
            if 2.0 * p < min(3.0 * xm * q - abs(tol1 * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = xm
        else:
            d = e = xm
        a, fa = b, fb
        b = b + (d if abs(d) > tol1 else math.copysign(tol1, xm))
        fb = fn(b)
        if abs(fb) <= tol_f:
            return


def search_keep_ratio(evaluate: Callable[[float], tuple[int, object]], predict: Callable[[float], float],
                      target: int, iters: int, tol: float, kappa_max: float = 1.0
                      ) -> tuple[Candidate, list[tuple[float, int]], bool]:
    """Find κ′ with |kept(κ′)/target − 1| ≤ tol in at most ``iters`` evaluations of ``evaluate(κ′) -> (kept,
    result)``; ``predict(T)`` is the κ′ whose allocation predicts T kept weights (cheap, no sampling).

    Start at predict(target); bracket with predict(target·(1 − 2f)), or with the ends KAPPA_MIN / ``kappa_max`` when
    that does not change sign; then Brent's method. Returns (chosen, [(κ′, kept)] in evaluation order, hit): the
    first candidate within ``tol``, else the closest one below and the closest one above the target, whichever is
    nearer (the one below on a tie)."""
    history: list[tuple[float, int]] = []
    best: dict[str, Candidate | None] = {"hit": None, "under": None, "over": None}

    def fn(k: float) -> float:
        if len(history) >= iters:
            raise StopIteration
        kept, res = evaluate(k)
        f = kept / target - 1.0
        history.append((k, kept))
        cand = Candidate(k, kept, f, res)
        if abs(f) <= tol and best["hit"] is None:
            best["hit"] = cand
        if f <= 0 and (best["under"] is None or f > best["under"].f):
            best["under"] = cand
        if f > 0 and (best["over"] is None or f < best["over"].f):
            best["over"] = cand
        return f

    try:
        x0 = min(kappa_max, max(KAPPA_MIN, predict(float(target))))
        f0 = fn(x0)
        if abs(f0) > tol:
            x1 = min(kappa_max, max(KAPPA_MIN, predict(max(1.0, target * (1.0 - 2.0 * f0)))))
            f1 = fn(x1) if x1 != x0 else f0
            if abs(f1) > tol and (f1 > 0) == (f0 > 0):
                x0, f0 = x1, f1
                end = KAPPA_MIN if f0 > 0 else kappa_max
                x1 = end
                f1 = fn(end) if end != x0 else f0
            if abs(f1) > tol and (f1 > 0) != (f0 > 0):
                _brent(fn, x0, f0, x1, f1, iters, tol)
    except StopIteration:
        pass
    hit = best["hit"] is not None
    chosen = best["hit"]
    if chosen is None:  # the closest; on a tie the one that does not exceed the target
        near = [c for c in (best["under"], best["over"]) if c is not None]
        chosen = min(near, key=lambda c: (abs(c.f), c.f > 0))
    return chosen, history, hit
