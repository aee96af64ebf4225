"""ofr.py — GRPO group advantages and Oversampling–Filtering–Ranking ("Standard Deviation Sorting")  (docs/method.md §5, §6).

What this file is
    * `group_advantages`: Â_i = R_i − mean_group(R) (paper Eq. 2), or (R_i − mean)/(std + eps) for the std-norm
      ablation (§10.4). `group_stds` gives each trajectory its group's std, the ranking key. Both use the official
      statistics: unbiased std (torch.std, ddof=1) and, for a group of one, mean 0 and std 1.
    The pure steps of one RL step's OFR (train.py runs the loop, top-down, around them):
    * `screen`: filter one generation batch ("draw"):
        1. reward_masked — a group holding a NaN reward (a judge failure under the mask policy, see reward.py) is
           dropped whole: its baseline is unknown.
        2. zero_variance — a group whose rewards are all equal is dropped whole (no learning signal). R includes the
           tool bonus, so an all-correct group with different tool counts stays.
        3. no_image (option `require_image`) — trajectories that never received an image observation.
        4. vision_inconsistent — vision-token count ≠ image count (truncation cut an image).
        5. end_reason:<X> — end reasons outside `keep_end_reasons` (default: drop OVER_LENGTH, EXCEED_MAX_IMAGE_NUM and
           ENGINE_ERROR, a prompt the rollout engine refused; rollout.py).
    * `enough`: whether the batches screened so far hold `train_groups` surviving groups; train.py draws another
      batch until they do, at most `max_draws` times.
    * `rank_and_cut`: the survivors of every screened batch are ranked by their group's reward std (over the full
      group), highest first, and cut to `train_groups` whole groups — or, with `whole_groups=False`, to
      train_groups · group_size trajectories as the official code does. Without `std_sort` the first ones in arrival
      order are kept. Short of the target (the draw cap hit) it warns and returns what survived — possibly nothing,
      in which case the caller skips the update; it never raises for lack of data.
    * `select`: all three over a given list of batches.
    * `OFRStats`: draws, groups/trajectories drawn and kept, removals per reason, group-std spread, and the paper's
      Fig. 6 metric — the fraction of correct trajectories with a negative advantage — over kept and over all.

    Trajectories are duck-typed (`Trajectory` protocol): group_id, reward, correct, end_reason, num_tool_calls,
    num_returned_images, vision_consistent. Group ids only need to be unique within one draw; groups from different
    draws are always distinct (the official code gives each generation batch fresh uids).

How to run
    python -m pytest -q tests/test_ofr.py

Differences from the official code (ray_trainer.py:1818-1981, filter_fn_utils.py, core_algos.py:129-186)
    1. Ranking keeps whole groups by default. The official code argsorts single trajectories by their group std and
       cuts at train_batch_size · n, so a group can be split at the cut (`whole_groups=False` reproduces that).
       The target is then counted in groups, so a kept group may be partial after per-trajectory filters and the
       number of trajectories per step varies.
    2. Ties in the ranking keep arrival order (stable sort); numpy's default quicksort breaks them arbitrarily. Group
       means and stds are computed on the sorted rewards, so equal reward multisets give bit-identical keys.
    3. Advantage timing is an option: "before_filter" (official: on the full generation group, so dropped rollouts
       such as OVER_LENGTH with R = 0 still weigh on the baseline) or "after_filter" (on the kept members only; a
       single surviving member then gets A = R by the official size-1 rule).
    4. The has-image filter is off by default. The official run turns it on (metric `hasimage`); it silently removes
       every trajectory that never received a figure — direct answers and text-only tool use — from the gradient,
       positive or negative: an undocumented pressure against interaction collapse (docs/method.md §6, §11.2). In
       the ablations in miniature it holds tool use up by itself (`make ablations ARMS='require_image
       require_image_tool_coef_0'`; docs/results.md, "The official run's has-image filter").
    5. Zero variance is tested as max(R) == min(R) (official: np.std == 0; the same groups, stated without relying
       on how the mean's rounding cancels).
    6. Hitting the draw cap is a warning, and training goes on with what survived (official: `max_num_gen_batches`
       > 0 raises, 0 loops without bound). `max_draws` must be ≥ 1.
    7. No trajectory-length filter: the official 128k-token limit never fires with a 52k budget; over-long
       trajectories already end as OVER_LENGTH. No masked trajectories exist officially (a judge error crashed the step).
    8. Floats are float64 throughout (official: float32 tensors).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from config import config_field as _f

log = logging.getLogger(__name__)

# official EndReasonEnum names, except EXCEED_MAX_IMAGE_NUM (official EXCEED_MAX_IMAGE_NUM_32: the cap is configurable)
# and ENGINE_ERROR (ours: the rollout engine refused the trajectory's prompt, so its rollout stopped unfinished)
END_REASONS = frozenset({"DONE", "ERROR_IN_ACTION", "OVER_LENGTH", "EXCEED_MAX_TURNS", "EXCEED_MAX_IMAGE_NUM",
                         "ENGINE_ERROR"})
BROKEN_END_REASONS = frozenset({"OVER_LENGTH", "EXCEED_MAX_IMAGE_NUM", "ENGINE_ERROR"})
# a correct trajectory counts as "negative advantage" below this, so float noise around 0 does not
NEGATIVE_ADVANTAGE_TOL = 1e-9


class Trajectory(Protocol):
    """What OFR reads from a rollout. reward is NaN when the judge failed under the mask policy."""
    group_id: Hashable
    reward: float
    correct: bool
    end_reason: str
    num_tool_calls: int
    num_returned_images: int
    vision_consistent: bool


# ---------------------------------------------------------------- group statistics (docs/method.md §5)
def group_members(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Group id → member positions, groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for position, group_id in enumerate(group_ids):
        members.setdefault(group_id, []).append(position)
    return members


def _as_rewards(rewards, group_ids) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)                 # (N,)
    if rewards.ndim != 1 or len(rewards) != len(group_ids):
        raise ValueError(f"rewards must be 1-D with one entry per group id: shape {rewards.shape}, "
                         f"{len(group_ids)} group ids")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise ValueError(f"reward[{bad[0]}] = {rewards[bad[0]]}: rewards must be finite (drop masked samples first)")
    return rewards


def _mean_std(group_rewards: np.ndarray) -> tuple[float, float]:
    """Official per-group statistics: unbiased std; a group of one has mean 0 and std 1."""
    if len(group_rewards) == 1:
        return 0.0, 1.0
    ordered = np.sort(group_rewards)    # order-independent rounding: a group's stats do not depend on rollout order
    return float(ordered.mean()), float(ordered.std(ddof=1))


def group_advantages(rewards, group_ids: Sequence[Hashable], std_norm: bool = False, eps: float = 1e-6) -> np.ndarray:
    """One advantage per trajectory: R − mean_group(R), divided by (std_group(R) + eps) when std_norm.

    std is the unbiased sample std (torch.std), the same number `group_stds` returns for ranking; a group of one has
    mean 0 and std 1 (official), so its advantage is R (or R / (1 + eps)).
    """
    rewards = _as_rewards(rewards, group_ids)                        # (N,)
    advantages = np.empty_like(rewards)                              # (N,)
    for members in group_members(group_ids).values():
        mean, std = _mean_std(rewards[members])
        advantages[members] = (rewards[members] - mean) / (std + eps) if std_norm else rewards[members] - mean
    return advantages


def group_stds(rewards, group_ids: Sequence[Hashable]) -> np.ndarray:
    """Each trajectory's group reward std (unbiased; 1.0 for a group of one), the ranking key of §6."""
    rewards = _as_rewards(rewards, group_ids)                        # (N,)
    stds = np.empty_like(rewards)                                    # (N,)
    for members in group_members(group_ids).values():
        stds[members] = _mean_std(rewards[members])[1]
    return stds


