"""One fold's federated training at the coordinator: build the sites' trainers, run the rounds, finish.

Every round: send every site the model it trains from, check each update as it arrives
(training/site_checks.py) and hand it to the run's aggregation strategy (aggregation/strategy.py: FedAvg,
FedAvgM, FedBN or AsymFedAvg), apply the round, save the server state in the background. After the last round
every site validates the final model (the last delivered one, training/delivered.py) and writes its final
checkpoints.

Why the loop lives here and not in a Flower Strategy: AsymFedAvg sends different content to each site, sites may be
left out of a round (errors, ``--round-timeout``) while the run goes on (``--min-sites``), a site that lost its
trainer rejoins after rebuilding it, and the server state must be saved atomically after every round so that
``--resume`` can continue. The trainers themselves live in the site workers (training/session.py), built once per
run.

Site replies are data (issue 24): the names and the number of rounds are the coordinator's own, the FedAvg weights
are fixed at ``train_init`` from counts bounded by the merged fingerprint (aggregation/site_weights.py), and a
round's reply with another count is an update rejection. ``--clip-update-norm`` bounds each site's update
(aggregation/robust.py).

Outputs in the fold's out dir: ``metrics.jsonl`` (one JSON line per round), ``progress.png``, ``state/``, and in FFE
mode the global model in nnU-Net's layout under ``global/<trainer>__<plans>__<configuration>/fold_X/``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, cast

import numpy as np

from fednnunet.aggregation import ModelSpec, SiteOrderedAdds, UpdateRejected, from_wire, to_wire, validate_update
from fednnunet.aggregation.robust import clip_update
from fednnunet.aggregation.site_weights import FixedWeights, check_resumed, fix_site_weights
from fednnunet.aggregation.strategy import GLOBAL, AggregationStrategy, aggregation_strategy, check_strategy_options
from fednnunet.federation.events import EventLog
from fednnunet.federation.job import JobSpec
from fednnunet.protocol.caller import Arrays, SiteCaller, rejected
from fednnunet.protocol.errors import ErrorKind, SiteError
from fednnunet.protocol.messages import (Reply, TrainFinish, TrainFinishReply, TrainInitReply, TrainRound,
                                         TrainRoundReply, TrainValidateDelivered, TrainValidateDeliveredReply)
from fednnunet.training.delivered import BEST_PREFIX, BestDelivered, check_delivered, pooled_dice, validates_round
from fednnunet.training.export import write_global_models
from fednnunet.training.options import TrainOptions
from fednnunet.training.progress import PLOT_EVERY_S, first_reply_s, fmt, round_line, round_timing, try_draw_progress
from fednnunet.training.results import site_result
from fednnunet.training.saver import BackgroundSaver, save_round, write_metrics
from fednnunet.training.site_checks import check_rebuilt, check_round_reply, check_site_infos
from fednnunet.training.state import STATE_DIR, load_models, load_state, save_best

__all__ = ["FoldRun"]

#: Why a site that stays out of a round after its trainer could not be rebuilt is left out (it is asked again
#: before the next round).
_NOT_REBUILT = SiteError("could not rebuild its trainer", ErrorKind.SESSION_LOST)


def _finish_timeout_s(opts: TrainOptions, history: list[dict[str, Any]]) -> float:
    """How long the sites may take to finish: ``finish_timeout_s`` (the final validation), plus, with
    ``--finetune-epochs N``, twice N of the run's slowest epochs (a round's wall time over its epochs): a site's
    fine-tuning epoch costs what a federated one did, and the margin covers building the personal trainer."""
    slowest = max((h["wall_seconds"] for h in history), default=0.0) / opts.epochs_per_round
    return opts.finish_timeout_s + 2 * opts.finetune_epochs * slowest


def _dice(dice: float | None) -> str:
    return "" if dice is None else f", validation mean Dice {dice:.4f}"


class FoldRun:
    """One fold's federated training (state kept on the object so the steps stay small)."""

    #: the sites' counts and weights, fixed at train_init
    fixed: FixedWeights
    #: the run's aggregation algorithm, chosen once the sites' networks are known
    strategy: AggregationStrategy

    def __init__(self, job: JobSpec, options: TrainOptions, fold: str, caller: SiteCaller, events: EventLog,
                 out: Path, root: Path) -> None:
        self.job, self.opts, self.fold, self.caller, self.events = job, options, fold, caller, events
        self.out, self.root = out, root
        self.out.mkdir(parents=True, exist_ok=True)
        self.best = BestDelivered()  # the best delivered model (training/delivered.py)
        self.global_info: dict[str, Any] | None = None  # FFE: what is written beside the global model (checked)

    def _init_sites(self, sites: list[str], continue_training: bool
                    ) -> tuple[dict[str, TrainInitReply], dict[str, Arrays], dict[str, SiteError]]:
        request = self.opts.train_init(self.fold, continue_training)
        replies, errors = self.caller.try_call({s: request for s in sites}, timeout_s=self.opts.init_timeout_s)
        infos = {s: cast(TrainInitReply, r) for s, (r, _) in replies.items()}
        weights = {s: w for s, (_, w) in replies.items()}
        return infos, weights, errors

    def run(self, sites: list[str]) -> dict[str, Any]:
        opts, events, asym = self.opts, self.events, self.job.asym
        state = load_state(self.out) if (opts.resume or opts.continue_training) else None
        if (opts.resume or opts.continue_training) and state is None:
            events.info(f"fold {self.fold}: no saved server state in {self.out / STATE_DIR}: starting at round 1")
        if state is not None and bool(state.get("asym")) != asym:
            raise ValueError("the saved state is from a run with" + ("out" if asym else "") + " --asym")
        check_strategy_options(asym, opts)  # before any site builds a trainer for a run that is refused

        started = time.perf_counter()
        infos, init_weights, errors = self._init_sites(sites, continue_training=state is not None)
        if errors:
            raise RuntimeError("train_init failed at " + "; ".join(f"{s}: {e}" for s, e in errors.items()))
        specs = {s: ModelSpec.of(init_weights[s]) for s in sites}
        # FedAvg: one network at every site (check_site_infos then holds every site to the first one's norm layers)
        self.strategy = strategy = aggregation_strategy(asym, opts, specs, infos[sites[0]].normalization)
        # Site replies are data: names, plans and counts are checked against the coordinator's own before use, and
        # the weights are fixed here, bounded by the federation's plan (aggregation/site_weights.py).
        self.global_info = check_site_infos(infos, opts, asym, specs[sites[0]])
        fixed = fix_site_weights(infos, asym, opts.weighting)
        if state is not None:
            fixed = check_resumed(fixed, state.get("site_weights"))
        self.fixed = fixed
        events.emit("train_init", f"fold {self.fold}: {len(sites)} site trainer(s) built in "
                    f"{time.perf_counter() - started:.1f} s (" + ", ".join(
                        f"{s}: {fixed.cases[s]} cases, epoch {infos[s].current_epoch}"
                        for s in sites) + ")" + ("" if opts.seed is None else f", seed {opts.seed}"),
                    weights=fixed.to_json())
        events.info(fixed.line())
        if asym:
            events.info("--asym: the sites were planned alone, so no shared record bounds their declared case "
                        "counts (each is only checked against its own fingerprint); --weighting uniform avoids "
                        "relying on them")
        for s in sites:
            for reason in infos[s].not_reproducible:
                events.info(f"site {s}: seeded, but not bit-for-bit repeatable: {reason}")
        rounds = opts.total_rounds()  # the coordinator's option or its default rule: never a site's num_epochs
        min_sites = min(opts.min_sites or len(sites), len(sites))

        if state is not None:
            models = load_models(self.out, state)
            strategy.restore(models)
            start, history = int(state["round"]), list(state.get("history", []))
            for s in sites:
                try:
                    validate_update(models[strategy.model_key(s)], specs[s])
                except UpdateRejected as err:
                    raise ValueError(f"saved state does not fit the network of site {s}: {err}") from err
            saved_best = state.get("best") or {}
            if saved_best.get("weights_file"):
                self.best = BestDelivered(saved_best["score"], saved_best["model_round"],
                                          load_models(self.out, state, saved_best["weights_file"]))
            events.info(f"fold {self.fold}: resuming after round {start} of {rounds}")
            write_metrics(self.out, history)
        else:
            models = strategy.initial_models(init_weights, sites)
            start, history = 0, []
        del init_weights

        saver = BackgroundSaver()
        try:
            self._rounds(sites, start, rounds, models, history, specs, min_sites, saver)
        finally:
            saver.close()
        final = self._validate_final(sites, models, rounds, history)
        result = self._finish(sites, models, rounds * opts.epochs_per_round, history, rounds)
        if final is not None:
            result["final_model_validation"] = final
        return result

    def _validate_final(self, sites: list[str], models: Mapping[str, Arrays], rounds: int,
                        history: list[dict[str, Any]]) -> dict[str, Any] | None:
        """One more exchange after the last round: every site validates the final model (the last delivered one),
        which may become the best; reported in the events, result.json and progress.png."""
        opts = self.opts
        if not opts.validate_delivered_every or not history:
            return None
        payload = {s: models[self.strategy.model_key(s)] for s in sites}
        replies, errors = self.caller.try_call({s: TrainValidateDelivered() for s in sites}, payload,
                                               timeout_s=opts.round_timeout_s)
        reports: dict[str, Any] = {}
        for s, (reply, _) in replies.items():
            delivered = cast(TrainValidateDeliveredReply, reply).delivered
            try:
                check_delivered(delivered)
                reports[s] = delivered
            except UpdateRejected as err:
                errors[s] = rejected(f"rejected: {err}")
        for s, reason in sorted(errors.items()):
            self.events.emit("left_out", f"final model: site {s} did not validate it: {reason}", site=s, reason=reason)
        if self.best.consider(rounds, reports, sites, models):
            save_best(self.out, self.best.info(), self.best.models, self.job.asym)
        record = {"round": rounds, "sites": {s: {"delivered": d} for s, d in reports.items()}, "left_out": errors,
                  "delivered_model_round": rounds, "delivered_mean_fg_dice": pooled_dice(reports),
                  "best": self.best.info()}
        try_draw_progress(self.out, history, record)
        best = self.best.info()
        self.events.info(f"fold {self.fold}: final model: delivered pseudo-Dice " + ", ".join(
            f"{s} {fmt(d.get('mean_fg_dice'))}" for s, d in sorted(reports.items()))
            + f", pooled {fmt(record['delivered_mean_fg_dice'])}; best delivered model: after round "
            f"{best['model_round']} ({fmt(best['score'])})")
        return record

    def _rounds(self, sites: list[str], start: int, rounds: int, models: dict[str, Arrays],
                history: list[dict[str, Any]], specs: Mapping[str, ModelSpec], min_sites: int,
                saver: BackgroundSaver) -> None:
        opts, events, strategy = self.opts, self.events, self.strategy
        epochs_per_round = opts.epochs_per_round
        needs_init: set[str] = set()
        cases, weight_of = self.fixed.cases, self.fixed.weights
        last_drawn = float("-inf")
        for r in range(start + 1, rounds + 1):
            self._reinit(needs_init)
            t0, started_at = time.perf_counter(), time.time()
            targets = [s for s in sites if s not in needs_init]
            # one wire copy per model sent: FFE's global model is packed once for every site
            wire = {key: to_wire(models[key], opts.transfer_dtype)
                    for key in dict.fromkeys(strategy.model_key(s) for s in targets)}
            payload = {s: wire[strategy.model_key(s)] for s in targets}
            request = TrainRound(round=r, epoch_end=r * epochs_per_round,
                                 validate_delivered=validates_round(r, opts.validate_delivered_every))
            traffic = self.caller.traffic
            before = {x: (traffic.sent.get(x, 0), traffic.received.get(x, 0)) for x in targets}
            strategy.start_round()
            # seeded: add in site order, so the float64 sums do not depend on the order replies arrive in
            adds = SiteOrderedAdds(targets if opts.seed is not None else None)
            metrics: dict[str, dict[str, Any]] = {}
            norms: dict[str, float] = {}

            def take(site: str, reply: Reply, update: Arrays) -> SiteError | None:
                """Check one update as it arrives and add it to the running average (then it can be dropped)."""
                result = cast(TrainRoundReply, reply)
                try:
                    check_round_reply(result, update, specs[site], opts.transfer_dtype, cases[site])
                except UpdateRejected as err:
                    return rejected(f"update rejected: {err}")
                # a reply with "delta" holds changes from what this server sent (see aggregation/wire.py)
                model_sent = models[strategy.model_key(site)]
                weights = from_wire(update, specs[site], base=model_sent if result.delta else None)
                if opts.clip_update_norm is not None:  # bounded influence (aggregation/robust.py)
                    weights, norms[site] = clip_update(weights, model_sent, opts.clip_update_norm)
                adds.add(site, lambda: strategy.add(site, weights, weight_of[site]))
                metrics[site] = dict(result.metrics)
                return None

            replies, errors = self.caller.try_call({s: request for s in targets}, payload,
                                                   timeout_s=opts.round_timeout_s, on_reply=take,
                                                   expected_s=first_reply_s(history))
            adds.flush()
            del payload, wire
            exchange_times = dict(self.caller.exchange_times)
            round_bytes = {x: {"sent": traffic.sent.get(x, 0) - before[x][0],
                               "received": traffic.received.get(x, 0) - before[x][1]} for x in targets}
            errors = {**{s: _NOT_REBUILT for s in needs_init}, **errors}
            for s, reason in sorted(errors.items()):
                events.emit("left_out", f"round {r}: site {s} left out: {reason}", round=r, site=s, reason=reason)
                # its worker restarted, or its node went away and came back: it is asked to rebuild its trainer
                # from its own checkpoint before the next round (a site that kept it rebuilds from the same one)
                if reason.kind.trainer_lost:
                    needs_init.add(s)
            if len(metrics) < min_sites:
                raise RuntimeError(f"round {r}: only {len(metrics)} of {len(sites)} site(s) delivered an update, "
                                   f"at least {min_sites} needed (--min-sites); reasons: " +
                                   "; ".join(f"{s}: {e}" for s, e in sorted(errors.items())))
            # the models sent this round, validated at the sites: the best so far is copied before aggregation
            delivered = {s: m["delivered"] for s, m in metrics.items() if "delivered" in m}
            new_best = bool(delivered) and self.best.consider(r - 1, delivered, sites, models)
            saver.wait()  # the previous round's save holds the arrays that aggregation overwrites
            strategy_info = strategy.apply(models)
            wall = time.perf_counter() - t0
            timing = round_timing(started_at, time.time(), replies, exchange_times)
            # the site's compute: its epochs and the validation of the model it received
            slowest = max(m.get("epoch_seconds", 0.0) + (m.get("delivered") or {}).get("seconds", 0.0)
                          for m in metrics.values())
            record = {"round": r, "rounds": rounds, "fold": self.fold, "started_at": started_at, "t": time.time(),
                      "wall_seconds": wall,
                      "overhead_seconds": wall - slowest, "sites": metrics, "left_out": errors,
                      "weights": {s: weight_of[s] for s in metrics}, "bytes": round_bytes,
                      **({} if opts.clip_update_norm is None else
                         {"clip_update_norm": opts.clip_update_norm, "update_norms": dict(sorted(norms.items()))}),
                      "model_bytes": {k: int(sum(a.nbytes for a in m.values())) for k, m in models.items()},
                      "timing": timing, **strategy_info}
            if delivered:
                record.update(delivered_model_round=r - 1, delivered_mean_fg_dice=pooled_dice(delivered),
                              best=self.best.info())
            history.append(record)
            draw = r == rounds or time.monotonic() - last_drawn >= PLOT_EVERY_S
            last_drawn = time.monotonic() if draw else last_drawn
            saver.submit(save_round, self.out, r, strategy.saved_models(models), self.job.asym, list(history),
                         {"rounds": rounds, "fold": self.fold, "options": opts.asdict(),
                          "site_weights": self.fixed.to_json()}, self.best.info(),
                         self.best.models if new_best else None, draw)
            events.emit("round", round_line(record), round=r, weights=record["weights"])

    def _reinit(self, needs_init: set[str]) -> None:
        """Rebuild the trainer of sites whose worker lost it (restarted), continuing from their own checkpoint."""
        if not needs_init:
            return
        infos, _, errors = self._init_sites(sorted(needs_init), continue_training=True)
        for s in sorted(infos):
            try:  # the rebuilt trainer must be the one the run fixed at train_init
                check_rebuilt(s, infos[s], self.opts, self.fixed.cases[s])
            except ValueError as err:
                errors[s] = rejected(f"rebuilt, but its reply does not fit the run: {err}")
                continue
            self.events.info(f"site {s} rebuilt its trainer (epoch {infos[s].current_epoch}) and rejoins")
            needs_init.discard(s)
        for s, e in errors.items():
            self.events.info(f"site {s} could not rebuild its trainer: {e}")

    def _finish(self, sites: list[str], models: Mapping[str, Arrays], epochs: int, history: list[dict[str, Any]],
                rounds: int) -> dict[str, Any]:
        opts, events, best = self.opts, self.events, self.best
        # the sites write the best delivered model as checkpoint_best.pth: sent beside the final one, unless it is
        # the final one; without delivered validation they write none
        best_is = None if best.models is None else ("final" if best.model_round == rounds else "sent")
        request = TrainFinish(validate=not opts.skip_validation, val_best=opts.val_best, best=best_is,
                              finetune_epochs=opts.finetune_epochs)
        key = {s: self.strategy.model_key(s) for s in sites}
        payload = {s: models[key[s]] if best_is != "sent" else
                   {**models[key[s]], **{BEST_PREFIX + n: a for n, a in best.models[key[s]].items()}} for s in sites}
        events.info(f"fold {self.fold}: sending the final model to {len(sites)} site(s)"
                    + ("" if opts.skip_validation else " (then nnU-Net's final validation)")
                    + (f"; each then fine-tunes it for {opts.finetune_epochs} epoch(s) into its personal model"
                       if opts.finetune_epochs else ""))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fednnunet-global") as pool:
            # written while the sites finish (the server's first torch import and a torch.save: about 1 s)
            writing = (pool.submit(self._write_global_models, models, epochs)
                       if self.global_info is not None and not opts.disable_checkpointing else None)
            replies, errors = self.caller.try_call({s: request for s in sites}, payload,
                                                   timeout_s=_finish_timeout_s(opts, history))
            finish_s = time.perf_counter() - t0
            fold_dir = None if writing is None else writing.result()
        result: dict[str, Any] = {"rounds": history[-1]["round"] if history else 0, "sites": {}, "errors": errors}
        for s, (reply, _) in sorted(replies.items()):
            finished = cast(TrainFinishReply, reply)
            if (finished.personal is None) == bool(opts.finetune_epochs):
                errors[s] = rejected("rejected: its reply " + ("lacks the personal model it was asked for"
                                     if finished.personal is None else "has a personal model it was not asked for"))
                continue
            result["sites"][s] = site_result(finished)
            personal = finished.personal
            events.info(f"site {s}: final model in {finished.output_folder}{_dice(finished.validation_mean_dice)}"
                        + ("" if personal is None else f"; personal model ({personal.epochs} epoch(s) on its own "
                           f"cases) in {personal.output_folder}{_dice(personal.validation_mean_dice)}"))
        for s, e in sorted(errors.items()):
            events.emit("error", f"site {s} could not finish: {e}", site=s)
        events.info(f"fold {self.fold}: finish took {finish_s:.1f} s")
        if fold_dir is not None:
            result["global_model"] = str(fold_dir)
            events.info(f"global model: {fold_dir / 'checkpoint_final.pth'}")
        if best.models is not None:
            result["best_model"] = best.info()
            events.info(f"checkpoint_best.pth: the delivered model after round {best.model_round} (pooled "
                        f"pseudo-Dice {fmt(best.score)})")
        if history:
            result["mean_round_seconds"] = float(np.mean([h["wall_seconds"] for h in history]))
            result["mean_overhead_seconds"] = float(np.mean([h["overhead_seconds"] for h in history]))
        if len(result["sites"]) < min(opts.min_sites or len(sites), len(sites)):
            raise RuntimeError("train_finish failed at " + "; ".join(f"{s}: {e}" for s, e in errors.items()))
        return result

    def _write_global_models(self, models: Mapping[str, Arrays], epochs: int) -> Path:
        """The FFE global model in nnU-Net's layout: the final one, and the best delivered one if any (names and
        JSON files checked at train_init: ``check_site_infos``)."""
        assert self.global_info is not None
        best = None if self.best.models is None else self.best.models[GLOBAL]
        return write_global_models(self.root, self.global_info, self.opts, self.fold, models[GLOBAL], best, epochs)
