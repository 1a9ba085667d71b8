"""The nine findings a study can measure: what each reads, its statistic, its verdict, its plot.

Seven come from "Does RLHF Scale?" (docs/methods.md section 4), two from "Asynchronous RLHF"
(section 3). Each :class:`Finding` names the statistic that tests the claim and decides
*reproduced* / *not reproduced* / *inconclusive at this scale* from the effect and its
standard error over seeds (:mod:`megarlhf.study.stats`): the verdict is what the runs show,
with the numbers in its text. Nothing here is tuned to agree with the papers.

=========================  ==================================================================
finding                     statistic (Z = 2 standard errors)
=========================  ==================================================================
responses_per_prompt (1)    gain from the lowest N to N~4 vs the gain from N~4 to the highest
reward_model_size (2)       best-of-N gain of the largest RM over the smallest vs its RL gain
policy_size (3)             slope of the RL gain (final - initial accuracy) vs log2(size)
early_downstream (4)        eval gain early vs late; training reward's late gain
rm_data_diversity (5)       RM accuracy: more prompts minus more responses/prompt, equal size
prm_vs_orm (6)              best-of-N PRM - ORM on its own task vs on another task
ppo_vs_grpo (7)             final reward difference vs pooled std; KL / length drift difference
staleness (8)               slope of final reward vs K per algorithm; DPO's minus the others'
async_speedup (9)           wall-clock to the sync run's final reward, sync / async, per seed
=========================  ==================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from megarlhf.study import stats
from megarlhf.study.errors import StudyError
from megarlhf.study.stats import Estimate, judge

# A run's data: megarlhf.study.aggregate.RunData (point, seed, jobs: name -> JobData).
RunData = Any


# ------------------------------------------------------------------------------ results
@dataclass
class Curve:
    """One line of a plot: mean and spread (std over seeds) at each x; per-run points."""

    label: str
    x: list[float]
    mean: list[float]
    std: list[float]
    points: list[tuple[float, float]] = field(default_factory=list)
    color: int | None = None  # matplotlib's C<n>; None: by position


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve]
    xlog: bool = False
    xticks: list[tuple[float, str]] | None = None


@dataclass
class Verdict:
    outcome: str  # stats.REPRODUCED / NOT_REPRODUCED / INCONCLUSIVE
    statistic: str  # the numbers
    test: str  # how the outcome was decided
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Analysis:
    columns: list[str]
    rows: list[list[str]]
    panels: list[Panel]
    verdict: Verdict
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ helpers
def _fmt(vals: list[float], digits: int = 3) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{stats.mean(vals):.{digits}f} ± {stats.std(vals):.{digits}f}"


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _groups(runs: list[RunData], factor) -> dict[Any, list[RunData]]:
    out: dict[Any, list[RunData]] = {v: [] for v in factor.values}
    for r in runs:
        out.setdefault(r.point[factor.name], []).append(r)
    return out


def _vals(runs: list[RunData], fn: Callable[[RunData], float | None]) -> list[float]:
    out = []
    for r in runs:
        v = fn(r)
        if v is not None and math.isfinite(v):
            out.append(float(v))
    return out


def _curve(label: str, xs: list[float], groups: list[list[float]]) -> Curve:
    keep = [(x, g) for x, g in zip(xs, groups) if g]
    return Curve(label, [x for x, _ in keep], [stats.mean(g) for _, g in keep],
                 [stats.std(g) if len(g) > 1 else 0.0 for _, g in keep],
                 [(x, v) for x, g in keep for v in g])


def _job_data(r: RunData, job: str):
    return r.jobs.get(job)


def _last(job: str, metric: str, k: int = 1):
    def fn(r: RunData):
        d = _job_data(r, job)
        return d.last(metric, k) if d is not None else None
    return fn


def _first(job: str, metric: str, k: int = 1):
    def fn(r: RunData):
        d = _job_data(r, job)
        return d.first(metric, k) if d is not None else None
    return fn


def _gain(job: str, metric: str):
    def fn(r: RunData):
        d = _job_data(r, job)
        if d is None:
            return None
        a, b = d.first(metric), d.last(metric)
        return None if a is None or b is None else b - a
    return fn


def _bon(job: str, n: int | None, metric: str):
    def fn(r: RunData):
        d = _job_data(r, job)
        return d.bon(n, metric) if d is not None else None
    return fn


def _series_mean(runs: list[RunData], job: str, metric: str, label: str,
                 smooth: int = 1, x_metric: str | None = None) -> Curve:
    """The mean (and std) over runs of ``metric`` against step (or cumulative ``x_metric``)."""
    by_x: dict[float, list[float]] = {}
    for r in runs:
        d = _job_data(r, job)
        if d is None:
            continue
        for x, y in _smoothed(d, metric, smooth, x_metric):
            by_x.setdefault(round(x, 6), []).append(y)
    xs = sorted(by_x)
    return _curve(label, xs, [by_x[x] for x in xs])


def _smoothed(d, metric: str, k: int, x_metric: str | None = None) -> list[tuple[float, float]]:
    """Trailing ``k``-step mean of ``metric`` at each logged step (x: step, or the running
    sum of ``x_metric``, e.g. seconds)."""
    ser = d.series(metric)
    if x_metric is not None:
        clock, t = {}, 0.0
        for step, v in d.series(x_metric):
            t += v
            clock[step] = t
        ser = [(s, v) for s, v in ser if s in clock]
    out = []
    for i, (s, _) in enumerate(ser):
        window = [v for _, v in ser[max(0, i - k + 1): i + 1]]
        out.append((clock[s] if x_metric is not None else float(s), stats.mean(window)))
    return out


def _factor_by_suffix(factors, suffixes: tuple[str, ...]):
    for f in factors:
        if f.key.endswith(suffixes):
            return f
    return None


def _level(factor, *names: str):
    """The value of ``factor`` whose label is one of ``names`` (case-insensitive)."""
    for v in factor.values:
        if str(v).lower() in names:
            return v
    return None


# ------------------------------------------------------------------------------ the findings
class Finding:
    """One finding: its claim, settings (``analysis:`` of the study file) and analysis."""

    name = ""
    title = ""
    claim = ""
    source = "Does RLHF Scale? (methods.md section 4)"
    defaults: dict[str, Any] = {}
    jobs: tuple[str, ...] = ()  # settings of `analysis` that name jobs
    factors = (1, 1)  # how many factors the sweep must have (min, max)

    def params(self, analysis: dict[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **analysis}

    def check(self, spec) -> None:
        """The study file gives what the analysis reads (raises StudyError)."""
        bad = [k for k in spec.analysis if k not in self.defaults]
        if bad:
            raise StudyError(f"analysis.{bad[0]}: not a setting of study {self.name} (its "
                             f"settings: {', '.join(self.defaults) or 'none'})")
        p = self.params(spec.analysis)
        for k in self.jobs:
            if p[k] not in spec.jobs:
                raise StudyError(f"analysis.{k} = {p[k]!r} names no job of this study (jobs: "
                                 f"{', '.join(spec.jobs)}); set analysis.{k}")
        lo, hi = self.factors
        if not lo <= len(spec.factors) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise StudyError(f"study {self.name} sweeps {want} factor(s), the file gives "
                             f"{len(spec.factors)}; see examples/studies/{self.name}/")
        self.check_factors(spec.factors, p)

    def check_factors(self, factors, p) -> None:
        pass

    def analyze(self, runs: list[RunData], factors, analysis: dict[str, Any]) -> Analysis:
        raise NotImplementedError


def _numeric_factor(factors, name: str, min_levels: int):
    f = factors[0]
    if any(_num(v) is None for v in f.values):
        raise StudyError(f"sweep.factors.{f.name}: study {name} needs numeric values (or "
                         "numeric variant labels, e.g. the model size)")
    if len(f.values) < min_levels:
        raise StudyError(f"sweep.factors.{f.name}: study {name} needs at least {min_levels} "
                         "values")


class ResponsesPerPrompt(Finding):
    name = "responses_per_prompt"
    title = "More responses per prompt improves the policy, mostly from 1 to 4 (finding 1)"
    claim = ("More responses per prompt improves the policy, with most of the gain from 1 to 4 "
             "and a plateau by 8 to 16.")
    defaults = {"job": "rl", "metric": "eval/accuracy", "knee": 4}
    jobs = ("job",)

    def check_factors(self, factors, p):
        _numeric_factor(factors, self.name, 3)

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        levels = sorted(f.values, key=_num)
        g = _groups(runs, f)
        final = {v: _vals(g.get(v, []), _last(p["job"], p["metric"])) for v in levels}
        start = {v: _vals(g.get(v, []), _first(p["job"], p["metric"])) for v in levels}
        lo, hi = levels[0], levels[-1]
        knee = min(levels[1:-1], key=lambda v: abs(math.log(_num(v) / p["knee"]))
                   if _num(v) > 0 and p["knee"] > 0 else abs(_num(v) - p["knee"]))
        e = {v: stats.estimate(final[v]) for v in levels}
        low, high = e[knee] - e[lo], e[hi] - e[knee]
        early_more = e[knee].scaled(2) - e[lo] - e[hi]  # low - high, SEs combined once
        verdict = Verdict(
            judge(low.shown() and early_more.shown(),
                  low.contradicted() or early_more.contradicted()),
            f"{p['metric']} gain N={lo}->{knee}: {low.text()}; N={knee}->{hi}: {high.text()}; "
            f"difference (early - late): {early_more.text()}",
            f"reproduced when the early gain and (early - late) are both > {stats.Z:g} SE; "
            f"not reproduced when either is < -{stats.Z:g} SE",
            {"gain_low": low.value, "gain_low_se": low.se, "gain_high": high.value,
             "gain_high_se": high.se, "early_minus_late": early_more.value,
             "early_minus_late_se": early_more.se})
        rows = [[str(v), str(len(final[v])), _fmt(start[v]), _fmt(final[v])] for v in levels]
        panel = Panel(f"{p['metric']} after RL vs responses per prompt", f"N ({f.key})",
                      p["metric"], [_curve("final (mean ± std over seeds)",
                                           [_num(v) for v in levels],
                                           [final[v] for v in levels])], xlog=True)
        return Analysis(["N", "runs", f"initial {p['metric']}", f"final {p['metric']}"], rows,
                        [panel], verdict)


class RewardModelSize(Finding):
    name = "reward_model_size"
    title = "A larger reward model helps RL far less than best-of-N (finding 2)"
    claim = "A larger reward model helps policy training, far less than it helps best-of-N."
    defaults = {"bon_job": "bon", "rl_job": "rl", "n": None, "metric": "eval/accuracy"}
    jobs = ("bon_job", "rl_job")

    def check_factors(self, factors, p):
        _numeric_factor(factors, self.name, 2)

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        levels = sorted(f.values, key=_num)
        g = _groups(runs, f)
        bon = {v: _vals(g.get(v, []), _bon(p["bon_job"], p["n"], "accuracy")) for v in levels}
        rl = {v: _vals(g.get(v, []), _last(p["rl_job"], p["metric"])) for v in levels}
        lo, hi = levels[0], levels[-1]
        d_bon = stats.difference(bon[hi], bon[lo])
        d_rl = stats.difference(rl[hi], rl[lo])
        gap = d_bon - d_rl
        verdict = Verdict(
            judge(d_bon.shown() and gap.shown(), d_bon.contradicted() or gap.contradicted()),
            f"largest vs smallest RM ({hi} vs {lo}): best-of-N accuracy {d_bon.text()}, RL "
            f"policy {p['metric']} {d_rl.text()}; best-of-N gain - RL gain: {gap.text()}",
            f"reproduced when the best-of-N gain and (best-of-N gain - RL gain) are both > "
            f"{stats.Z:g} SE; not reproduced when either is < -{stats.Z:g} SE",
            {"bon_gain": d_bon.value, "bon_gain_se": d_bon.se, "rl_gain": d_rl.value,
             "rl_gain_se": d_rl.se, "gap": gap.value, "gap_se": gap.se})
        rows = [[str(v), str(len(rl[v])), _fmt(bon[v]), _fmt(rl[v])] for v in levels]
        xs = [_num(v) for v in levels]
        panel = Panel("Reward model size: best-of-N vs RL", f"RM size ({f.key})", "accuracy",
                      [_curve("best-of-N accuracy", xs, [bon[v] for v in levels]),
                       _curve(f"RL policy {p['metric']}", xs, [rl[v] for v in levels])],
                      xlog=True)
        return Analysis(["RM size", "runs", "best-of-N accuracy", f"RL {p['metric']}"], rows,
                        [panel], verdict)


class PolicySize(Finding):
    name = "policy_size"
    title = "Larger policies gain less from RLHF with a fixed reward (finding 3)"
    claim = "Larger policies gain less from RLHF with a fixed reward model."
    defaults = {"job": "rl", "metric": "eval/accuracy"}
    jobs = ("job",)

    def check_factors(self, factors, p):
        _numeric_factor(factors, self.name, 2)

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        levels = sorted(f.values, key=_num)
        g = _groups(runs, f)
        gain = {v: _vals(g.get(v, []), _gain(p["job"], p["metric"])) for v in levels}
        start = {v: _vals(g.get(v, []), _first(p["job"], p["metric"])) for v in levels}
        final = {v: _vals(g.get(v, []), _last(p["job"], p["metric"])) for v in levels}
        xs = [math.log2(_num(v)) for v in levels for _ in gain[v]]
        ys = [y for v in levels for y in gain[v]]
        s = stats.slope(xs, ys)
        verdict = Verdict(
            judge(s.contradicted(), s.shown()),  # the claim: the slope is negative
            f"slope of the RL gain in {p['metric']} per doubling of the policy size: "
            f"{s.text(4)} over {len(ys)} runs",
            f"reproduced when the slope is < -{stats.Z:g} SE; not reproduced when > "
            f"{stats.Z:g} SE",
            {"slope": s.value, "slope_se": s.se})
        rows = [[str(v), str(len(gain[v])), _fmt(start[v]), _fmt(final[v]), _fmt(gain[v])]
                for v in levels]
        panel = Panel("RL gain vs policy size", f"policy size ({f.key})",
                      f"gain in {p['metric']} (final - initial)",
                      [_curve("gain (mean ± std over seeds)", [_num(v) for v in levels],
                              [gain[v] for v in levels])], xlog=True)
        return Analysis(["policy size", "runs", "initial", "final", "gain"], rows, [panel],
                        verdict)


class EarlyDownstream(Finding):
    name = "early_downstream"
    title = "Downstream gains come early; training reward keeps rising (finding 4)"
    claim = "Downstream gains come early; training reward keeps rising after downstream plateaus."
    defaults = {"job": "rl", "eval_metric": "eval/accuracy", "reward_metric": "reward/raw_mean",
                "window": 5}
    jobs = ("job",)
    factors = (0, 0)

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        rows, early_e, late_e, late_r = [], [], [], []
        for r in runs:
            d = _job_data(r, p["job"])
            ev = d.series(p["eval_metric"]) if d is not None else []
            rew = _smoothed(d, p["reward_metric"], p["window"]) if d is not None else []
            if len(ev) < 3 or not rew:
                continue
            end = ev[-1][0]
            mid = min(ev, key=lambda sv: abs(sv[0] - end / 2))
            e0, em, ee = ev[0][1], mid[1], ev[-1][1]

            def reward_at(step):  # the trailing-window mean at the last logged step <= step
                before = [v for s, v in rew if s <= step]
                return before[-1] if before else rew[0][1]
            r0 = rew[min(p["window"], len(rew)) - 1][1]  # the first full window
            rm, re = reward_at(mid[0]), rew[-1][1]
            early_e.append(em - e0)
            late_e.append(ee - em)
            late_r.append(re - rm)
            rows.append([r.label, f"{e0:.3f}", f"{em:.3f} (step {mid[0]})", f"{ee:.3f}",
                         f"{r0:.3f}", f"{rm:.3f}", f"{re:.3f}"])
        diff = stats.estimate([a - b for a, b in zip(early_e, late_e)])
        lr = stats.estimate(late_r)
        verdict = Verdict(
            judge(diff.shown() and lr.shown(), diff.contradicted() or lr.contradicted()),
            f"eval gain first half - second half: {diff.text()}; training reward gain in the "
            f"second half: {lr.text()} ({len(late_r)} runs)",
            f"reproduced when (early - late eval gain) and the late reward gain are both > "
            f"{stats.Z:g} SE; not reproduced when either is < -{stats.Z:g} SE",
            {"early_minus_late_eval": diff.value, "early_minus_late_eval_se": diff.se,
             "late_reward_gain": lr.value, "late_reward_gain_se": lr.se})
        panel = Panel("Downstream accuracy and training reward over training", "step",
                      "accuracy / reward",
                      [_series_mean(runs, p["job"], p["eval_metric"], f"{p['eval_metric']} "
                                    "(held-out)"),
                       _series_mean(runs, p["job"], p["reward_metric"],
                                    f"{p['reward_metric']} (train, {p['window']}-step mean)",
                                    smooth=p["window"])])
        return Analysis(["run", "eval start", "eval mid", "eval end", "reward start",
                         "reward mid", "reward end"], rows, [panel], verdict)


class RMDataDiversity(Finding):
    name = "rm_data_diversity"
    title = "More distinct prompts beat more responses per prompt for RM data (finding 5)"
    claim = ("For RM data, more distinct prompts beats more responses per prompt at equal "
             "size.")
    defaults = {"job": "rm", "metric": "rm/eval_pair_accuracy"}
    jobs = ("job",)
    factors = (2, 2)

    def _pair(self, factors):
        pf = _factor_by_suffix(factors, ("rm_num_prompts",))
        rf = _factor_by_suffix(factors, ("rm_responses_per_prompt",))
        if pf is None or rf is None or any(_num(v) is None for v in pf.values + rf.values):
            raise StudyError(f"study {self.name} sweeps <rm job>.data.rm_num_prompts and "
                             "<rm job>.data.rm_responses_per_prompt (numbers)")
        return pf, rf

    def check_factors(self, factors, p):
        self._pair(factors)

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        pf, rf = self._pair(factors)
        cell: dict[tuple, list[float]] = {}
        for r in runs:
            v = _last(p["job"], p["metric"])(r)
            if v is not None:
                cell.setdefault((_num(r.point[pf.name]), _num(r.point[rf.name])), []).append(v)
        keys = sorted(cell)
        diffs = []
        for (P1, R1) in keys:  # equal size: P1*R1 == P2*R2 with P1 > P2 (more prompts)
            for (P2, R2) in keys:
                if P1 > P2 and P1 * R1 == P2 * R2:
                    diffs.append(((P1, R1), (P2, R2),
                                  stats.difference(cell[(P1, R1)], cell[(P2, R2)])))
        if diffs:
            pooled = Estimate(stats.mean([d.value for *_, d in diffs]),
                              math.sqrt(sum(d.se ** 2 for *_, d in diffs)) / len(diffs))
        else:
            pooled = Estimate(math.nan, math.nan)
        pairs = "; ".join(f"{int(a[0])}x{int(a[1])} vs {int(b[0])}x{int(b[1])}: {d.text()}"
                          for a, b, d in diffs) or "no two cells of equal size"
        verdict = Verdict(
            judge(pooled.shown(), pooled.contradicted()),
            f"{p['metric']}, more prompts minus more responses per prompt at equal size: "
            f"{pooled.text()} ({pairs})",
            f"reproduced when the difference is > {stats.Z:g} SE; not reproduced when < "
            f"-{stats.Z:g} SE",
            {"diff": pooled.value, "diff_se": pooled.se})
        rows = [[str(int(P)), str(int(R)), str(int(P * R)), str(len(cell[(P, R)])),
                 _fmt(cell[(P, R)])] for P, R in keys]
        curves = []
        for R in sorted({R for _, R in keys}):
            ks = [k for k in keys if k[1] == R]
            curves.append(_curve(f"{int(R)} response(s) per prompt", [P * R for P, _ in ks],
                                 [cell[k] for k in ks]))
        panel = Panel("Reward model accuracy vs data size", "responses (prompts x per prompt)",
                      p["metric"], curves, xlog=True)
        return Analysis(["prompts", "responses/prompt", "size", "runs", p["metric"]], rows,
                        [panel], verdict)


class PRMvsORM(Finding):
    name = "prm_vs_orm"
    title = "A PRM beats an ORM in best-of-N on its task but generalises worse (finding 6)"
    claim = "A PRM beats an ORM in best-of-N on its own task but generalises worse."
    defaults = {"own_job": "bon_own", "other_job": "bon_other", "n": None}
    jobs = ("own_job", "other_job")

    def check_factors(self, factors, p):
        f = factors[0]
        if _level(f, "prm") is None or _level(f, "orm") is None:
            raise StudyError(f"sweep.factors.{f.name}: study {self.name} compares the values "
                             "orm and prm (e.g. rm.reward.rm_type: [orm, prm])")

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        g = _groups(runs, f)
        prm, orm = _level(f, "prm"), _level(f, "orm")
        own = {v: _vals(g.get(v, []), _bon(p["own_job"], p["n"], "accuracy"))
               for v in (orm, prm)}
        other = {v: _vals(g.get(v, []), _bon(p["other_job"], p["n"], "accuracy"))
                 for v in (orm, prm)}
        d_own = stats.difference(own[prm], own[orm])
        d_other = stats.difference(other[prm], other[orm])
        shrink = d_own - d_other
        verdict = Verdict(
            judge(d_own.shown() and shrink.shown(),
                  d_own.contradicted() or shrink.contradicted()),
            f"best-of-N accuracy PRM - ORM on its own task: {d_own.text()}; on the other "
            f"task: {d_other.text()}; own - other: {shrink.text()}",
            f"reproduced when PRM - ORM on its own task and (own - other) are both > "
            f"{stats.Z:g} SE; not reproduced when either is < -{stats.Z:g} SE",
            {"own": d_own.value, "own_se": d_own.se, "other": d_other.value,
             "other_se": d_other.se, "own_minus_other": shrink.value,
             "own_minus_other_se": shrink.se})
        rows = [[str(v), str(len(own[v])), _fmt(own[v]), _fmt(other[v])] for v in (orm, prm)]
        curves = [_curve(str(v).upper(), [0.0, 1.0], [own[v], other[v]]) for v in (orm, prm)]
        panel = Panel("Best-of-N accuracy: own task vs another task", "task", "accuracy",
                      curves, xticks=[(0.0, "own task"), (1.0, "other task")])
        return Analysis(["reward model", "runs", "best-of-N (own task)",
                         "best-of-N (other task)"], rows, [panel], verdict)


class PPOvsGRPO(Finding):
    name = "ppo_vs_grpo"
    title = "PPO and GRPO end close; GRPO drifts further in KL and length (finding 7)"
    claim = "PPO and GRPO end close; GRPO drifts further in KL and response length."
    defaults = {"job": "rl", "reward_metric": "reward/raw_mean", "kl_metric": "policy/kl_ref",
                "length_metric": "policy/response_length", "last": 5}
    jobs = ("job",)

    def check_factors(self, factors, p):
        f = factors[0]
        if _level(f, "ppo") is None or _level(f, "grpo") is None:
            raise StudyError(f"sweep.factors.{f.name}: study {self.name} compares the values "
                             "ppo and grpo (variants labelled ppo and grpo)")

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        g = _groups(runs, f)
        ppo, grpo = _level(f, "ppo"), _level(f, "grpo")
        k, job = p["last"], p["job"]

        def drift(metric):
            def fn(r):
                d = _job_data(r, job)
                if d is None or d.first(metric) is None:
                    return None
                return d.last(metric, k) - d.first(metric, k)
            return fn
        rew = {v: _vals(g.get(v, []), _last(job, p["reward_metric"], k)) for v in (ppo, grpo)}
        kl = {v: _vals(g.get(v, []), _last(job, p["kl_metric"], k)) for v in (ppo, grpo)}
        ln = {v: _vals(g.get(v, []), drift(p["length_metric"])) for v in (ppo, grpo)}
        d_r = stats.difference(rew[grpo], rew[ppo])
        sd = stats.pooled_std([rew[ppo], rew[grpo]])
        d_kl = stats.difference(kl[grpo], kl[ppo])
        d_len = stats.difference(ln[grpo], ln[ppo])
        close = math.isfinite(sd) and abs(d_r.value) <= stats.Z * sd
        far = math.isfinite(sd) and abs(d_r.value) > stats.Z * sd and (
            d_r.shown() or d_r.contradicted())
        grpo_drifts = d_kl.shown() or d_len.shown()
        ppo_drifts = (d_kl.contradicted() or d_len.contradicted()) and not grpo_drifts
        verdict = Verdict(
            judge(close and grpo_drifts, far or ppo_drifts),
            f"final {p['reward_metric']} (last {k} steps) GRPO - PPO: {d_r.text()}, pooled std "
            f"{sd:.3f}; final {p['kl_metric']} GRPO - PPO: {d_kl.text(4)}; "
            f"{p['length_metric']} drift GRPO - PPO: {d_len.text(2)}",
            f"reproduced when |reward difference| <= {stats.Z:g} pooled std and GRPO's KL or "
            f"length drift exceeds PPO's by > {stats.Z:g} SE; not reproduced when the rewards "
            f"differ by more than {stats.Z:g} pooled std (and > {stats.Z:g} SE) or PPO drifts "
            "further",
            {"reward_diff": d_r.value, "reward_diff_se": d_r.se, "pooled_std": sd,
             "kl_diff": d_kl.value, "kl_diff_se": d_kl.se, "length_drift_diff": d_len.value,
             "length_drift_diff_se": d_len.se})
        rows = [[str(v), str(len(rew[v])), _fmt(rew[v]), _fmt(kl[v], 4), _fmt(ln[v], 2)]
                for v in (ppo, grpo)]
        panels = [Panel(title, "step", metric,
                        [_series_mean(g.get(v, []), job, metric, str(v).upper(), smooth=sm)
                         for v in (ppo, grpo)])
                  for title, metric, sm in (("Training reward", p["reward_metric"], k),
                                            ("KL to the reference", p["kl_metric"], k),
                                            ("Response length", p["length_metric"], k))]
        return Analysis(["method", "runs", f"final {p['reward_metric']}",
                         f"final {p['kl_metric']}", "length drift"], rows, panels, verdict)


class Staleness(Finding):
    name = "staleness"
    title = "Off-policy tolerance: online DPO is the most robust to staleness K"
    claim = ("Online DPO tolerates off-policy (stale) data best: its final reward falls least "
             "as the staleness K grows (PPO, RLOO and online DPO at K = 0, 1, 2, 4).")
    source = "Asynchronous RLHF (methods.md section 3)"
    defaults = {"job": "rl", "metric": "reward/raw_mean", "last": 5, "robust": "dpo",
                "staleness_metric": "rollout/staleness"}
    jobs = ("job",)
    factors = (2, 2)

    def _pair(self, factors):
        kf = _factor_by_suffix(factors, ("max_staleness",))
        mf = next((f for f in factors if f is not kf), None)
        if kf is None or mf is None or any(_num(v) is None for v in kf.values):
            raise StudyError(f"study {self.name} sweeps <job>.asynchronous.max_staleness "
                             "(numbers) and the algorithm (variants)")
        return mf, kf

    def check_factors(self, factors, p):
        mf, kf = self._pair(factors)
        if _level(mf, str(p["robust"]).lower()) is None or len(mf.values) < 2:
            raise StudyError(f"sweep.factors.{mf.name}: study {self.name} needs the value "
                             f"{p['robust']!r} (analysis.robust) and at least one other")
        if len(kf.values) < 2:
            raise StudyError(f"sweep.factors.{kf.name}: give at least two staleness values")

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        mf, kf = self._pair(factors)
        ks = sorted(kf.values, key=_num)
        robust = _level(mf, str(p["robust"]).lower())
        fn = _last(p["job"], p["metric"], p["last"])
        sm = p["staleness_metric"]
        # K is a bound: the x axis is the staleness each run measured (its mean over the run),
        # which stays below K where the rollout is the slower side unless the runs set
        # asynchronous.fixed_staleness.
        points = {}  # per run: (its mean measured staleness, its final metric)
        for r in runs:
            d = _job_data(r, p["job"])
            v = d.values(sm) if d is not None else []
            if d is not None and d.rows and not v:
                raise StudyError(f"run {r.label or r.point}: job {p['job']} logged no {sm}; study "
                                 f"{self.name} fits the final {p['metric']} against the "
                                 f"staleness each run measured (analysis.staleness_metric)")
            y = fn(r)
            if v and y is not None and math.isfinite(y):
                points[id(r)] = (stats.mean(v), float(y))
        slopes, curves, rows = {}, [], []
        for m in mf.values:
            per_k = {k: [points[id(r)] for r in runs if id(r) in points
                         and r.point[mf.name] == m and r.point[kf.name] == k] for k in ks}
            mine = [pt for k in ks for pt in per_k[k]]
            slopes[m] = stats.slope([x for x, _ in mine], [y for _, y in mine])
            xs = [stats.mean([x for x, _ in per_k[k]]) if per_k[k] else _num(k) for k in ks]
            ys = [[y for _, y in per_k[k]] for k in ks]
            curves.append(_curve(str(m), xs, ys))
            rows.append([str(m)] + [f"{_fmt(y)} (staleness {x:.2f})" if y else "-"
                                    for x, y in zip(xs, ys)] + [slopes[m].text(4)])
        others = [m for m in mf.values if m != robust]
        diffs = {m: slopes[robust] - slopes[m] for m in others}
        verdict = Verdict(
            judge(all(d.shown() for d in diffs.values()),
                  any(d.contradicted() for d in diffs.values())),
            "slope of final " + p["metric"] + " per unit of measured staleness: "
            + "; ".join(f"{m}: {slopes[m].text(4)}" for m in mf.values)
            + "; " + "; ".join(f"{robust} - {m}: {d.text(4)}" for m, d in diffs.items()),
            f"reproduced when {robust}'s slope exceeds every other algorithm's by > "
            f"{stats.Z:g} SE; not reproduced when it is below any by > {stats.Z:g} SE",
            {**{f"slope_{m}": slopes[m].value for m in mf.values},
             **{f"slope_{m}_se": slopes[m].se for m in mf.values},
             **{f"diff_{m}": d.value for m, d in diffs.items()},
             **{f"diff_{m}_se": d.se for m, d in diffs.items()}})
        panel = Panel(f"Final {p['metric']} vs staleness", f"staleness ({sm}, run mean)",
                      f"final {p['metric']} (last {p['last']} steps)", curves)
        return Analysis(["algorithm"] + [f"K={k}" for k in ks] + ["slope per unit"], rows,
                        [panel], verdict)


class AsyncSpeedup(Finding):
    name = "async_speedup"
    title = "Asynchronous RL reaches the synchronous final reward faster (wall-clock)"
    claim = ("Asynchronous (off-policy, K = 1) training reaches the synchronous run's final "
             "reward in less wall-clock time (about 40% faster for LLaMA 3.1 8B).")
    source = "Asynchronous RLHF (methods.md section 3)"
    defaults = {"job": "rl", "metric": "reward/raw_mean", "window": 5, "clock": "time/step"}
    jobs = ("job",)

    def _levels(self, f):
        a = _level(f, "async", "true", "1", "1.0")
        s = _level(f, "sync", "false", "0", "0.0")
        return s, a

    def check_factors(self, factors, p):
        s, a = self._levels(factors[0])
        if s is None or a is None:
            raise StudyError(f"sweep.factors.{factors[0].name}: study {self.name} compares "
                             "sync and async (asynchronous.enabled: [false, true], or variants "
                             "labelled sync and async)")

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0]
        s_lvl, a_lvl = self._levels(f)
        job, w, clock = p["job"], p["window"], p["clock"]
        g = _groups(runs, f)
        curves = {}
        for r in g.get(s_lvl, []) + g.get(a_lvl, []):
            d = _job_data(r, job)
            if d is not None:
                curves[id(r)] = _smoothed(d, p["metric"], w, clock)
        finals = [curves[id(r)][-1][1] for r in g.get(s_lvl, []) if curves.get(id(r))]
        target = stats.mean(finals)

        def reach(r) -> tuple[float, bool]:
            c = curves.get(id(r)) or []
            for t, v in c:
                if v >= target:
                    return t, True
            return (c[-1][0] if c else math.nan), False
        rows, logs = [], []
        by_seed = {r.seed: r for r in g.get(s_lvl, [])}
        for r in g.get(a_lvl, []):
            sr = by_seed.get(r.seed)
            if sr is None:
                continue
            (ts, ok_s), (ta, ok_a) = reach(sr), reach(r)
            if not (ts > 0 and ta > 0):
                continue
            logs.append(math.log(ts / ta))
            rows.append([str(r.seed), f"{ts:.1f}" + ("" if ok_s else " (not reached)"),
                         f"{ta:.1f}" + ("" if ok_a else " (not reached: total)"),
                         f"{ts / ta:.2f}x", f"{curves[id(sr)][-1][1]:.3f}",
                         f"{curves[id(r)][-1][1]:.3f}"])
        e = stats.estimate(logs)
        ratio = math.exp(e.value) if e.value == e.value else math.nan
        verdict = Verdict(
            judge(e.shown(), e.contradicted()),
            f"wall-clock to the sync final {p['metric']} ({target:.3f}, {w}-step mean): sync / "
            f"async = {ratio:.2f}x (geometric mean over {len(logs)} seed pairs; log ratio "
            f"{e.text()}): async took "
            + (f"{100 * (1 - 1 / ratio):.0f}% less time" if ratio >= 1
               else f"{100 * (1 / ratio - 1):.0f}% more time" if ratio == ratio else "?"),
            f"reproduced when log(sync time / async time) > {stats.Z:g} SE; not reproduced "
            f"when < -{stats.Z:g} SE (clock: running sum of {clock})",
            {"speedup": ratio, "log_ratio": e.value, "log_ratio_se": e.se, "target": target})
        panel = Panel(f"{p['metric']} vs wall-clock", f"seconds (running sum of {clock})",
                      f"{p['metric']} ({w}-step mean)",
                      [Curve(f"{name} (seed {r.seed})", [t for t, _ in curves[id(r)]],
                             [v for _, v in curves[id(r)]], [0.0] * len(curves[id(r)]),
                             color=c)
                       for lvl, name, c in ((s_lvl, "sync", 0), (a_lvl, "async", 1))
                       for r in g.get(lvl, []) if curves.get(id(r))])
        return Analysis(["seed", "sync: s to target", "async: s to target", "speed-up",
                         "sync final", "async final"], rows, [panel], verdict,
                        notes=["the wall-clock of a run is the running sum of its "
                               f"{clock} (the training loop; start-up excluded)"])


class Custom(Finding):
    """A sweep without a finding: final metrics against the first factor, no verdict."""

    name = "custom"
    title = "A sweep (no finding): final metrics against the factor"
    claim = "(none: a plain sweep; the verdict is always n/a)"
    source = "-"
    defaults = {"job": None, "metrics": ["eval/accuracy"], "last": 1}
    factors = (0, 2)

    def check(self, spec) -> None:
        super().check(spec)
        p = self.params(spec.analysis)
        if p["job"] not in spec.jobs:
            raise StudyError(f"analysis.job = {p['job']!r}: name the job whose metrics to "
                             f"tabulate (jobs: {', '.join(spec.jobs)})")
        if not (isinstance(p["metrics"], list) and p["metrics"]
                and all(isinstance(m, str) for m in p["metrics"])):
            raise StudyError("analysis.metrics: give a list of metric names, e.g. "
                             "[sft/loss]")

    def analyze(self, runs, factors, analysis):
        p = self.params(analysis)
        f = factors[0] if factors else None
        groups = _groups(runs, f) if f is not None else {"all": runs}
        rows, curves = [], []
        for m in p["metrics"]:
            vals = {v: _vals(rs, _last(p["job"], m, p["last"])) for v, rs in groups.items()}
            xs = [(_num(v) if _num(v) is not None else float(i)) for i, v in enumerate(groups)]
            curves.append(_curve(m, xs, list(vals.values())))
            rows += [[m, str(v), str(len(vs)), _fmt(vs, 4)] for v, vs in vals.items()]
        xlabel = f.key if f is not None else "-"
        panel = Panel("Final metrics", xlabel, "value", curves,
                      xticks=None if f is None or all(_num(v) is not None for v in f.values)
                      else [(float(i), str(v)) for i, v in enumerate(f.values)])
        return Analysis(["metric", xlabel, "runs", "final (mean ± std)"], rows, [panel],
                        Verdict("n/a", "a plain sweep measures no finding", "none"))


FINDINGS: dict[str, Finding] = {f.name: f for f in (
    ResponsesPerPrompt(), RewardModelSize(), PolicySize(), EarlyDownstream(),
    RMDataDiversity(), PRMvsORM(), PPOvsGRPO(), Staleness(), AsyncSpeedup(), Custom())}
