"""dory's recurrent_kv_cache_mode="last_loop" against transformers' cached path.

In this mode HF's earlier recurrent loops attend over the last loop's cached past (read
without writing), so its logits depend on how the sequence was fed: the cached forward
differs from the whole-sequence one (by ~2e-3 here). Parity is with the cached path, fed
in the same pieces: a prefill, a 3-token chunk, then single-token decodes.
"""

from __future__ import annotations

import torch
from configs import CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from hf2paged.verify.parity import PagedSequences
from runtime.engine.build_model import build_model

PIECES = [6, 3, 1, 1, 1, 1, 1]  # tokens per forward


def test_last_loop_matches_hf_cached_path(tmp_path):
    config = AutoConfig.for_model(
        "dory", **dict(CONFIGS["dory"], recurrent_kv_cache_mode="last_loop")
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    model = build_model(tmp_path)
    tokens = torch.randint(3, config.vocab_size, (sum(PIECES),)).tolist()
    cache, runner = DynamicCache(config=config), PagedSequences(model, 4, 16, "cpu", torch.float32)
    start, diffs = 0, []
    with torch.inference_mode():
        whole = hf(input_ids=torch.tensor([tokens])).logits[0]  # [T, vocab]
        for n in PIECES:
            piece = tokens[start : start + n]
            ref = hf(input_ids=torch.tensor([piece]), cache=cache, use_cache=True).logits[0]
            ours = runner.step([(0, piece)])[0]  # [n, vocab]
            diffs.append((ours - ref).abs().max().item())
            start += n
        cached_vs_whole = (ref - whole[-1:]).abs().max().item()
    print("dory last_loop: max |logit diff| per piece", [f"{d:.1e}" for d in diffs])
    assert max(diffs) < 1e-4
    assert cached_vs_whole > 1e-4  # the mode is exercised: HF's two paths differ
