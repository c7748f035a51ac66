"""The recipe search's budget plan: how long a trial takes, the confirmation's share of --budget, each trial's time
limit, and the plan printed before the first trial."""
from __future__ import annotations

from typing import TYPE_CHECKING

import time

from search_cv import recipe_epochs
from search_selection import finished, started, top_trials
from trials import Outcome, Search, epoch_plan

if TYPE_CHECKING:
    import argparse
    
    import optuna


def search_time_left(search: Search) -> float | None:
    """Seconds the search may still use (the confirmation runs' share kept back); None without --budget."""
    if search.deadline is None:
        return None
    return search.deadline - time.monotonic() - search.reserve


def trial_time_limit(search: Search) -> float:
    """A search trial's --time-limit (0: none): the search's time left. Before any trial has measured how long one
    takes, the confirmation's share is not known yet: the first trial then gets the share that leaves its own
    length to each confirmation run, so that a slow first trial cannot spend the whole budget."""
    left = search_time_left(search)
    if left is None:
        return 0
    return left if search.trial_seconds else left / (1 + confirm_runs(search.args))


def confirm_reserve(search: Search, study: optuna.Study) -> float:
    """The confirmation's share of the budget: the current top configurations' own trial times, once per extra
    seed (the longest complete trial stands in for a place not yet taken), so that a slow trial outside the top
    does not shrink the search."""
    top = [t.user_attrs.get("seconds", 0.0) for t in top_trials(study, search.args.confirm_top)]
    top += [search.trial_seconds] * (search.args.confirm_top - len(top))
    return search.args.confirm_seeds * sum(top)


def confirm_runs(args: argparse.Namespace) -> int:
    return args.confirm_top * args.confirm_seeds


def update_trial_seconds(search: Search, outcome: Outcome) -> None:
    """The plan's unit: the longest complete trial so far. A stopped trial stands in, scaled up per epoch, only
    while none has completed: the scaling counts its start-up once per epoch, which makes it far too long (a trial
    pruned after 1 of 10 one-second epochs with 8 s of start-up would count as 90 s instead of 18 s)."""
    if outcome.state == "complete":
        search.trial_seconds = max(search.trial_seconds, outcome.seconds) if search.measured else outcome.seconds
        search.measured = True
    elif not search.measured and outcome.epochs:
        scaled = outcome.seconds * recipe_epochs(search.args) / outcome.epochs
        search.trial_seconds = max(search.trial_seconds, scaled)


def earlier_trial_seconds(study: optuna.Study) -> float:
    """The longest complete search trial of the study so far (a resumed study plans with it)."""
    seconds = [t.user_attrs.get("seconds", 0) for t in finished(study, "search", complete_only=True)]
    return max(seconds, default=0.0)


def print_plan(search: Search, study: optuna.Study, storage: str) -> None:
    args = search.args
    print(f"study {args.name} in {search.study_dir} ({storage}): {len(started(study))} trials so far; space "
          f"{args.space} ({len(search.space)} settings); {args.epochs_per_trial} epoch(s) per trial; pruner "
          + (f"median (from epoch {args.prune_warmup}, once {args.prune_startup} trials finished)"
             if args.pruner == "median" else "none")
          + (f", below val {args.prune_below:g}" if args.prune_below else ""))
    reserve = (f"confirmation: the top {args.confirm_top} configurations x {args.confirm_seeds} more seed(s) = "
               f"{confirm_runs(args)} runs of {args.epochs_per_trial} epoch(s)" if args.confirm_seeds else
               "no confirmation (--confirm-seeds 0): the winner is the best single run")
    if epoch_plan(search):
        print(epoch_plan(search))
    trials = f"{args.trials} trials" if args.trials else "trials"
    if search.deadline is None:
        print(f"{trials}, then {reserve}")
    elif search.trial_seconds:
        print(f"budget {args.budget}: {trials} while one fits before the {reserve}; " + plan_estimate(search))
    else:
        print(f"budget {args.budget}: {trials} while one fits before the {reserve} (their share of the budget is "
              "kept back); the first trial measures how long a trial takes")


def plan_estimate(search: Search) -> str:
    total = search.deadline - time.monotonic()
    reserve = search.reserve
    fit = max(int((total - reserve) // search.trial_seconds), 0)
    return (f"a full trial takes about {search.trial_seconds:.0f}s: about {fit} more full-length trials fit in "
            f"the {max(total - reserve, 0) / 60:.1f} min left for the search (pruned trials end sooner, so more "
            f"may), and {reserve / 60:.1f} min are kept for the confirmation")
