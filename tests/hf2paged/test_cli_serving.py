"""`hf2paged generate` / `bench` through typer's CliRunner, on a tiny random Llama with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hf2paged.cli import app

PROMPT = "hello world, the quick brown fox"


def _tiny_tokenizer():
    """A byte-level BPE trained on one sentence: decodes any id, no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([PROMPT + " jumps over the lazy dog"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    return fast


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _hf_greedy_text(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens)
    return tok.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_generate_streams_the_greedy_text(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    result = _invoke(
        "generate", str(tiny_model_dir), "-p", PROMPT, "--max-tokens", "12", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"]
    expected = _hf_greedy_text(tiny_model_dir, prompt_ids, 12)
    assert expected.strip(), "the random model should say something"
    assert result.stdout.rstrip("\n") == expected


def test_generate_chat_and_sampling_options(tiny_model_dir: Path) -> None:
    args = [
        "generate",
        str(tiny_model_dir),
        "-p",
        "fox",
        "--chat",
        "--max-tokens",
        "6",
        "--device",
        "cpu",
    ]
    args += ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--dtype", "float32"]
    first, second = _invoke(*args), _invoke(*args)
    assert first.exit_code == 0, first.output
    # A seeded request samples the same tokens every time.
    assert first.stdout == second.stdout and first.stdout.strip()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "is not a directory"),
        (
            lambda d: [(d / n).write_text("x") for n in ("a.gguf", "b.gguf")] and d,
            "several .gguf files",
        ),
        (lambda d: d, "has no config.json"),
        (lambda d: (d / "config.json").write_text("{") and d, "is not valid JSON"),
        (lambda d: (d / "config.json").write_text("{}") and d, "has no weights"),
    ],
)
def test_bad_model_dir_is_one_line_and_exit_2(tmp_path: Path, make, message: str) -> None:
    result = _invoke("generate", str(make(tmp_path)), "-p", "hi")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_bad_option_values_exit_2(tiny_model_dir: Path) -> None:
    bad = [["--temperature", "-1"], ["--top-p", "0"], ["--max-tokens", "0"], ["--dtype", "int8"]]
    bad += [["--device", "gpu"], ["--tp", "0"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        result = _invoke("generate", str(tiny_model_dir), "-p", "hi", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_unconverted_architecture_names_the_convert_command(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _invoke("generate", str(tmp_path), "-p", "hi", "--device", "cpu")
    assert result.exit_code == 1
    assert "hf2paged convert" in result.stderr and result.stderr.count("\n") == 1


def test_bench_smoke_on_cpu() -> None:
    result = _invoke(
        "bench",
        "--model",
        "tiny",
        "-n",
        "4",
        "--min-len",
        "4",
        "--max-len",
        "12",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "output tok/s" in result.stdout and "4 requests" in result.stdout


def test_generate_tp2_streams_the_same_greedy_text(tiny_model_dir: Path) -> None:
    args = ["generate", str(tiny_model_dir), "-p", PROMPT, "--max-tokens", "8", "--device", "cpu"]
    tp1, tp2 = _invoke(*args), _invoke(*args, "--tp", "2")
    assert tp1.exit_code == 0 and tp2.exit_code == 0, tp2.output
    assert tp1.stdout == tp2.stdout and tp1.stdout.strip()
