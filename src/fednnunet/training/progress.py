"""What a person sees of a running training: the line per round, ``progress.png``, where a round's time went.

Why apart from the loop: these read the round records (``metrics.jsonl``) and nothing else, so the loop's records
are their whole interface; drawing and formatting never decide anything, and a plot that fails never stops a
training (:func:`try_draw_progress`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from fednnunet.atomic_files import write_atomic
from fednnunet.protocol.caller import SiteReply

__all__ = ["PLOT_EVERY_S", "PLOT_FILE", "draw_progress", "first_reply_s", "fmt", "round_line", "round_timing",
           "try_draw_progress"]

logger = logging.getLogger(__name__)

PLOT_FILE = "progress.png"
#: The plot is redrawn at most this often (and after the last round): drawing it takes a core for a few tenths of a
#: second, which short rounds would pay every time while the sites transfer.
PLOT_EVERY_S = 30.0


def fmt(value: Any, digits: int = 3) -> str:
    """A metric for a person: ``digits`` decimals, "nan" for None (JSON's NaN) and non-finite values."""
    return "nan" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def round_line(record: Mapping[str, Any]) -> str:
    """The one line per round a person watches: per-site FedAvg weight (when the record has them), loss /
    pseudo-Dice / epoch seconds, the delivered model's pseudo-Dice (per site, and pooled), wall and overhead."""
    parts = [f"round {record['round']}/{record['rounds']}"]
    weights = record.get("weights") or {}
    total = sum(weights.values()) or 1.0
    norms = record.get("update_norms") or {}
    for site, m in record["sites"].items():
        delivered = m.get("delivered")
        weight = "" if site not in weights else f" weight {weights[site]:g} ({100 * weights[site] / total:.0f} %)"
        norm = "" if site not in norms else f" |update| {norms[site]:.3g}"
        parts.append(f"{site}:{weight}{norm} loss {fmt(m.get('train_loss'))}/{fmt(m.get('val_loss'))} "
                     f"dice {fmt(m.get('mean_fg_dice'))}"
                     + ("" if delivered is None else f" (delivered {fmt(delivered.get('mean_fg_dice'))})")
                     + f" {m.get('epoch_seconds', 0):.1f}s")
    for site in record.get("left_out", {}):
        parts.append(f"{site}: left out")
    if "delivered_mean_fg_dice" in record:
        best = record.get("best") or {}
        parts.append(f"delivered {fmt(record['delivered_mean_fg_dice'])} (best {fmt(best.get('score'))}, "
                     f"model of round {best.get('model_round')})")
    parts.append(f"wall {record['wall_seconds']:.1f}s overhead {record['overhead_seconds']:.1f}s")
    return " | ".join(parts)


def _num(value: Any) -> float:
    """A plotted value: None (JSON's NaN) as NaN, 0.0 kept."""
    return float("nan") if value is None else float(value)


def draw_progress(history: list[dict[str, Any]], path: Path, final: Mapping[str, Any] | None = None) -> None:
    """Per-site train (solid) / validation (dashed) loss and mean pseudo-Dice against the round: the local model
    after the round's epoch (solid) and the delivered model, i.e. the aggregate after the round (dotted; black:
    pooled over the sites). ``final``: the final model's validation record (training/delivered.py)."""
    from matplotlib.figure import (
        Figure,  # no pyplot: drawn in the background saver thread
    )

    sites = sorted({s for rec in history for s in rec["sites"]})
    records = history + ([dict(final)] if final else [])
    fig = Figure(figsize=(8, 7))
    ax_loss, ax_dice = fig.subplots(2, 1, sharex=True)
    for i, site in enumerate(sites):
        color = f"C{i % 10}"
        rows = [(rec["round"], rec["sites"][site]) for rec in history if site in rec["sites"]]
        rounds = [r for r, _ in rows]
        ax_loss.plot(rounds, [_num(m.get("train_loss")) for _, m in rows], "-", color=color, label=f"{site} train")
        ax_loss.plot(rounds, [_num(m.get("val_loss")) for _, m in rows], "--", color=color, label=f"{site} val")
        ax_dice.plot(rounds, [_num(m.get("mean_fg_dice")) for _, m in rows], "-o", color=color, ms=3,
                     label=f"{site} local")
        delivered = [(rec["delivered_model_round"], rec["sites"][site]["delivered"]) for rec in records
                     if site in rec["sites"] and "delivered" in rec["sites"][site]]
        if delivered:
            ax_dice.plot([r for r, _ in delivered], [_num(d.get("mean_fg_dice")) for _, d in delivered], ":s",
                         color=color, ms=3, label=f"{site} delivered")
    pooled = [(rec["delivered_model_round"], rec["delivered_mean_fg_dice"]) for rec in records
              if "delivered_mean_fg_dice" in rec]
    if pooled:
        ax_dice.plot([r for r, _ in pooled], [_num(d) for _, d in pooled], ":",
                     color="black", label="delivered, pooled")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_dice.set_ylabel("mean pseudo-Dice")
    ax_dice.set_xlabel("round (delivered: the aggregate after that round)")
    ax_dice.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))


def try_draw_progress(out: Path, history: list[dict[str, Any]], final: Mapping[str, Any] | None = None) -> None:
    """:func:`draw_progress` into ``out``/``progress.png``; a failure is logged: a plot must never stop a training."""
    try:
        draw_progress(history, out / PLOT_FILE, final)
    except Exception as err:
        logger.warning("could not draw %s: %s", out / PLOT_FILE, err)


def round_timing(started_at: float, ended_at: float, replies: Mapping[str, SiteReply],
                 exchange_times: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Where a round's wall time went (wall-clock seconds; the site's split needs roughly synchronised clocks).

    ``prepare_s``: server work before the models were handed to Flower; per site ``down_s`` (push to the site
    worker receiving the message: Flower's node polling, the ClientApp process start, the download), ``site_s``
    (the worker's handling: loading weights, the epoch, its checkpoint) and ``up_s`` (worker reply to the
    server pulling it); ``after_s``: server work after the last reply (checks and aggregation). The site's times
    are the ones its worker sets on every reply (:class:`~fednnunet.protocol.messages.Reply`).
    """
    sites: dict[str, dict[str, float]] = {}
    for site, (reply, _) in replies.items():
        if site not in exchange_times:
            continue
        pushed, pulled = exchange_times[site]
        sites[site] = {"round_trip_s": pulled - pushed, "site_s": reply.seconds,
                       "down_s": reply.received_at - pushed, "up_s": pulled - reply.replied_at}
    timing: dict[str, Any] = {"sites": sites}
    if sites:
        first_push = min(exchange_times[s][0] for s in sites)
        last_pull = max(exchange_times[s][1] for s in sites)
        timing.update(prepare_s=first_push - started_at, after_s=ended_at - last_pull)
    return timing


def first_reply_s(history: list[dict[str, Any]]) -> float | None:
    """Seconds from the push to the first reply in the fastest round so far (the first round is slow: warm-up);
    the transport pulls for replies slowly until close to it."""
    firsts = [min(s["round_trip_s"] for s in sites.values())
              for rec in history if (sites := (rec.get("timing") or {}).get("sites"))]
    return min(firsts) if firsts else None
