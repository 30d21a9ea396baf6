"""A published GGUF run in llama.cpp itself, beside the merged model in transformers: the optional
check that the file behaves in the runtime it is served with, not only when transformers reads it
back (what `export_fidelity` does on every publish).

    make llama-cpp                          # builds llama-cpp-python once, then checks the demo
    python -m loraflow.llama_cpp <pipeline> # once llama-cpp-python is installed

For each GGUF file of the pipeline's latest published version, on the first held-out conversations
of the dataset it was trained on: llama.cpp's tokenization of each rendered prompt (with the
file's own vocabulary and pre-tokenizer) against the tokenizer's, and llama.cpp's greedy answer
against transformers' greedy answer from the merged safetensors. It exits non-zero when a prompt
tokenizes differently or the answers agree less than `export_fidelity` requires for the type.
Not part of `make test`: llama-cpp-python compiles llama.cpp from source.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from loraflow.dataset import load_split
from loraflow.export import ANSWER_AGREEMENT, agreement, greedy_answers
from loraflow.formatting import render
from loraflow.merge import latest_published, published_record, stop_token_ids


def llama_cpp_answers(gguf: Path, prompts: list[str], max_new_tokens: int, stops: list[int]):
    """(prompt token ids, greedy answer token ids) per prompt, from llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    out = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        answer = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            answer.append(token)  # the stop token too, as transformers' generate keeps it
            if token in stops or len(answer) >= max_new_tokens:
                break
        out.append((ids, answer))
    return out


def check(pipeline: str, home: Path, n: int = 8, max_new_tokens: int = 40) -> bool:
    from transformers import AutoModelForCausalLM

    from loraflow.base_model import load_tokenizer

    found = latest_published(home / "models" / pipeline)
    if found is None:
        raise SystemExit(f"{home / 'models' / pipeline}: nothing published yet; run the pipeline first")
    version, folder = found
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(
            f"{folder}: no GGUF file; set publish.exports: [safetensors, gguf] and publish again"
        )
    dataset = home / "datasets" / pipeline / published_record(folder)["dataset_version"]
    conversations = [r["messages"] for r in load_split(dataset, "eval") if r["messages"]][:n]

    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stops = stop_token_ids(model.generation_config)
    prompts = [render(tokenizer, c[:-1], add_generation_prompt=True) for c in conversations]
    prompt_ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
    reference = greedy_answers(model, prompt_ids, max_new_tokens, stops, tokenizer.pad_token_id)

    print(f"{pipeline} {version}: {len(prompts)} held-out prompts, answers of up to {max_new_tokens} tokens")
    print("| file | prompts tokenized alike | greedy answers identical | tokens agreeing | required |")
    print("|---|---|---|---|---|")
    passed = True
    for gguf in ggufs:
        gguf_type = gguf.stem.rsplit("-", 1)[-1]
        results = llama_cpp_answers(gguf, prompts, max_new_tokens, stops)
        same_prompt = sum(ids == p[0].tolist() for (ids, _), p in zip(results, prompt_ids, strict=True))
        shares = [agreement(a, r) for (_, a), r in zip(results, reference, strict=True)]
        mean = sum(shares) / len(shares)
        required = ANSWER_AGREEMENT.get(gguf_type, 1.0)
        passed &= same_prompt == len(prompts) and mean >= required
        identical = sum(s == 1.0 for s in shares)
        print(
            f"| {gguf.name} | {same_prompt}/{len(prompts)} | {identical}/{len(prompts)} | {mean:.0%} | {required:.0%} |"
        )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraflow.llama_cpp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("pipeline", help="the pipeline whose latest published version is checked")
    parser.add_argument("--home", default=os.environ.get("LORAFLOW_HOME", ".loraflow"), help="artifact store")
    parser.add_argument("--prompts", type=int, default=8, help="held-out conversations to answer")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    return 0 if check(args.pipeline, Path(args.home), args.prompts, args.max_new_tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
