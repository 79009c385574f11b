"""VocabParallelEmbedding / ParallelLMHead equal nn.Embedding / the full logits matmul.

TP=2 over gloo in one spawn; TP=1 in-process.
"""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed

from runtime.parallel import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size

ATOL = 1e-5


def _embedding_checks(rank, world_size, seed):
    torch.manual_seed(seed)  # same "checkpoint" on every rank
    checks = 0
    # 37: smaller than one rank's shard at tp=2 (rank 1 holds only padding);
    # 200: splits unevenly into real rows; 256: no padding at all.
    for vocab in (37, 200, 256):
        dim = 8
        weight = torch.randn(vocab, dim)
        ids = torch.cat([torch.tensor([0, vocab - 1]), torch.randint(0, vocab, (13,))])
        hidden = torch.randn(3, 5, dim)

        embed = VocabParallelEmbedding(vocab, dim)
        assert embed.num_embeddings_padded == pad_vocab_size(vocab, world_size)
        assert embed.num_embeddings_padded % (64 * world_size) == 0
        embed.weight.weight_loader(embed.weight, weight)
        reference = torch.nn.Embedding(vocab, dim)
        reference.weight.data.copy_(weight)
        torch.testing.assert_close(embed(ids), reference(ids), atol=0, rtol=0)
        torch.testing.assert_close(embed(ids.view(3, 5)), reference(ids.view(3, 5)))

        for use_bias in (False, True):
            bias = torch.randn(vocab)
            head = ParallelLMHead(vocab, dim, bias=use_bias)
            head.weight.weight_loader(head.weight, weight)
            if use_bias:
                head.bias.weight_loader(head.bias, bias)
            logits = head(hidden)  # [3, 5, vocab]
            expected = F.linear(hidden, weight, bias if use_bias else None)
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

        # Tied embeddings (HF's tie_word_embeddings): one parameter, loaded once.
        tied_embed = VocabParallelEmbedding(vocab, dim)
        tied_head = ParallelLMHead(vocab, dim)
        tied_head.weight = tied_embed.weight
        tied_head.weight.weight_loader(tied_head.weight, weight)
        torch.testing.assert_close(tied_head(hidden), F.linear(hidden, weight), atol=ATOL, rtol=0)
        torch.testing.assert_close(tied_embed(ids), reference(ids), atol=0, rtol=0)
        checks += 4

    embed = VocabParallelEmbedding(100, 8)
    with pytest.raises(ValueError, match=r"shape \(99, 8\), expected \(100, 8\)"):
        embed.weight.weight_loader(embed.weight, torch.randn(99, 8))
    with pytest.raises(ValueError, match=r"shape \(100, 4\), expected \(100, 8\)"):
        embed.weight.weight_loader(embed.weight, torch.randn(100, 4))
    with pytest.raises(ValueError, match="takes no shard id"):
        embed.weight.weight_loader(embed.weight, torch.randn(100, 8), 0)
    return checks + 3


def test_embedding_and_lm_head_tp2_match_unsharded():
    assert run_distributed(_embedding_checks, 2, 7) == [15, 15]


def test_embedding_and_lm_head_tp1_match_unsharded():
    assert _embedding_checks(0, 1, 3) == 15


def test_padding_rows_are_zero_and_dtype_follows_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        head = ParallelLMHead(70, 4, bias=True)
        assert head.weight.dtype == torch.float64
        assert ParallelLMHead(70, 4, params_dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    finally:
        torch.set_default_dtype(old)
    head.weight.weight_loader(head.weight, torch.randn(70, 4))
    head.bias.weight_loader(head.bias, torch.randn(70))
    assert head.weight.shape == (128, 4)
    assert torch.all(head.weight[70:] == 0) and torch.all(head.bias[70:] == 0)
    assert head(torch.randn(2, 4, dtype=torch.float64)).shape == (2, 70)
