"""Tests for ofr.py: hand-computed advantages and filters, the paper's negative-advantage example, ranking properties,
and the bounded OFR sampler."""
import logging
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ofr
from ofr import OFRConfig, group_advantages, group_stds, select
from train import oversample_filter_rank


@dataclass
class Traj:
    group_id: object
    reward: float
    correct: bool = False
    end_reason: str = "DONE"
    num_tool_calls: int = 0
    num_returned_images: int = 1
    vision_consistent: bool = True


def group(group_id, rewards, **overrides_by_position):
    """One group; correct ⇔ reward ≥ 1 (rewards are built as acc + 0.1·n_tool_calls); `overrides_by_position`
    maps 'p<i>' to attribute overrides for member i."""
    members = []
    for i, reward in enumerate(rewards):
        traj = Traj(group_id, reward, correct=reward >= 1.0, num_tool_calls=round((reward - 1) * 10) if reward >= 1 else 0)
        for name, value in overrides_by_position.get(f"p{i}", {}).items():
            setattr(traj, name, value)
        members.append(traj)
    return members


# ------------------------------------------------------------------ group advantages (hand-computed)
def test_group_advantages_mean_centred_hand_computed():
    # mean = 3.8 / 4 = 0.95
    adv = group_advantages([1.0, 1.4, 1.4, 0.0], [7, 7, 7, 7])
    np.testing.assert_allclose(adv, [0.05, 0.45, 0.45, -0.95], atol=1e-12)


