"""Aggregation: ratios to the reference rule, mean and std over seeds."""

from __future__ import annotations

import math
import statistics

from fa_rules.benchmark.suite import METRICS, RATIOS

def add_ratios(rows: list[dict], reference: str | None, vkeys=()) -> list[dict]:
    """Copies of `rows` with step time and memory divided by the reference row of the same seed,
    varied settings `vkeys` and model (left out where that row is missing or failed). A rule given its
    own model in the suite is compared with the reference rule's cell on that model (another label
    of the same rule), and gets no ratio where there is none: a ratio across networks says nothing
    about the rule."""
    if reference is None:
        return [dict(r) for r in rows]

    def context(r):
        return (r["seed"], *(repr(r.get(k)) for k in vkeys), r.get("model"))

    ok = [r for r in rows if r.get("status") == "ok"]
    names = {r.get("rule_name") for r in rows if r["rule"] == reference}
    refs = {context(r): r for r in ok if r.get("rule_name") in names and r["rule"] != reference}
    refs.update({context(r): r for r in ok if r["rule"] == reference})  # the reference label first
    out = []
    for r in rows:
        r = dict(r)
        ref = refs.get(context(r))
        for metric, ratio in RATIOS.items():
            a, b = r.get(metric), (ref or {}).get(metric)
            if r.get("status") == "ok" and a is not None and b:
                r[ratio] = a / b
        out.append(r)
    return out


def aggregate(rows: list[dict], vkeys=()) -> list[dict]:
    """Mean and std over seeds per (rule, varied settings `vkeys`), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rule"], *(repr(r.get(k)) for k in vkeys)), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        ok = [r for r in members if r.get("status") == "ok"]
        agg = {"rule": first["rule"], "rule_name": first.get("rule_name"), **{k: first.get(k) for k in vkeys},
               "seeds": len(members), "ok": len(ok), "task": next((r.get("task") for r in ok), None),
               "errors": sorted({f"{r.get('status')}: {r.get('error')}" for r in members if r.get("status") != "ok"})}
        for m in METRICS:
            values = [r[m] for r in ok if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
            if values:
                agg[m] = statistics.fmean(values)
                agg[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                agg[m + "_n"] = len(values)
        out.append(agg)
    return out
