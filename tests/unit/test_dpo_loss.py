"""DPO's loss is what the paper says, computed the plain way: one micro-batch's loss and gradients
equal a direct computation with the HF model, one sequence at a time (no packing, no padding), to
1e-5; a packed micro-batch equals the padded one; label smoothing and the metrics."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.config import DpoSection
from clustertune.data.types import IGNORE_INDEX, PreferencePair, Sample
from clustertune.shapes import SHAPES
from clustertune.worker.batching import StepPlan
from clustertune.worker.objectives import objective_for
from clustertune.worker.objectives.dpo import DirectPreferenceOptimization, SegmentLogProbModel, dpo_losses

PAD = 0


def make_pairs(count, seed=0):
    """Pairs sharing a random prompt, with completions of different lengths; completion tokens
    are the trained ones (pre-shifted targets, as data/chat.py makes them)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for k in range(count):
        prompt = torch.randint(3, 128, (5 + k,), generator=g).tolist()

        def sample(n):
            ids = prompt + torch.randint(3, 128, (n,), generator=g).tolist()
            targets = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):] + [IGNORE_INDEX]
            return Sample(ids, targets)
        pairs.append(PreferencePair(sample(3 + k), sample(6 - k % 3)))
    return pairs


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).float()


def direct_logp(lm, sample):
    """Sum of log p(completion token) with a plain HF forward over the sequence alone."""
    ids = torch.tensor([sample.input_ids])
    logits = lm(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    total = logps.new_zeros(())
    for i, t in enumerate(sample.targets):
        if t != IGNORE_INDEX:
            total = total + logps[i, t]
    return total


def objective(packing, beta=0.1, label_smoothing=0.0):
    return objective_for("dpo", packing=packing, pad_id=PAD, dpo=DpoSection(beta=beta, label_smoothing=label_smoothing),
                         token_budget=4096)


def reference_for(pairs):
    # Not the policy's own values, so the loss is not at its log(2) starting point.
    return {p.key: (-30.0 - i, -25.0 + 2 * i) for i, p in enumerate(pairs)}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_one_step_loss_and_gradients_equal_the_direct_computation(packing, label_smoothing):
    pairs = make_pairs(3)
    reference = reference_for(pairs)
    beta = 0.5

    lm = tiny_lm()
    direct_losses = []
    for p in pairs:
        ref_c, ref_r = reference[p.key]
        logit = beta * ((direct_logp(lm, p.chosen) - ref_c) - (direct_logp(lm, p.rejected) - ref_r))
        direct_losses.append(-(1 - label_smoothing) * torch.nn.functional.logsigmoid(logit)
                             - label_smoothing * torch.nn.functional.logsigmoid(-logit))
    direct = torch.stack(direct_losses).mean()
    direct.backward()
    expected = grads(lm)

    dpo = objective(packing, beta=beta, label_smoothing=label_smoothing)
    dpo.set_reference(reference, pairs)
    model = SegmentLogProbModel(tiny_lm())
    out = dpo.micro_batch_loss(model, pairs, device=torch.device("cpu"))
    (out.loss_sum / len(pairs)).backward()
    got = {n.removeprefix("lm."): g for n, g in grads(model).items()}

    assert abs(out.loss_sum.item() / len(pairs) - direct.item()) < 1e-5
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-4 for g in expected.values())  # the comparison is not of zeros


def test_packed_equals_padded_segment_logps_and_gradients():
    pairs = make_pairs(4, seed=3)
    results = {}
    for packing in (False, True):
        model = SegmentLogProbModel(tiny_lm(seed=1))
        dpo = objective(packing)
        dpo.set_reference(reference_for(pairs), pairs)
        logps = dpo.segment_logps(model, pairs, device=torch.device("cpu"))
        dpo.micro_batch_loss(model, pairs, device=torch.device("cpu")).loss_sum.backward()
        results[packing] = (logps.detach(), grads(model))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_filler_micro_batch_adds_nothing_but_runs_a_backward():
    dpo = objective(True)
    model = SegmentLogProbModel(tiny_lm())
    out = dpo.micro_batch_loss(model, [], device=torch.device("cpu"))
    assert out.loss_sum.item() == 0.0 and out.loss_sum.requires_grad
    out.loss_sum.backward()
    assert all(v.item() == 0.0 for v in out.metric_sums.values())


def test_losses_rewards_and_metrics():
    pc, pr = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    rc, rr = torch.tensor([-11.0, -8.0]), torch.tensor([-11.0, -8.0])
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.1]))
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([0.2, -0.1])))
    smoothed, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.1, label_smoothing=0.25)
    assert smoothed[0].item() == pytest.approx(0.75 * math.log1p(math.exp(-0.2)) + 0.25 * math.log1p(math.exp(0.2)))

    plan = StepPlan(step=0, per_rank=(((0, 1),),), loss_units=2)
    sums = {"reward_margin": 0.1, "pref_accuracy": 1.0, "logps_chosen": -18.0, "logps_rejected": -19.0,
            "rewards_chosen": 0.1, "rewards_rejected": 0.0}
    record = DirectPreferenceOptimization(packing=False, pad_id=0, dpo=DpoSection(), token_budget=64).step_metrics(sums, plan)
    assert record == {"pairs": 2, "reward_margin": 0.05, "pref_accuracy": 0.5, "logps_chosen": -9.0,
                      "logps_rejected": -9.5, "rewards_chosen": 0.05, "rewards_rejected": 0.0}


def test_a_pair_is_one_loss_unit_and_packs_whole():
    pair = make_pairs(1)[0]
    dpo = objective(True)
    assert dpo.loss_units(pair) == 1
    assert pair.input_ids == pair.chosen.input_ids + pair.rejected.input_ids
    assert pair.num_trained == pair.chosen.num_trained + pair.rejected.num_trained