# ---------------------------------------------------------------- configuration and records
@dataclass
class OFRConfig:
    """OFR's settings (docs/method.md §6); train.py inherits them and their flags."""
    group_size: int = _f(8, "rollouts per prompt (the GRPO group); every drawn group must have exactly this many")
    train_groups: int = _f(16, "groups trained on per step (the paper's training batch)")
    max_draws: int = _f(4, "cap on generation batches drawn per step; at the cap, train on what survived")
    std_sort: bool = _f(True, "rank groups by reward std (the paper); --no-std-sort: first come, first kept")
    std_norm: bool = _f(False, "divide advantages by the group std (ablation; the paper removes it)")
    whole_groups: bool = _f(True, "keep or cut whole groups; --no-whole-groups ranks single trajectories as the "
                                  "official code does and may split a group")
    adv_timing: str = _f("before_filter", "group baseline over the full generated group (before_filter, official) or "
                                          "over the kept members (after_filter)", ["before_filter", "after_filter"])
    require_image: bool = _f(False, "drop trajectories that never received an image observation (the official "
                                    "`hasimage` filter)")
    # not flags: the official keep-list, and the std guard under std_norm
    keep_end_reasons: frozenset[str] = END_REASONS - BROKEN_END_REASONS
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("train_groups", "group_size", "max_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OFRConfig.{name} must be an int >= 1, got {value!r}")
        if self.adv_timing not in ("before_filter", "after_filter"):
            raise ValueError(f"OFRConfig.adv_timing must be 'before_filter' or 'after_filter', got {self.adv_timing!r}")
        unknown = set(self.keep_end_reasons) - END_REASONS
        if unknown:
            raise ValueError(f"OFRConfig.keep_end_reasons has unknown end reasons {sorted(unknown)} "
                             f"(known: {sorted(END_REASONS)})")
        if not self.eps > 0:
            raise ValueError(f"OFRConfig.eps must be > 0, got {self.eps}")

    @property
    def target_trajectories(self) -> int:
        return self.train_groups * self.group_size


