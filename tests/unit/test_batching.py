"""Step plans: which samples each rank trains, packing bins, and the token-normalized loss."""

from dataclasses import dataclass

import pytest
import torch

from clustertune.batch_math import batch_layout, total_steps
from clustertune.config import TrainSection
from clustertune.worker.batching import collate, pack_bins, plan_step, step_sample_indices


@dataclass
class S:
    input_ids: list
    targets: list


def layout(world, micro=2, global_batch=8, packing=False):
    return batch_layout(TrainSection(max_steps=1, global_batch_size=global_batch, micro_batch_size=micro),
                        world_size=world, packing=packing)


def test_each_step_covers_disjoint_samples_and_epochs_reshuffle():
    seen = [step_sample_indices(s, num_samples=20, global_batch_size=5, seed=1) for s in range(4)]
    flat = [i for step in seen for i in step]
    assert sorted(flat) == list(range(20))
    epoch1 = [i for s in range(4, 8) for i in step_sample_indices(s, num_samples=20, global_batch_size=5, seed=1)]
    assert sorted(epoch1) == list(range(20)) and epoch1 != flat
    assert total_steps(num_samples=20, global_batch_size=5, max_steps=None, epochs=2.0) == 8


def test_unpacked_plan_splits_evenly():
    lengths = [5] * 8
    plan = plan_step(0, list(range(8)), lengths=lengths, units=[2] * 8, layout=layout(2), packing=False,
                     token_budget=0)
    assert plan.per_rank == (((0, 1), (2, 3)), ((4, 5), (6, 7)))
    assert plan.loss_units == 16


def test_packing_bins_respect_budget_and_keep_every_sample():
    lengths = [7, 3, 5, 2, 9, 1, 4]
    bins = pack_bins(range(7), lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 31 tokens need >= 4 rows of 10
    with pytest.raises(ValueError, match="more than the packing budget"):
        pack_bins([0], [11], budget=10)


def test_packed_plan_gives_every_rank_the_same_number_of_micro_batches():
    lengths = [9, 9, 9, 1, 1]
    plan = plan_step(0, list(range(5)), lengths=lengths, units=[1] * 5, layout=layout(2, packing=True),
                     packing=True, token_budget=10)
    depths = {len(r) for r in plan.per_rank}
    assert depths == {plan.micro_batches_per_rank}
    assert sorted(i for r in plan.per_rank for g in r for i in g) == list(range(5))


def test_collate_packed_restarts_positions():
    batch = collate([S([1, 2, 3], [2, 3, -100]), S([4, 5], [5, -100])], packing=True, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["attention_mask"] is None


def test_collate_padded_masks_and_ignores_padding():
    batch = collate([S([1, 2, 3], [2, 3, -100]), S([4], [-100])], packing=False, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, -100], [-100, -100, -100]]


def test_token_normalized_accumulation_equals_one_big_batch():
    """sum over micro-batches and ranks of (token-loss sum * world / step tokens), averaged over
    ranks as DeepSpeed does, equals the mean over all trained tokens of the big batch."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)
    docs = [torch.randn(n, 4) for n in (3, 7, 1, 5)]
    targets = [torch.randint(0, 6, (n,)) for n in (3, 7, 1, 5)]

    def token_losses(i):
        return torch.nn.functional.cross_entropy(docs[i] @ weight.T, targets[i], reduction="none")

    big = torch.cat([token_losses(i) for i in range(4)]).mean()
    (g_big,) = torch.autograd.grad(big, weight)

    world, total = 2, 16
    per_rank = [[0, 1], [2, 3]]  # one micro-batch per sample, two per rank
    grads = []
    for docs_of_rank in per_rank:
        g = torch.zeros_like(weight)
        for i in docs_of_rank:
            (gi,) = torch.autograd.grad(token_losses(i).sum() * world / total, weight)
            g += gi
        grads.append(g)
    averaged = sum(grads) / world
    torch.testing.assert_close(averaged, g_big)
