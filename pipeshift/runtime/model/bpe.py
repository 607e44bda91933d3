"""Builds the byte-level BPE tokenizer that `make-model` ships, trained offline on a local corpus.

The corpus is the docstrings of the top-level Python standard library modules, parsed (never
imported) in sorted order, so the same interpreter always yields the same tokenizer.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pipeshift.errors import UserError

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
MIN_VOCAB = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)


@functools.cache
def docstring_corpus() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a damaged or odd stdlib file only shrinks the corpus
        nodes = (n for n in ast.walk(tree)
                 if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))
        texts.extend(doc for n in nodes if (doc := ast.get_docstring(n)))
    return tuple(texts)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer with exactly `vocab_size` ids: the specials first (bos 0, eos 1), then bytes and merges.

    Encoding prepends `<s>`, as Llama tokenizers do, so prompts start with bos.
    """
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB} "
                        f"ids (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docstring_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise UserError(f"--vocab {vocab_size} is more than the local training corpus supports "
                        f"({tok.get_vocab_size()} ids); choose a smaller vocabulary")
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return tok


# A minimal role-tagged format; the generation prompt leaves the assistant turn open.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
