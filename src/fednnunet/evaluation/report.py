"""The paper's comparison as files: results.json, a Markdown table with Wilcoxon tests, and PNG plots.

Why a module of its own: the benchmark compares four ways of training (``local``, ``centralized``, ``ffe``,
``asym``) site by site, and the comparison must be computed the same way however the predictions were made.
Everything here works on plain per-case numbers, so it is tested without training and can re-score saved
predictions (an independent check of a ``results.json``).

``results.json`` schema (``build_repeated_results``; ``build_results`` is the one-repeat case)::

    {"methods": {METHOD: {SITE: {"dsc": mean, "hd95": mean, "cases": n,
                                 "per_case": [{"case": id, "dsc": d, "hd95": h, ...}, ...],
                                 "repeats": R, "dsc_repeats": [site mean per repeat], "dsc_sd": sd | null,
                                 "hd95_repeats": [...], "hd95_sd": sd | null}}},
     "repeats": [{"index": k, "seed": s | null, "methods": {METHOD: {SITE: {"dsc", "hd95", "cases", "per_case"}}}}],
     "wilcoxon": {"ffe_vs_local": {"a": "ffe", "b": "local",
                                   "sites": {SITE: {"p": p | null, "statistic": s | null, "n": paired cases,
                                                    "mean_diff": mean(a - b) | null, "reason": null | why}}},
                  ...},
     "intervals": {"ffe_vs_centralized": {"a", "b", "margin", "level", "n_boot",
                                          "sites": {SITE: {"mean_diff", "ci_low", "ci_high", "n_cases",
                                                           "n_repeats", "non_inferior", "within_margin"}}}, ...},
     "command": "...", "budget": {...}, "external_sites": [...]}

Per case, ``dsc`` and ``hd95`` are the means over the foreground classes (``metrics.evaluate_case``); a site's
``dsc``/``hd95`` are means over its cases. Empty-mask conventions are those of ``metrics`` (always finite).
With several training repeats, ``methods`` holds per case the mean over the repeats (the Wilcoxon tests use
those), ``dsc_sd`` the standard deviation (ddof 1) of the site's mean DSC over the repeats, and ``repeats``
every repeat as it was scored. ``intervals``: FFE vs centralized and FFE vs local, every FFE variant vs FFE and the
personalized ``ffe-ft``, ``ffe-bn`` and ``ffe-bn-ft`` vs local too, the paired DSC difference with a 95 % two-stage
bootstrap interval over cases and repeats and its reading at the 0.01 margin (``intervals.py``).

Statistics: two-tailed Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, default ``zero_method='wilcox'``,
``method='auto'``: exact distribution for small samples without ties) on per-case DSC paired by case id, as in the
paper: FFE vs local, FFE vs centralized, AsymFedAvg vs local, per site. No p-value (``None`` with the reason) when
fewer than two cases pair up or every paired difference is zero (the test statistic is undefined; scipy would
warn and return NaN). Note that with n paired cases the smallest possible exact two-sided p is ``2 / 2**n``: at
least 6 cases are needed for p < 0.05.

All files are written atomically (temporary file in the same folder, then ``os.replace``), so a crashed or
interrupted benchmark never leaves a truncated results file that looks complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fednnunet.atomic_files import write_atomic
from fednnunet.evaluation.metrics import evaluate_folder, reader_from_dataset_json

logger = logging.getLogger(__name__)

__all__ = [
    "METHOD_NAMES",
    "COMPARISONS",
    "PRIVACY_PRESERVING",
    "evaluate_predictions",
    "site_entry",
    "split_by_prefix",
    "build_results",
    "build_repeated_results",
    "interval_table",
    "compare_runs",
    "wilcoxon_table",
    "write_results_json",
    "write_markdown",
    "markdown_table",
    "plot_dsc",
    "plot_training_curves",
    "read_round_records",
]

#: The FFE variants of the benchmark (evaluation/benchmark.py), each compared with FFE.
FFE_VARIANT_NAMES: dict[str, str] = {"ffe16": "FFE (16-bit transfer)", "ffe-uniform": "FFE (uniform weights)",
                                     "ffe-often": "FFE (averaging 5 x as often)",
                                     "ffe-mom-reset": "FFE (site momentum reset)",
                                     "ffe-mom-avg": "FFE (site momentum averaged)",
                                     "ffe-server-mom": "FFE (server momentum)",
                                     "ffe-clip": "FFE (update norm clipped)",
                                     "ffe-ft": "FFE + personal fine-tuning",
                                     "ffe-bn": "FFE + local normalization (FedBN)",
                                     "ffe-bn-ft": "FedBN + personal fine-tuning"}
#: Display names of the methods (as in the paper's tables); unknown methods are shown as given.
METHOD_NAMES: dict[str, str] = {"local": "Local", "centralized": "Centralized", "ffe": "FFE", "asym": "AsymFedAvg",
                                **FFE_VARIANT_NAMES}
#: Personalized methods, also compared with local: a hospital joins to get a model at least as good as its own
#: (issue 28), so its personal model is read against local at the non-inferiority margin, not only against FFE.
PERSONALIZED: tuple[str, ...] = ("ffe-ft", "ffe-bn", "ffe-bn-ft")
#: The paired tests of the paper: (method a, method b), reported as p of a vs b.
COMPARISONS: tuple[tuple[str, str], ...] = (("ffe", "local"), ("ffe", "centralized"), ("asym", "local"),
                                            *((v, "ffe") for v in FFE_VARIANT_NAMES),
                                            *((v, "local") for v in PERSONALIZED))
#: The paired differences with confidence intervals (bootstrap over cases and repeats): (a, b) = DSC a - DSC b.
INTERVAL_COMPARISONS: tuple[tuple[str, str], ...] = (("ffe", "centralized"), ("ffe", "local"),
                                                     *((v, "ffe") for v in FFE_VARIANT_NAMES),
                                                     *((v, "local") for v in PERSONALIZED))
#: How the paired intervals are computed (``evaluation.intervals``), as recorded in the results.
INTERVAL_METHOD = "two-stage percentile bootstrap over repeats and cases (seed 0)"
#: Methods whose images never leave a site. Centralized training is the upper bound, never bolded.
PRIVACY_PRESERVING: frozenset[str] = frozenset({"local", "ffe", "asym", *FFE_VARIANT_NAMES})
#: Display order of known methods; others follow in the order given.
_ORDER = ("local", "ffe", *FFE_VARIANT_NAMES, "asym", "centralized")


# ---------------------------------------------------------------------------------------------- file helpers


def _json_safe(obj: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to None: strict JSON, readable by any JSON parser."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results_json(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes ``results`` as strict JSON (NaN -> null), atomically."""
    text = json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n"
    out = write_atomic(path, text.encode())
    logger.info("wrote %s", out)
    return out


