"""TP=2 (gloo): attention whose tp_plan style the config picks (converter/passes/tp/cases.py)
runs sharded where the layout allows it, gathered where it does not, and stays at parity.

Falcon's one generated module holds three query_key_value layouts: grouped (KV groups
per rank), multi-query (q split per segment, the one K/V head on every rank) and
interleaved MHA (whole heads per rank); 3 heads over 2 ranks fall back to gathering.
GPTBigCode's c_attn: interleaved per head and multi-query both shard; the MQA arm's split
of c_attn's output takes the layer's local sizes.
"""

from __future__ import annotations

from distributed import run_distributed
from harness import ATOL, SCENARIO, from_worker, report
from transformers import AutoConfig

from hf2paged.verify.parity import run_generated
from runtime.engine.build_model import build_model

# case -> (fused projection, (sharded, local query heads, local KV heads, its local rows))
# at TP=2. FALCON / GPT: hidden 64, 4 heads of 16 unless the case changes them.
EXPECTED = {
    "falcon": ("query_key_value", (True, 2, 1, (2 * 2 + 4) * 16 // 2)),  # a KV group per rank
    "falcon_mqa": ("query_key_value", (True, 2, 1, (4 // 2 + 2) * 16)),  # [q_r | k | v]
    "falcon_alibi": ("query_key_value", (True, 8, 8, 3 * 64 // 2)),  # 16 interleaved heads
    "falcon_mqa_odd": ("query_key_value", (False, 3, 1, (3 + 2) * 16 // 2)),  # gathered
    "gpt_bigcode_mha": ("c_attn", (True, 2, 2, 3 * 64 // 2)),  # interleaved per head
    "gpt_bigcode": ("c_attn", (True, 2, 1, 64 // 2 + 2 * 16)),  # MQA: [q_r | k | v]
}


def _worker(rank: int, world_size: int, jobs: list[tuple[str, str, list[list[int]]]]):
    out = {}
    for arch, model_dir, tokens in jobs:
        model = build_model(model_dir, tp=world_size)
        layers = [m for m in model.modules() if hasattr(m, "shard_heads")]
        proj = EXPECTED[arch][0]
        facts = {
            (
                bool(m.shard_heads),
                m.attn.num_heads,
                m.attn.num_kv_heads,
                getattr(m, proj).weight.shape[0],
            )
            for m in layers
        }
        records = run_generated(model, tokens, SCENARIO)
        for r in records:
            r.logits = r.logits.numpy()
        out[arch] = (len(layers), facts, records)
    return out


def test_attention_shards_by_layout_tp2(cases):
    chosen = {arch: cases(arch) for arch in EXPECTED}
    jobs = [(a, str(c.model_dir), c.tokens) for a, c in chosen.items()]
    per_rank = run_distributed(_worker, 2, jobs, timeout=600)
    failures = []
    for arch, case in chosen.items():
        for out in per_rank:
            n_layers, facts, _ = out[arch]
            assert n_layers == case_layers(case), arch
            assert facts == {EXPECTED[arch][1]}, (arch, facts)
        result = report(case, from_worker(per_rank[0][arch][2]))
        print("TP=2", result.format())
        if result.max_diff >= ATOL:
            failures.append(result.format())
    assert not failures, "\n".join(failures)


def case_layers(case) -> int:
    return AutoConfig.from_pretrained(case.model_dir).num_hidden_layers