@dataclass(frozen=True)
class _Candidate:
    """A trajectory that passed every filter, with its full-group statistics."""
    draw: int
    position: int                       # index within its draw
    trajectory: Trajectory
    group: tuple[int, Hashable]         # (draw, group_id): groups never merge across draws
    group_std: float
    advantage: float                    # over the full group (before filtering)


@dataclass
class Screened:
    """One draw after filtering."""
    candidates: list[_Candidate]
    removed: Counter
    groups: int
    trajectories: int
    group_stds: list[float]             # one per group with known rewards
    correct: int = 0                    # correct trajectories with known rewards …
    negative_correct: int = 0           # … and how many of them got a negative full-group advantage


@dataclass(frozen=True)
class OFRStats:
    draws: int
    cap_hit: bool                       # fewer than the target survived after the last allowed draw
    groups_drawn: int
    trajectories_drawn: int
    groups_kept: int
    trajectories_kept: int
    removed: dict[str, int]             # trajectories removed, by the first reason that removed them; "ranked_out" =
                                        # survived every filter but fell below the cut
    group_std_mean: float               # over kept groups (nan when none)
    group_std_std: float
    group_std_min: float
    group_std_max: float
    drawn_group_std_mean: float         # over every drawn group with known rewards
    negative_correct_frac_kept: float   # Fig. 6: correct kept trajectories with advantage < 0 / correct kept
    negative_correct_frac_all: float    # the same over every drawn trajectory, with full-group advantages

    @property
    def kept_frac(self) -> float:
        return self.trajectories_kept / self.trajectories_drawn if self.trajectories_drawn else math.nan

    def as_log(self, prefix: str = "ofr/") -> dict[str, float]:
        scalars = {name: float(value) for name, value in vars(self).items() if name != "removed"}
        scalars["kept_frac"] = self.kept_frac
        scalars.update({f"removed/{reason}": float(count) for reason, count in self.removed.items()})
        return {prefix + name: value for name, value in scalars.items()}


