"""Sampler: greedy, temperature, top-k/top-p/min-p, repetition penalty, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime.engine.sampler import Sampler, apply_frequency_presence_penalties, apply_top_k_top_p
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.sequence import Sequence


def seqs_for(params: list[SamplingParams], prompt=(1, 2, 3)) -> list[Sequence]:
    return [Sequence(i, list(prompt), p, 4) for i, p in enumerate(params)]


def test_greedy_rows_take_argmax_in_a_mixed_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=t) for t in (0, 1.0, 0, 0.5, 0)]
    tokens, lp = Sampler()(logits, seqs_for(params))
    assert lp is None
    for i in (0, 2, 4):
        assert tokens[i] == int(logits[i].argmax())


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)]
)
def test_filters_that_leave_one_token_are_greedy(params: SamplingParams) -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    tokens, _ = Sampler()(logits, seqs_for([params] * 8))
    assert tokens == logits.argmax(-1).tolist()


def test_samples_follow_the_filtered_distribution() -> None:
    torch.manual_seed(2)
    vocab, rows = 6, 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.95)
    tokens, _ = Sampler()(base.expand(rows, vocab).clone(), seqs_for([params] * rows))
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float() / rows
    # transformers' warpers on the same logits give the expected distribution.
    ref = TopPLogitsWarper(0.95)(None, TopKLogitsWarper(4)(None, (base / 0.7)[None]))
    expected = ref.softmax(-1)[0]
    assert counts[expected == 0].sum() == 0
    assert torch.allclose(counts, expected, atol=0.015)


def test_top_k_top_p_match_transformers_warpers() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 30)
    k = torch.tensor([3, 30, 10, 1])
    p = torch.tensor([0.9, 0.5, 1.0, 0.3])
    ours = apply_top_k_top_p(logits, k, p)
    for i in range(4):
        ref = TopPLogitsWarper(float(p[i]))(
            None, TopKLogitsWarper(int(k[i]))(None, logits[i : i + 1])
        )
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref[0])), i


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 12)
    prompts = [[1, 5, 5, 7], [0, 11]]
    params = SamplingParams(temperature=0, repetition_penalty=1.7)
    seqs = [Sequence(i, p, params, 4) for i, p in enumerate(prompts)]
    proc = RepetitionPenaltyLogitsProcessor(1.7)
    for i, prompt in enumerate(prompts):
        expected = proc(torch.tensor([prompt]), logits[i : i + 1].clone())
        tokens, _ = Sampler()(logits[i : i + 1], seqs[i : i + 1])
        assert tokens[0] == int(expected.argmax())
    # The penalty changes the choice when the argmax was already seen.
    logits = torch.tensor([[0.0, 2.0, 1.9]])
    seq = Sequence(0, [1], params, 4)
    assert Sampler()(logits, [seq])[0] == [2]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 1000)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.0)
    alone = [Sampler()(logits[1:2], seqs_for([seeded]))[0][0] for _ in range(1)]
    s = seqs_for([other, seeded, other])
    in_batch = Sampler()(logits, s)[0][1]
    assert alone[0] == in_batch
    # The stream continues: the next draws differ from restarting, and repeat per seed.
    a = seqs_for([seeded])
    b = seqs_for([seeded])
    draws_a = [Sampler()(logits[1:2], a)[0][0] for _ in range(20)]
    draws_b = [Sampler()(logits[1:2], b)[0][0] for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) > 1
    c = seqs_for([SamplingParams(temperature=1.0, seed=4321)])
    assert [Sampler()(logits[1:2], c)[0][0] for _ in range(20)] != draws_a


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(6)
    logits = torch.randn(2, 20)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.5)]
    tokens, lps = Sampler()(logits, seqs_for(params))
    ref = torch.log_softmax(logits, -1)
    chosen, top = lps[0]
    assert chosen == pytest.approx(float(ref[0, tokens[0]]), abs=1e-6)
    assert list(top) == ref[0].topk(3).indices.tolist()
    assert lps[1] is None


def reference_openai_penalties(
    logits: torch.Tensor, outputs: list[list[int]], frequency: list[float], presence: list[float]
) -> torch.Tensor:
    """OpenAI's formula row by row, token by token."""
    out = logits.clone()
    for i, tokens in enumerate(outputs):
        for token in set(tokens):
            count = tokens.count(token)
            out[i, token] -= frequency[i] * count + presence[i] * (count > 0)
    return out