# ---------------------------------------------------------------------------------------------- evaluation


def _load_dataset_json(dataset_json: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(dataset_json, Mapping):
        return dict(dataset_json)
    path = Path(dataset_json)
    if path.is_dir():
        path = path / "dataset.json"
    return json.loads(path.read_text())


def _foreground_labels(dataset_json: Mapping[str, Any]) -> list[int]:
    """Integer foreground labels of ``dataset.json['labels']`` (everything but 0 / ``ignore``).

    Region-based datasets (label values that are lists of several labels) are refused: their exported
    segmentations encode regions through ``regions_class_order`` and need region masks to be scored.
    """
    labels: list[int] = []
    for name, value in dataset_json["labels"].items():
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f"region-based label {name!r}: {value} is not supported by evaluate_predictions")
            value = value[0]
        value = int(value)
        if value == 0 or name == "ignore":
            continue
        labels.append(value)
    if not labels:
        raise ValueError("dataset.json has no foreground labels")
    return sorted(set(labels))


def evaluate_predictions(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str],
                         dataset_json: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Scores every prediction in ``pred_dir`` against the label file of the same name in ``ref_dir``.

    Delegates to ``metrics.evaluate_folder`` with the dataset's foreground labels, file ending and nnU-Net's
    reader/writer for it (spacing from the reference file: HD95 in mm, or pixels for images without spacing).

    Returns:
        a site entry of ``results.json``: ``{"dsc", "hd95", "cases", "per_case": [{"case", "dsc", "hd95",
        "per_class": {"<label>": {"dsc", "hd95", "n_pred", "n_ref"}}}], "per_class": {"<label>": {"dsc", "hd95"}}}``.
    """
    dj = _load_dataset_json(dataset_json)
    labels = _foreground_labels(dj)
    file_ending = dj["file_ending"]
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    example = next((f for f in sorted(ref_dir.glob(f"*{file_ending}"))), None)
    reader = reader_from_dataset_json(dj, example)
    folder = evaluate_folder(pred_dir, ref_dir, labels, file_ending, reader=reader)
    per_case = [{"case": case, "dsc": c["mean"]["dsc"], "hd95": c["mean"]["hd95"], "per_class": c["per_class"]}
                for case, c in sorted(folder["per_case"].items())]
    entry = site_entry(per_case)
    entry["per_class"] = folder["mean"]["per_class"]
    return entry


def _per_case_list(value: Any, where: str) -> list[dict[str, Any]]:
    """Accepts a per-case list, or a site entry / ``evaluate_predictions`` result holding ``per_case``."""
    if isinstance(value, Mapping):
        if "per_case" not in value:
            raise ValueError(f"{where}: expected a list of per-case dicts or a dict with 'per_case'")
        value = value["per_case"]
    items = list(value)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not {"case", "dsc", "hd95"} <= set(item):
            raise ValueError(f"{where}: per-case entry {i} needs 'case', 'dsc' and 'hd95', got {item!r}")
        case = str(item["case"])
        if case in seen:
            raise ValueError(f"{where}: case {case!r} appears twice")
        seen.add(case)
        out.append({**item, "case": case, "dsc": float(item["dsc"]), "hd95": float(item["hd95"])})
    return out


def site_entry(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"dsc": mean, "hd95": mean, "cases": n, "per_case": [...]}`` of one method at one site.

    Means are over cases; an empty list gives ``None`` means (a site that could not be evaluated stays visible
    in the table instead of disappearing).
    """
    cases = _per_case_list(per_case, "site")
    n = len(cases)
    return {
        "dsc": float(np.mean([c["dsc"] for c in cases])) if n else None,
        "hd95": float(np.mean([c["hd95"] for c in cases])) if n else None,
        "cases": n,
        "per_case": cases,
    }