@dataclass(frozen=True)
class OFRResult:
    trajectories: list[Trajectory]      # the kept trajectories, ranked order
    advantages: np.ndarray              # (n_kept,) one advantage per kept trajectory
    kept: list[tuple[int, int]]         # (draw index, index within that draw) of each kept trajectory
    stats: OFRStats


# ---------------------------------------------------------------- filtering (docs/method.md §6, step 2.5)
def screen(batch: Sequence[Trajectory], draw: int, config: OFRConfig) -> Screened:
    """Filter one generation batch: zero-variance and masked groups out, then broken trajectories (step 2.5)."""
    if not batch:
        raise ValueError(f"draw {draw}: an empty generation batch")
    members = group_members([trajectory.group_id for trajectory in batch])
    for group_id, positions in members.items():
        if len(positions) != config.group_size:
            raise ValueError(f"draw {draw}: group {group_id!r} has {len(positions)} trajectories, "
                             f"expected group_size={config.group_size}")
    for position, trajectory in enumerate(batch):
        if trajectory.end_reason not in END_REASONS:
            raise ValueError(f"draw {draw}, trajectory {position}: unknown end_reason {trajectory.end_reason!r} "
                             f"(known: {sorted(END_REASONS)})")

    screened = Screened(candidates=[], removed=Counter(), groups=len(members), trajectories=len(batch), group_stds=[])
    for group_id, positions in members.items():
        rewards = np.array([batch[p].reward for p in positions], dtype=np.float64)   # (group_size,)
        if np.isnan(rewards).any():
            screened.removed["reward_masked"] += len(positions)
            continue
        advantages = group_advantages(rewards, [group_id] * len(positions), config.std_norm, config.eps)
        std = _mean_std(rewards)[1]
        screened.group_stds.append(std)
        for p, advantage in zip(positions, advantages):
            if batch[p].correct:
                screened.correct += 1
                screened.negative_correct += bool(advantage < -NEGATIVE_ADVANTAGE_TOL)
        # a group of one has no variance to measure; the official filter keeps it
        if len(positions) > 1 and rewards.max() == rewards.min():
            screened.removed["zero_variance"] += len(positions)
            continue
        for p, advantage in zip(positions, advantages):
            reason = _broken_reason(batch[p], config)
            if reason:
                screened.removed[reason] += 1
                continue
            screened.candidates.append(_Candidate(draw, p, batch[p], (draw, group_id), std, float(advantage)))
    return screened


def _broken_reason(trajectory: Trajectory, config: OFRConfig) -> str | None:
    """The first per-trajectory filter that removes this trajectory (official order), or None."""
    if config.require_image and trajectory.num_returned_images == 0:
        return "no_image"
    if not trajectory.vision_consistent:
        return "vision_inconsistent"
    if trajectory.end_reason not in config.keep_end_reasons:
        return f"end_reason:{trajectory.end_reason}"
    return None


# ---------------------------------------------------------------- ranking (docs/method.md §6, step 3)
def _by_group(candidates: list[_Candidate]) -> dict[tuple[int, Hashable], list[_Candidate]]:
    groups: dict[tuple[int, Hashable], list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.group, []).append(candidate)
    return groups


def enough(screened: Sequence[Screened], config: OFRConfig) -> bool:
    """Whether the batches screened so far hold the training batch: `train_groups` surviving groups (or, with
    whole_groups=False, train_groups · group_size trajectories)."""
    return _enough([c for s in screened for c in s.candidates], config)