def test_group_advantages_std_norm_uses_unbiased_std():
    # squared deviations 0.0025 + 0.2025 + 0.2025 + 0.9025 = 1.31; unbiased var = 1.31 / 3
    std = math.sqrt(1.31 / 3)
    adv = group_advantages([1.0, 1.4, 1.4, 0.0], [0, 0, 0, 0], std_norm=True)
    np.testing.assert_allclose(adv, np.array([0.05, 0.45, 0.45, -0.95]) / (std + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(group_stds([1.0, 1.4, 1.4, 0.0], [0, 0, 0, 0]), [std] * 4, rtol=1e-12)


def test_group_std_matches_torch_std():
    rewards = [0.0, 1.3, 1.0, 0.0, 1.1, 1.4, 0.0, 1.2]
    expected = torch.std(torch.tensor(rewards, dtype=torch.float64)).item()
    assert group_stds(rewards, ["g"] * 8)[0] == pytest.approx(expected, rel=1e-12)


def test_interleaved_groups_are_separated():
    adv = group_advantages([1.0, 0.0, 0.0, 0.5], ["a", "b", "a", "b"])
    np.testing.assert_allclose(adv, [0.5, -0.25, -0.5, 0.25], atol=1e-12)


def test_group_of_one_has_mean_zero_and_std_one():
    np.testing.assert_allclose(group_advantages([0.7], ["solo"]), [0.7])
    np.testing.assert_allclose(group_advantages([0.7], ["solo"], std_norm=True), [0.7 / (1 + 1e-6)])
    np.testing.assert_allclose(group_stds([0.7], ["solo"]), [1.0])


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="one entry per group id"):
        group_advantages([1.0, 0.0], [0])
    with pytest.raises(ValueError, match=r"reward\[1\] = nan"):
        group_advantages([1.0, float("nan")], [0, 0])


def test_paper_example_correct_but_shorter_solution_gets_negative_advantage():
    # all four correct; three used 4 tools (1.4), one used none (1.0): mean 1.3
    adv = group_advantages([1.0, 1.4, 1.4, 1.4], [0] * 4)
    np.testing.assert_allclose(adv, [-0.3, 0.1, 0.1, 0.1], atol=1e-12)
    assert adv[0] < 0
    assert group_stds([1.0, 1.4, 1.4, 1.4], [0] * 4)[0] == pytest.approx(0.2)


# ------------------------------------------------------------------ std sorting vs the paper's example (Fig. 6)
def paper_draw():
    all_correct = group("all_correct", [1.0, 1.4, 1.4, 1.4])      # std 0.2; the 1.0 gets -0.3
    mixed = group("mixed", [1.2, 0.0, 0.0, 1.0])                   # std sqrt(1.23/3) ≈ 0.640; correct ones positive
    return all_correct + mixed


def test_std_sorting_ranks_mixed_group_above_low_std_all_correct_group():
    result = select([paper_draw()], OFRConfig(train_groups=1, group_size=4))
    assert {t.group_id for t in result.trajectories} == {"mixed"}
    np.testing.assert_allclose(result.advantages, [0.65, -0.55, -0.55, 0.45], atol=1e-12)
    assert result.stats.negative_correct_frac_kept == 0.0
    assert result.stats.negative_correct_frac_all == pytest.approx(1 / 6)     # 6 correct drawn, one negative
    assert result.stats.group_std_mean == pytest.approx(math.sqrt(1.23 / 3))
    assert result.stats.removed == {"ranked_out": 4}


def test_without_std_sorting_first_groups_are_kept():
    result = select([paper_draw()], OFRConfig(train_groups=1, group_size=4, std_sort=False))
    assert {t.group_id for t in result.trajectories} == {"all_correct"}
    assert result.stats.negative_correct_frac_kept == 0.25


def test_a_correct_trajectory_at_the_group_mean_is_not_counted_negative():
    # mean 1.2: only the 1.0 is below it; the 1.2s sit at the mean (up to float rounding)
    result = select([group("g", [1.0, 1.2, 1.2, 1.4])], OFRConfig(train_groups=1, group_size=4))
    assert result.stats.negative_correct_frac_all == 0.25
    assert result.stats.negative_correct_frac_kept == 0.25


# ------------------------------------------------------------------ filters (hand-computed)
def filter_draw():
    return (group("zero", [0.0, 0.0, 0.0, 0.0])
            + group("same_tools", [1.1, 1.1, 1.1, 1.1])
            + group("partial", [1.0, 0.0, 1.2, 0.0], p1={"end_reason": "OVER_LENGTH"})
            + group("broken", [1.0, 0.0, 0.0, 0.0], p0={"num_returned_images": 0}, p1={"vision_consistent": False},
                    p2={"end_reason": "EXCEED_MAX_IMAGE_NUM"}, p3={"end_reason": "ERROR_IN_ACTION"}))


def test_filters_remove_by_reason_and_keep_full_group_baseline():
    result = select([filter_draw()], OFRConfig(train_groups=2, group_size=4))
    kept = [(t.group_id, t.reward) for t in result.trajectories]
    # partial (std sqrt(1.23/3) ≈ 0.640) ranks above broken (std 0.5); ERROR_IN_ACTION trajectories stay
    assert kept == [("partial", 1.0), ("partial", 1.2), ("partial", 0.0), ("broken", 1.0), ("broken", 0.0)]
    # before_filter: the baselines include the dropped rollouts — partial mean 2.2/4 = 0.55, broken mean 0.25
    np.testing.assert_allclose(result.advantages, [0.45, 0.65, -0.55, 0.75, -0.25], atol=1e-12)
    assert result.kept == [(0, 8), (0, 10), (0, 11), (0, 12), (0, 15)]
    assert result.stats.removed == {"zero_variance": 8, "end_reason:OVER_LENGTH": 1, "vision_inconsistent": 1,
                                    "end_reason:EXCEED_MAX_IMAGE_NUM": 1}
    assert (result.stats.groups_drawn, result.stats.groups_kept, result.stats.trajectories_kept) == (4, 2, 5)
    assert not result.stats.cap_hit


def test_after_filter_advantages_use_kept_members_only():
    result = select([filter_draw()], OFRConfig(train_groups=2, group_size=4, adv_timing="after_filter"))
    # partial kept [1.0, 1.2, 0.0] → mean 2.2/3; broken kept [1.0, 0.0] → mean 0.5
    m = 2.2 / 3
    np.testing.assert_allclose(result.advantages, [1.0 - m, 1.2 - m, -m, 0.5, -0.5], atol=1e-12)


def test_require_image_drops_trajectories_without_an_image_observation():
    result = select([filter_draw()], OFRConfig(train_groups=2, group_size=4, require_image=True))
    assert ("broken", 1.0) not in [(t.group_id, t.reward) for t in result.trajectories]
    assert result.stats.removed["no_image"] == 1


def test_keep_end_reasons_is_configurable():
    config = OFRConfig(train_groups=2, group_size=4, keep_end_reasons=frozenset({"DONE"}))
    result = select([filter_draw()], config)
    assert result.stats.removed["end_reason:ERROR_IN_ACTION"] == 1


def test_masked_reward_drops_the_whole_group():
    draw = group("masked", [1.0, float("nan"), 0.0, 0.0]) + group("ok", [1.0, 0.0, 0.0, 0.0])
    result = select([draw], OFRConfig(train_groups=2, group_size=4))
    assert {t.group_id for t in result.trajectories} == {"ok"}
    assert result.stats.removed == {"reward_masked": 4}
    assert result.stats.cap_hit


def test_whole_group_mode_never_splits_but_trajectory_mode_can():
    draw = (group("a", [1.0, 0.0, 1.0, 0.0], p1={"end_reason": "OVER_LENGTH"})    # std ≈ 0.577, 3 survive
            + group("b", [1.0, 0.0, 0.0, 0.0])                                     # std 0.5
            + group("c", [1.0, 1.4, 1.4, 1.4]))                                    # std 0.2
    whole = select([draw], OFRConfig(train_groups=1, group_size=4))
    assert [t.group_id for t in whole.trajectories] == ["a", "a", "a"]
    split = select([draw], OFRConfig(train_groups=1, group_size=4, whole_groups=False))
    assert [t.group_id for t in split.trajectories] == ["a", "a", "a", "b"]      # official: cut at 1·4 trajectories
    assert split.stats.removed["ranked_out"] == 3 + 4


def test_bad_draws_are_named():
    with pytest.raises(ValueError, match="group 'g' has 3 trajectories, expected group_size=4"):
        select([group("g", [1.0, 0.0, 0.0])], OFRConfig(group_size=4))
    with pytest.raises(ValueError, match="unknown end_reason 'EXCEED_MAX_IMAGE_NUM_32'"):
        select([group("g", [1.0, 0.0], p0={"end_reason": "EXCEED_MAX_IMAGE_NUM_32"})], OFRConfig(group_size=2))
    with pytest.raises(ValueError, match="max_draws"):
        OFRConfig(max_draws=0)
    with pytest.raises(ValueError, match="keep_end_reasons"):
        OFRConfig(keep_end_reasons=frozenset({"FINISHED"}))


def test_stats_as_log():
    logged = select([paper_draw()], OFRConfig(train_groups=1, group_size=4)).stats.as_log()
    assert logged["ofr/groups_drawn"] == 2.0 and logged["ofr/groups_kept"] == 1.0
    assert logged["ofr/kept_frac"] == 0.5 and logged["ofr/removed/ranked_out"] == 4.0
    assert logged["ofr/cap_hit"] == 0.0
    assert all(isinstance(v, float) for v in logged.values())


# ------------------------------------------------------------------ the draw loop (train.oversample_filter_rank)
class Drawer:
    def __init__(self, batches):
        self.batches, self.calls = list(batches), 0

    def __call__(self):
        self.calls += 1
        return self.batches.pop(0)


def test_draw_loop_draws_until_enough_groups_survive():
    drawer = Drawer([group(0, [0.0] * 4) + group(1, [1.0] * 4),                  # nothing survives
                     group(0, [1.0, 0.0, 0.0, 0.0]) + group(1, [1.0, 1.0, 0.0, 0.0]),
                     group(0, [1.0, 0.0, 1.0, 0.0])])                             # never drawn
    result = oversample_filter_rank(drawer, OFRConfig(train_groups=2, group_size=4, max_draws=5))
    assert drawer.calls == 2
    assert result.stats.draws == 2 and not result.stats.cap_hit
    assert result.kept[0][0] == 1 and len(result.trajectories) == 8


def test_draw_loop_ranks_across_draws_and_keeps_same_ids_apart():
    drawer = Drawer([group(0, [1.0, 0.0, 0.0, 0.0]), group(0, [1.0, 1.0, 0.0, 0.0]), group(0, [1.0, 0.0, 0.0, 0.0])])
    result = oversample_filter_rank(drawer, OFRConfig(train_groups=2, group_size=4, max_draws=2))
    assert drawer.calls == 2
    # the second draw's group (std 0.577) outranks the first (std 0.5); both group_id 0, still two groups
    assert [draw for draw, _ in result.kept] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert result.stats.groups_kept == 2


def test_draw_loop_stops_at_cap_trains_on_what_it_has_and_says_so(caplog):
    drawer = Drawer([group(0, [1.0, 0.0, 0.0, 0.0])] + [group(0, [0.0] * 4)] * 10)
    with caplog.at_level(logging.WARNING, logger="ofr"):
        result = oversample_filter_rank(drawer, OFRConfig(train_groups=3, group_size=4, max_draws=4))
    assert drawer.calls == 4
    assert result.stats.cap_hit and len(result.trajectories) == 4
    assert "draw cap reached (max_draws=4)" in caplog.text and "training on what survived" in caplog.text


def test_draw_loop_returns_empty_when_nothing_survives(caplog):
    drawer = Drawer([group(0, [0.0] * 4)] * 3)
    with caplog.at_level(logging.WARNING, logger="ofr"):
        result = oversample_filter_rank(drawer, OFRConfig(train_groups=1, group_size=4, max_draws=3))
    assert result.trajectories == [] and result.advantages.shape == (0,)
    assert math.isnan(result.stats.group_std_mean) and math.isnan(result.stats.negative_correct_frac_kept)
    assert "skip this update" in caplog.text


def test_draw_loop_rejects_an_empty_draw():
    with pytest.raises(ValueError, match="an empty generation batch"):
        oversample_filter_rank(lambda: [], OFRConfig())


# ------------------------------------------------------------------ properties
REWARDS = st.sampled_from([0.0, 0.25, 0.6, 1.0, 1.1, 1.2, 1.3, 1.4])
END = st.sampled_from(sorted(ofr.END_REASONS))


@st.composite
def grouped_rewards(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    order = draw(st.permutations(range(len(ids))))
    ids = [ids[i] for i in order]
    return draw(st.lists(REWARDS, min_size=len(ids), max_size=len(ids))), ids


@settings(max_examples=200, deadline=None)
@given(grouped_rewards(), st.booleans())
def test_advantages_sum_to_zero_in_every_group(data, std_norm):
    rewards, ids = data
    adv = group_advantages(rewards, ids, std_norm=std_norm)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g]
        if len(members) > 1:
            assert abs(adv[members].sum()) < 1e-9


@settings(max_examples=100, deadline=None)
@given(grouped_rewards(), st.randoms())
def test_advantages_do_not_depend_on_rollout_order(data, rng):
    rewards, ids = data
    order = list(range(len(ids)))
    rng.shuffle(order)
    adv = group_advantages(rewards, ids)
    shuffled = group_advantages([rewards[i] for i in order], [ids[i] for i in order])
    assert np.array_equal(shuffled, adv[order])


@st.composite
def trajectory_draws(draw, group_size=4):
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        batch = []
        for g in range(draw(st.integers(1, 5))):
            for _ in range(group_size):
                reward = draw(REWARDS)
                batch.append(Traj(g, reward, correct=reward >= 1.0, end_reason=draw(END),
                                  num_returned_images=draw(st.integers(0, 2)), vision_consistent=draw(st.booleans())))
        batches.append(batch)
    return batches


def surviving_groups(batches, config):
    """Reference filter: (draw, group) → (std, surviving positions)."""
    out = {}
    for d, batch in enumerate(batches):
        for g in {t.group_id for t in batch}:
            positions = [p for p, t in enumerate(batch) if t.group_id == g]
            rewards = [batch[p].reward for p in positions]
            if max(rewards) == min(rewards):
                continue
            alive = [p for p in positions if batch[p].vision_consistent and batch[p].end_reason in config.keep_end_reasons
                     and not (config.require_image and batch[p].num_returned_images == 0)]
            if alive:
                out[(d, g)] = (float(np.std(rewards, ddof=1)), alive)
    return out


@settings(max_examples=150, deadline=None)
@given(trajectory_draws(), st.integers(1, 6), st.booleans())
def test_whole_group_ranking_keeps_highest_std_groups_unsplit(batches, train_groups, require_image):
    config = OFRConfig(train_groups=train_groups, group_size=4, require_image=require_image)
    result = select(batches, config)
    survivors = surviving_groups(batches, config)
    kept_groups = {(d, batches[d][p].group_id) for d, p in result.kept}
    assert len(kept_groups) == min(train_groups, len(survivors))
    for key in kept_groups:                      # never split: every surviving member of a kept group is kept
        assert sorted(p for d, p in result.kept if (d, batches[d][p].group_id) == key) == survivors[key][1]
    dropped = set(survivors) - kept_groups
    if kept_groups and dropped:
        assert min(survivors[k][0] for k in kept_groups) >= max(survivors[k][0] for k in dropped) - 1e-12
    assert result.stats.cap_hit == (len(survivors) < train_groups)


@settings(max_examples=150, deadline=None)
@given(trajectory_draws(), st.integers(1, 4))
def test_trajectory_ranking_keeps_target_count_and_highest_stds(batches, train_groups):
    config = OFRConfig(train_groups=train_groups, group_size=4, whole_groups=False)
    result = select(batches, config)
    survivors = surviving_groups(batches, config)
    alive = [(std, (d, p)) for (d, _), (std, positions) in survivors.items() for p in positions]
    assert len(result.kept) == min(config.target_trajectories, len(alive))
    kept = set(result.kept)
    kept_stds = [std for std, key in alive if key in kept]
    other_stds = [std for std, key in alive if key not in kept]
    if kept_stds and other_stds:
        assert min(kept_stds) >= max(other_stds) - 1e-12


@settings(max_examples=100, deadline=None)
@given(trajectory_draws(), st.integers(1, 4), st.integers(1, 3))
def test_draw_loop_is_bounded_and_stops_once_enough(batches, train_groups, max_draws):
    source = iter(batches * max_draws)
    calls = []

    def draw():
        calls.append(1)
        return next(source)

    config = OFRConfig(train_groups=train_groups, group_size=4, max_draws=max_draws)
    result = oversample_filter_rank(draw, config)
    assert len(calls) == result.stats.draws <= max_draws
    if not result.stats.cap_hit:
        assert result.stats.groups_kept == train_groups
    elif result.stats.draws < max_draws:
        pytest.fail("stopped early without enough groups")