def split_by_prefix(per_case: Sequence[Mapping[str, Any]], prefixes: Mapping[str, str]) -> dict[str, list[dict]]:
    """Splits the per-case results of a pooled dataset back into sites and restores the sites' case ids.

    Why: ``data.pooled.pool_datasets`` names pooled cases ``s<dataset id>_<case>``; the Wilcoxon tests pair
    centralized with federated results by case id, so the prefix must go. ``prefixes`` maps site -> prefix
    (e.g. ``{"SiteA": "s901_"}``). Cases matching no prefix raise ``ValueError``.
    """
    out: dict[str, list[dict]] = {site: [] for site in prefixes}
    for item in _per_case_list(per_case, "pooled"):
        matches = [(site, p) for site, p in prefixes.items() if item["case"].startswith(p)]
        if not matches:
            raise ValueError(f"pooled case {item['case']!r} matches none of the prefixes {dict(prefixes)}")
        site, p = max(matches, key=lambda m: len(m[1]))  # longest prefix wins (s1_ vs s10_ cannot clash: '_')
        out[site].append({**item, "case": item["case"][len(p):]})
    return out


def _ordered_methods(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    known = [m for m in _ORDER if m in methods]
    return known + [m for m in methods if m not in _ORDER]


def _ordered_sites(results: Mapping[str, Any]) -> list[str]:
    sites: list[str] = []
    for per_site in results["methods"].values():
        for site in per_site:
            if site not in sites:
                sites.append(site)
    return sites


def build_results(methods: Mapping[str, Mapping[str, Any]], command: str, budget: Mapping[str, Any],
                  external_sites: Sequence[str] = ()) -> dict[str, Any]:
    """Assembles ``results.json`` (schema in the module docstring) and runs the Wilcoxon tests.

    Args:
        methods: ``{method: {site: per_case_list}}``; a per-case list holds dicts with at least ``case``,
            ``dsc`` and ``hd95`` (a site entry or ``evaluate_predictions`` result is accepted too). Case ids
            must be unique per site and equal across methods for the same case (pairing is by id).
        command: the exact command line that produced the results (for reruns).
        budget: the compute budget (rounds, iterations per round, folds, configuration, wall time ...).
        external_sites: sites never trained on (evaluated with the fold ensemble); marked in the table.
    """
    out_methods: dict[str, dict[str, Any]] = {}
    for method in _ordered_methods(methods):
        out_methods[method] = {}
        for site, value in methods[method].items():
            out_methods[method][str(site)] = site_entry(_per_case_list(value, f"{method}/{site}"))
    return build_repeated_results([out_methods], [None], command, budget, external_sites)


def build_repeated_results(repeats: Sequence[Mapping[str, Mapping[str, Any]]], seeds: Sequence[int | None],
                           command: str, budget: Mapping[str, Any],
                           external_sites: Sequence[str] = ()) -> dict[str, Any]:
    """``results.json`` of R training repeats (``repeats[k]``: ``{method: {site: per_case_list}}`` of the
    trainings seeded ``seeds[k]``): every repeat as scored, per case the mean over the repeats, per site the
    mean +- sd over the repeats, the Wilcoxon tests (on the per-case means) and the paired intervals."""
    if not repeats or len(repeats) != len(seeds):
        raise ValueError("one seed per repeat, and at least one repeat, are needed")
    per_repeat = [{m: {str(site): site_entry(_per_case_list(v, f"{m}/{site} (repeat {k})"))
                       for site, v in rep[m].items()} for m in _ordered_methods(rep)}
                  for k, rep in enumerate(repeats)]
    out_methods: dict[str, dict[str, Any]] = {}
    for method in per_repeat[0]:
        out_methods[method] = {}
        for site in per_repeat[0][method]:
            entries = [rep[method][site] for rep in per_repeat if site in rep.get(method, {})]
            entry = site_entry(_mean_over_repeats([e["per_case"] for e in entries]))
            for key in ("dsc", "hd95"):
                values = [e[key] for e in entries if e[key] is not None]
                entry[f"{key}_repeats"] = values
                entry[f"{key}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            entry["repeats"] = len(entries)
            out_methods[method][site] = entry
    results: dict[str, Any] = {
        "methods": out_methods,
        "repeats": [{"index": k, "seed": seed, "methods": rep} for k, (seed, rep) in enumerate(zip(seeds, per_repeat))],
        "wilcoxon": {},
        "intervals": {},
        "command": str(command),
        "budget": dict(budget),
        "external_sites": [str(s) for s in external_sites],
    }
    results["wilcoxon"] = wilcoxon_table(results)
    results["intervals"] = interval_table(results)
    return results


def _mean_over_repeats(per_case_lists: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per case id, the mean DSC and HD95 over the repeats that scored it (one repeat: the entries as they are)."""
    if len(per_case_lists) == 1:
        return [dict(c) for c in per_case_lists[0]]
    by_case: dict[str, list[Mapping[str, Any]]] = {}
    for cases in per_case_lists:
        for c in cases:
            by_case.setdefault(c["case"], []).append(c)
    return [{"case": case, "dsc": float(np.mean([c["dsc"] for c in cs])),
             "hd95": float(np.mean([c["hd95"] for c in cs])), "repeats": len(cs)} for case, cs in by_case.items()]


# ---------------------------------------------------------------------------------------------- statistics


def _wilcoxon_pair(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    da = {str(c["case"]): float(c["dsc"]) for c in a}
    db = {str(c["case"]): float(c["dsc"]) for c in b}
    common = sorted(set(da) & set(db))
    x = np.array([da[c] for c in common])
    y = np.array([db[c] for c in common])
    entry: dict[str, Any] = {"p": None, "statistic": None, "n": len(common),
                             "mean_diff": float(np.mean(x - y)) if common else None, "reason": None}
    unpaired = len(set(da) ^ set(db))
    if unpaired:
        entry["unpaired_cases"] = unpaired
    if len(common) < 2:
        entry["reason"] = f"only {len(common)} paired case(s); the test needs at least 2"
        return entry
    if np.all(x - y == 0):
        entry["reason"] = "all paired differences are zero: identical DSC per case"
        return entry
    from scipy.stats import wilcoxon

    res = wilcoxon(x, y, alternative="two-sided")
    entry["p"] = float(res.pvalue)
    entry["statistic"] = float(res.statistic)
    return entry


def wilcoxon_table(results: Mapping[str, Any],
                   comparisons: Sequence[tuple[str, str]] = COMPARISONS) -> dict[str, Any]:
    """Two-tailed Wilcoxon signed-rank p-values on paired per-case DSC, per comparison and site.

    Returns ``{"<a>_vs_<b>": {"a", "b", "sites": {site: {"p", "statistic", "n", "mean_diff", "reason"}}}}``
    for every comparison whose two methods are both in ``results``; a site that only one of them was evaluated
    on gets ``p=None`` with the reason. ``mean_diff`` is mean(DSC_a - DSC_b) over paired cases, so the sign says
    which method is better.
    """
    methods = results["methods"]
    table: dict[str, Any] = {}
    for a, b in comparisons:
        if a not in methods or b not in methods:
            logger.info("no Wilcoxon test %s vs %s: method missing from the results", a, b)
            continue
        sites: dict[str, Any] = {}
        for site in _ordered_sites(results):
            if site not in methods[a] or site not in methods[b]:
                missing = a if site not in methods[a] else b
                sites[site] = {"p": None, "statistic": None, "n": 0, "mean_diff": None,
                               "reason": f"{missing} was not evaluated on {site}"}
                continue
            sites[site] = _wilcoxon_pair(methods[a][site]["per_case"], methods[b][site]["per_case"])
        table[f"{a}_vs_{b}"] = {"a": a, "b": b, "sites": sites}
    return table


def interval_table(results: Mapping[str, Any],
                   comparisons: Sequence[tuple[str, str]] = INTERVAL_COMPARISONS) -> dict[str, Any]:
    """Per comparison and site, the paired DSC difference over every repeat with its 95 % bootstrap interval and
    the non-inferiority reading at the 0.01 margin (``intervals.paired_difference``)."""
    from fednnunet.evaluation.intervals import MARGIN, N_BOOT, paired_difference

    table: dict[str, Any] = {}
    for a, b in comparisons:
        if a not in results["methods"] or b not in results["methods"]:
            continue
        sites = {site: paired_difference(_runs(results, a, site), _runs(results, b, site))
                 for site in _ordered_sites(results)}
        table[f"{a}_vs_{b}"] = {"a": a, "b": b, "margin": MARGIN, "level": 0.95, "n_boot": N_BOOT,
                                "method": INTERVAL_METHOD, "sites": sites}
    return table


def compare_runs(results_a: Mapping[str, Any], method_a: str, results_b: Mapping[str, Any],
                 method_b: str) -> dict[str, Any]:
    """DSC(method_a in results_a) - DSC(method_b in results_b) per site both evaluated, with the interval of
    :func:`interval_table`: two benchmark runs on the same splits, paired by case and by repeat index (so the same
    seeds when both used the same ``--seed``), e.g. one method at two budgets to see whether it still improves."""
    from fednnunet.evaluation.intervals import paired_difference

    for results, method in ((results_a, method_a), (results_b, method_b)):
        if method not in results["methods"]:
            raise ValueError(f"method {method!r} is not in the results (it has {', '.join(results['methods'])})")
    sites = [s for s in _ordered_sites(results_a) if s in results_a["methods"][method_a]
             and s in results_b["methods"][method_b]]
    return {site: paired_difference(_runs(results_a, method_a, site), _runs(results_b, method_b, site))
            for site in sites}


def _runs(results: Mapping[str, Any], method: str, site: str) -> list[list[dict[str, Any]]]:
    """The per-case lists of every repeat of ``method`` at ``site``."""
    return [r["methods"][method][site]["per_case"] for r in results["repeats"] if site in r["methods"].get(method, {})]


# ---------------------------------------------------------------------------------------------- Markdown


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def markdown_table(results: Mapping[str, Any], dsc_digits: int = 3, hd95_digits: int = 2) -> str:
    """The paper-style tables (Tables 7-9) as Markdown text.

    Rows are methods, columns sites, cells ``DSC / HD95``. Per site, the best privacy-preserving value (local,
    FFE, AsymFedAvg: highest DSC and, separately, lowest HD95) is bold; ties at the displayed precision are all
    bold. Centralized training shares the data, so it is the upper bound and never bolded. A second table lists
    the Wilcoxon p-values (n = paired cases; the sign of the mean DSC difference says which method is ahead).
    """
    methods = results["methods"]
    order = _ordered_methods(methods)
    sites = _ordered_sites(results)
    external = set(results.get("external_sites") or [])

    best_dsc: dict[str, str] = {}
    best_hd: dict[str, str] = {}
    for site in sites:
        cand = [methods[m][site] for m in order if m in PRIVACY_PRESERVING and site in methods[m]]
        d = [v for v in (_fmt(c["dsc"], dsc_digits) for c in cand) if v != "n/a"]
        h = [v for v in (_fmt(c["hd95"], hd95_digits) for c in cand) if v != "n/a"]
        if d:
            best_dsc[site] = max(d, key=float)
        if h:
            best_hd[site] = min(h, key=float)

    def header(site: str) -> str:
        return f"{site} (external)" if site in external else site

    lines = ["| Method | " + " | ".join(header(s) for s in sites) + " |",
             "|---|" + "---|" * len(sites)]
    for m in order:
        cells = []
        for site in sites:
            if site not in methods[m]:
                cells.append("–")
                continue
            e = methods[m][site]
            d, h = _fmt(e["dsc"], dsc_digits), _fmt(e["hd95"], hd95_digits)
            if m in PRIVACY_PRESERVING and d == best_dsc.get(site):
                d = f"**{d}**"
            if m in PRIVACY_PRESERVING and h == best_hd.get(site):
                h = f"**{h}**"
            if e.get("dsc_sd") is not None:
                d += f" ± {_fmt(e['dsc_sd'], dsc_digits)}"
            if e.get("hd95_sd") is not None:
                h += f" ± {_fmt(e['hd95_sd'], hd95_digits)}"
            extra = f", R={e['repeats']}" if (e.get("repeats") or 1) > 1 else ""
            cells.append(f"{d} / {h} (n={e['cases']}{extra})")
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    repeats = max((e.get("repeats") or 1 for per_site in methods.values() for e in per_site.values()), default=1)
    text = ["## Segmentation results", "",
            "DSC / HD95 per site (mean over cases; HD95 in mm, or pixels where the images carry no spacing"
            + (f"; with {repeats} training repeats: mean ± sd over the repeats of the site's mean" if repeats > 1
               else "") + "). Bold: best privacy-preserving method (Local, FFE, AsymFedAvg) per site; Centralized "
            "is the upper bound that pools the data.", ""] + lines
    text += _interval_lines(results, sites, header)

    wil = results.get("wilcoxon") or {}
    if wil:
        text += ["", "## Wilcoxon signed-rank tests (two-tailed, paired per-case DSC)", "",
                 "| Comparison | " + " | ".join(header(s) for s in sites) + " |",
                 "|---|" + "---|" * len(sites)]
        text += _comparison_rows(wil, sites, " vs ", lambda e: f"n/a ({e['reason']})" if e["p"] is None else
                                 f"p = {_fmt_p(e['p'])} (n={e['n']}, ΔDSC {e['mean_diff']:+.3f})")

    text += _averaging_lines(results.get("averaging_gap") or {}, sites, header)
    if results.get("command"):
        text += ["", "Command:", "", "```", str(results["command"]), "```"]
    if results.get("budget"):
        text += ["", "Budget: " + ", ".join(f"{k} = {v}" for k, v in results["budget"].items())]
    return "\n".join(text) + "\n"


def _interval_lines(results: Mapping[str, Any], sites: Sequence[str], header: Any) -> list[str]:
    """The paired-difference table: ``+0.003 [-0.008, +0.012]`` and its reading at the margin, per site."""
    intervals = results.get("intervals") or {}
    if not intervals:
        return []
    first = next(iter(intervals.values()))
    margin = first["margin"]
    lines = ["", f"## Paired DSC differences, {first['level']:.0%} confidence intervals", "",
             f"Mean over repeats and cases of DSC(a) - DSC(b), paired by case (and repeat); interval: "
             f"{first['method']}, {first['n_boot']} replicates. Non-inferiority reading at margin {margin}: "
             f"*non-inferior* when the lower bound is above -{margin}; *within ±{margin}* when the whole interval "
             f"lies in [-{margin}, +{margin}]; *above* / *below* when the whole interval is above / below 0.", "",
             "| Difference | " + " | ".join(header(s) for s in sites) + " |", "|---|" + "---|" * len(sites)]

    def cell(e: Mapping[str, Any]) -> str:
        if e["mean_diff"] is None:
            return f"n/a ({e.get('reason')})"
        reading = ("within ±" + str(margin) if e["within_margin"] else
                   "non-inferior" if e["non_inferior"] else "not non-inferior")
        reading += "; above" if e["above"] else "; below" if e["below"] else ""
        return (f"{e['mean_diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] {reading} "
                f"(n={e['n_cases']}, R={e['n_repeats']})")

    return lines + _comparison_rows(intervals, sites, " − ", cell)


def _averaging_lines(table: Mapping[str, Any], sites: Sequence[str], header: Any) -> list[str]:
    """What averaging took from each site (``evaluation.averaging``): local -> delivered pseudo-Dice and the gap."""
    if not any(table.values()):
        return []
    lines = ["", "## What averaging costs each site (online pseudo-Dice)", "",
             "Local: the site's model after its epochs (the figure nnU-Net logs); delivered: the model it received "
             "next, validated on the same cases before training; gap = delivered - local. Means over the second "
             "half of the rounds (± sd of the gap over repeats), and the gap over the first half. First fold's run "
             "of every repeat.", "",
             "| Method | " + " | ".join(header(s) for s in sites) + " |", "|---|" + "---|" * len(sites)]
    for method in _ordered_methods(table):
        if not table[method]:
            continue
        cells = []
        for site in sites:
            e = table[method].get(site)
            if e is None:
                cells.append("–")
                continue
            sd = "" if e["gap_sd"] is None else f" ± {e['gap_sd']:.3f}"
            early = "" if e.get("early_gap") is None else f"; first half {e['early_gap']:+.3f}"
            cells.append(f"{e['local']:.3f} → {e['delivered']:.3f} ({e['gap']:+.3f}{sd}{early}, R={e['runs']})")
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def _comparison_rows(table: Mapping[str, Any], sites: Sequence[str], sep: str, cell: Any) -> list[str]:
    """One Markdown row per comparison (``a<sep>b``), one ``cell(entry)`` per site (``–`` where none)."""
    rows = []
    for comp in table.values():
        cells = ["–" if comp["sites"].get(site) is None else cell(comp["sites"][site]) for site in sites]
        name = f"{METHOD_NAMES.get(comp['a'], comp['a'])}{sep}{METHOD_NAMES.get(comp['b'], comp['b'])}"
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def write_markdown(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Writes :func:`markdown_table` to ``path`` atomically."""
    out = write_atomic(path, markdown_table(results).encode())
    logger.info("wrote %s", out)
    return out


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    """matplotlib with the non-interactive Agg backend (no display on servers; safe in worker processes)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    out = write_atomic(path, buf.getvalue())
    logger.info("wrote %s", out)
    return out


def plot_dsc(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bar chart: per site, one bar per method (mean DSC, error bar = standard deviation over cases)."""
    plt = _pyplot()
    methods = results["methods"]
    order = _ordered_methods(methods)
    sites = _ordered_sites(results)
    if not sites:
        raise ValueError("results hold no site to plot")
    width = 0.8 / max(len(order), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(sites) * max(len(order), 1) * 0.5 + 2), 4))
    x = np.arange(len(sites))
    for i, m in enumerate(order):
        means, stds = [], []
        for site in sites:
            e = methods[m].get(site)
            vals = [c["dsc"] for c in e["per_case"]] if e else []
            means.append(float(np.mean(vals)) if vals else np.nan)
            stds.append(float(np.std(vals)) if vals else 0.0)
        ax.bar(x + (i - (len(order) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=METHOD_NAMES.get(m, m))
    external = set(results.get("external_sites") or [])
    ax.set_xticks(x, [f"{s}\n(external)" if s in external else s for s in sites])
    ax.set_ylabel("DSC (mean over cases)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Dice per site and method")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def read_round_records(path: Path) -> list[dict[str, Any]]:
    """Round records of a metrics JSON-lines file; malformed lines are skipped with a warning."""
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON; skipped", path, i)
            continue
        rnd = rec.get("round", rec.get("epoch")) if isinstance(rec, dict) else None
        if rnd is None or not isinstance(rec.get("sites"), dict):
            logger.warning("%s:%d has no 'round' and 'sites'; skipped", path, i)
            continue
        records.append(rec)
    return records


def _number(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def _mean_dice(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    vals = np.array([_number(v) for v in value], dtype=float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else math.nan


def plot_training_curves(metrics_jsonl_by_method: Mapping[str, str | os.PathLike[str]],
                         path: str | os.PathLike[str]) -> Path:
    """Training loss, validation loss and mean pseudo-Dice against the round, per method and site.

    Each input file holds JSON lines ``{"round": r, "sites": {site: {"train_loss", "val_loss",
    "pseudo_dice": [...]}}}`` (``"epoch"`` is accepted for ``"round"``; missing values, NaN pseudo-Dice of
    absent classes and malformed lines are skipped). Colour = method, line style = site. Missing files are
    logged and left out, so a benchmark with a failed method still gets its plot.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = ("train loss", "validation loss", "mean pseudo-Dice")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    site_style: dict[str, str] = {}
    plotted = 0
    for mi, (method, file) in enumerate(metrics_jsonl_by_method.items()):
        file = Path(file)
        if not file.is_file():
            logger.warning("no training metrics for %s: %s does not exist", method, file)
            continue
        series: dict[str, dict[str, list[float]]] = {}
        for rec in read_round_records(file):
            rnd = _number(rec.get("round", rec.get("epoch")))
            for site, m in rec["sites"].items():
                if not isinstance(m, dict):
                    continue
                s = series.setdefault(str(site), {"round": [], "train_loss": [], "val_loss": [], "dice": []})
                s["round"].append(rnd)
                s["train_loss"].append(_number(m.get("train_loss")))
                s["val_loss"].append(_number(m.get("val_loss")))
                s["dice"].append(_mean_dice(m.get("pseudo_dice", m.get("mean_fg_dice"))))
        for site, s in series.items():
            style = site_style.setdefault(site, styles[len(site_style) % len(styles)])
            label = f"{METHOD_NAMES.get(method, method)} {site}"
            r = np.array(s["round"])
            for ax, key in zip(axes, ("train_loss", "val_loss", "dice")):
                y = np.array(s[key])
                ok = np.isfinite(r) & np.isfinite(y)
                if ok.any():
                    ax.plot(r[ok], y[ok], style, color=colors[mi % len(colors)], marker=".", label=label)
            plotted += 1
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if plotted:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[2].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    else:
        fig.suptitle("no training metrics found")
    return _save_figure(fig, path)