def _enough(candidates: list[_Candidate], config: OFRConfig) -> bool:
    if config.whole_groups:
        return len(_by_group(candidates)) >= config.train_groups
    return len(candidates) >= config.target_trajectories


def _rank_and_cut(candidates: list[_Candidate], config: OFRConfig) -> list[_Candidate]:
    if config.whole_groups:
        groups = _by_group(candidates)
        order = list(groups)
        if config.std_sort:
            order.sort(key=lambda group: -groups[group][0].group_std)       # stable: ties keep arrival order
        return [candidate for group in order[:config.train_groups] for candidate in groups[group]]
    ranked = sorted(candidates, key=lambda c: -c.group_std) if config.std_sort else candidates
    return ranked[:config.target_trajectories]


def _spread(values: list[float]) -> tuple[float, float, float, float]:
    if not values:
        return math.nan, math.nan, math.nan, math.nan
    array = np.asarray(values)
    return float(array.mean()), float(array.std()), float(array.min()), float(array.max())


def rank_and_cut(screened: Sequence[Screened], config: OFRConfig) -> OFRResult:
    """Rank the survivors of every screened batch by group reward std and keep the training batch (step 3), with
    their advantages and the step's statistics. Fewer survivors than the target: all of them, with a warning."""
    candidates = [c for s in screened for c in s.candidates]
    kept = _rank_and_cut(candidates, config)
    if config.adv_timing == "after_filter" and kept:
        advantages = group_advantages([c.trajectory.reward for c in kept], [c.group for c in kept],
                                      config.std_norm, config.eps)                      # (n_kept,)
    else:
        advantages = np.array([c.advantage for c in kept], dtype=np.float64)          # (n_kept,)

    removed = Counter()
    for s in screened:
        removed.update(s.removed)
    if len(candidates) > len(kept):
        removed["ranked_out"] = len(candidates) - len(kept)
    kept_group_stds = [group[0].group_std for group in _by_group(kept).values()]
    std_mean, std_std, std_min, std_max = _spread(kept_group_stds)
    kept_correct = [a for c, a in zip(kept, advantages) if c.trajectory.correct]
    all_correct = sum(s.correct for s in screened)
    stats = OFRStats(
        draws=len(screened), cap_hit=not _enough(candidates, config),
        groups_drawn=sum(s.groups for s in screened), trajectories_drawn=sum(s.trajectories for s in screened),
        groups_kept=len(kept_group_stds), trajectories_kept=len(kept), removed=dict(removed),
        group_std_mean=std_mean, group_std_std=std_std, group_std_min=std_min, group_std_max=std_max,
        drawn_group_std_mean=_spread([std for s in screened for std in s.group_stds])[0],
        negative_correct_frac_kept=(sum(a < -NEGATIVE_ADVANTAGE_TOL for a in kept_correct) / len(kept_correct)
                                    if kept_correct else math.nan),
        negative_correct_frac_all=sum(s.negative_correct for s in screened) / all_correct if all_correct else math.nan,
    )
    if stats.cap_hit:
        log.warning("OFR: draw cap reached (max_draws=%d): %d groups / %d trajectories survived filtering, target "
                    "%d groups%s (removed: %s); training on what survived%s", config.max_draws,
                    len(_by_group(candidates)), len(candidates), config.train_groups,
                    "" if config.whole_groups else f" = {config.target_trajectories} trajectories",
                    stats.removed, "" if kept else " — nothing survived, skip this update")
    return OFRResult(trajectories=[c.trajectory for c in kept], advantages=advantages,
                     kept=[(c.draw, c.position) for c in kept], stats=stats)


def select(draws: Sequence[Sequence[Trajectory]], config: OFRConfig) -> OFRResult:
    """Screen, rank and cut the given generation batches (all of them; train.py draws them one at a time until
    `enough`). stats.cap_hit is True when they hold fewer survivors than the target."""
    return rank_and_cut([screen(batch, draw, config) for draw, batch in enumerate(draws)], config)