def test_frequency_and_presence_penalties_match_a_reference() -> None:
    torch.manual_seed(7)
    vocab = 40
    logits = torch.randn(5, vocab)
    prompts = [[1, 2, 3], [4], [5, 5], [6], [7, 8]]
    outputs = [[9, 9, 9, 1], [], [10, 11, 10], [39, 0, 39], [12]]
    frequency = [0.5, 1.0, 0.0, -0.7, 0.0]
    presence = [0.0, 0.3, 1.5, 0.2, 0.0]
    seqs = []
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        params = SamplingParams(
            temperature=0, frequency_penalty=frequency[i], presence_penalty=presence[i]
        )
        seq = Sequence(i, prompt, params, 4)
        for t in out:
            seq.append_token(t)
        seqs.append(seq)
    ours = logits.clone()
    apply_frequency_presence_penalties(ours, seqs, frequency, presence)
    expected = reference_openai_penalties(logits, outputs, frequency, presence)
    assert torch.allclose(ours, expected, atol=1e-6)
    # Prompt tokens are not penalised (only the output); row 4 has no penalty at all.
    assert ours[0, 2] == logits[0, 2] and torch.equal(ours[4], logits[4])
    # Through the sampler: greedy picks the argmax of the penalised logits.
    tokens, _ = Sampler()(logits, seqs)
    assert tokens == expected.argmax(-1).tolist()


def test_penalties_combine_in_vllms_order_with_sampling() -> None:
    """Repetition penalty (prompt + output), then frequency/presence (output), then the
    filters: with top_k=1 the sample is the argmax of that, in a batch mixing rows."""
    torch.manual_seed(8)
    vocab = 30
    logits = torch.randn(3, vocab) * 3
    params = [
        SamplingParams(temperature=0.8, top_k=1, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=1, presence_penalty=-1.0),
    ]
    seqs = seqs_for(params, prompt=(1, 2, 3))
    for seq in seqs:
        for t in logits[seq.seq_id].topk(3).indices.tolist():
            seq.append_token(t)
    expected = logits.clone()
    for i, seq in enumerate(seqs):
        rp = RepetitionPenaltyLogitsProcessor(params[i].repetition_penalty)
        expected[i] = rp(torch.tensor([seq.token_ids]), expected[i : i + 1].clone())[0]
    expected = reference_openai_penalties(
        expected,
        [s.output_token_ids for s in seqs],
        [p.frequency_penalty for p in params],
        [p.presence_penalty for p in params],
    )
    tokens, _ = Sampler()(logits, seqs)
    assert tokens == expected.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan")])
def test_openai_penalties_are_range_checked(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_samples_of_one_seeded_request_differ_and_repeat() -> None:
    params = SamplingParams(temperature=1.0, seed=10, stop=["x"])
    assert params.for_sample(0) is params
    assert [params.for_sample(i).seed for i in range(3)] == [10, 11, 12]
    assert params.for_sample(2).stop_strings == ["x"]
    unseeded = SamplingParams(temperature=1.0)
    assert unseeded.for_sample(3) is unseeded
    torch.manual_seed(9)
    logits = torch.randn(1, 1000)

    def draws(index: int) -> list[int]:
        seqs = seqs_for([params.for_sample(index)])
        return [Sampler()(logits, seqs)[0][0] for _ in range(8)]

    samples = [draws(i) for i in range(3)]
    assert len({tuple(d) for d in samples}) == 3
    assert draws(1) == samples[1]


def test_huge_values_in_one_row_do_not_break_the_batch() -> None:
    """A request's top_k or logprobs beyond the vocabulary means all of it, and must not
    fail the step it shares with other requests."""
    torch.manual_seed(10)
    logits = torch.randn(2, 16)
    params = [
        SamplingParams(temperature=1.0, top_k=10**30, logprobs=10**6, seed=2**64 - 1),
        SamplingParams(temperature=1.0, top_k=1),
    ]
    tokens, lps = Sampler()(logits, seqs_for(params))
    assert tokens[1] == int(logits[1].argmax())
    assert len(lps[0][1]) == 16 and lps[1] is None
    assert params[0].for_sample(1).seed == 0  # seeds wrap within torch's 64 bits
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
