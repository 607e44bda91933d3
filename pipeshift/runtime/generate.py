"""`pipeshift generate`: greedy text generation through a pipeline of stages.

By default each stage is its own agent process behind the frontend, exactly as `pipeshift serve`
runs them; `--in-process` chains the stages inside this process instead (no sockets, for debugging).
Prints the generated text, or with `--json` one object `{"token_ids": [...], "text": "..."}`
holding the generated tokens only (a final EOS included).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.model.tokenizer import Tokenizer
from pipeshift.runtime.pipeline import Pipeline
from pipeshift.runtime.threads import configure_threads

HELP = "generate text greedily with the model split into pipeline stages"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face-format model directory")
    parser.add_argument("--layout", help="layers per stage, e.g. 3,2,2 (default: one stage with every layer)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (encoded with the model's tokenizer, bos included)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (default float32)")
    parser.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    parser.add_argument("--threads", type=int, help="torch threads (default: env PIPESHIFT_THREADS, else all cores)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the stages inside this process instead of as agent processes")


def parse_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r} must be comma-separated integers such as 1,2,3") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")
    return ids


def run(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    model = ModelDir(args.model)
    config = model.config
    tokenizer = Tokenizer.from_dir(model.path)
    layout = Layout.parse(args.layout, config.num_layers) if args.layout else Layout.from_sizes([config.num_layers])
    prompt = tokenizer.encode(args.prompt) if args.prompt is not None else parse_ids(args.prompt_ids, config.vocab_size)
    if not prompt:
        raise UserError("--prompt encodes to no tokens; give some text")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} must be at least 1")
    if len(prompt) + args.max_tokens > config.max_position_embeddings:
        raise UserError(f"the prompt ({len(prompt)} tokens) plus --max-tokens {args.max_tokens} exceeds the model's "
                        f"context of {config.max_position_embeddings} (max_position_embeddings)")
    if args.in_process:
        pipeline = Pipeline(model, layout, dtype=DTYPES[args.dtype])
        [token_ids] = pipeline.generate([prompt], args.max_tokens, stop_ids=config.eos_token_ids)
    else:
        token_ids = _generate_with_processes(model.path, layout, prompt, args.max_tokens, args.dtype)
    text = tokenizer.decode(token_ids)
    print(json.dumps({"token_ids": token_ids, "text": text}) if args.json else text)
    return 0


def _generate_with_processes(model: Path, layout: Layout, prompt: list[int], max_tokens: int, dtype: str) -> list[int]:
    """One greedy completion through agent processes and the frontend, over real sockets and HTTP."""
    # Imported here: the launcher and frontend are not needed by `--in-process`.
    from pipeshift.local.processes import start_agents
    from pipeshift.runtime.frontend import BackgroundFrontend, FrontendConfig

    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    with start_agents(model, layout, dtype=dtype) as agents:
        config = FrontendConfig(model_dir=model, port=0, stages=tuple(
            f"{a.host}:{a.control_port}" for a in agents.agents)).with_secrets_from()
        with BackgroundFrontend(config) as frontend:
            request = urllib.request.Request(frontend.url + "/v1/completions", body,
                                             {"Content-Type": "application/json"})
            if config.api_key:
                request.add_header("Authorization", f"Bearer {config.api_key}")
            try:
                with urllib.request.urlopen(request, timeout=600) as resp:
                    return list(json.load(resp)["choices"][0]["token_ids"])
            except urllib.error.HTTPError as e:
                raise UserError(f"the pipeline refused the request: HTTP {e.code}: {e.read().decode()}") from None
