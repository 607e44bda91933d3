"""Text on the way out and in: incremental detokenization, stop strings, chat templates.

Oracles: the tokenizer's own full decode, a plain search of the whole text for stop strings, and
Hugging Face's `apply_chat_template` on the same model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from pipeshift.runtime.frontend.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from pipeshift.runtime.frontend.detokenize import IncrementalDetokenizer
from pipeshift.runtime.frontend.sampling import SamplingParams
from pipeshift.runtime.frontend.sequence import GenerationParams, Sequence
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.frontend.stops import StopMatcher
from pipeshift.runtime.model.make_model import make_model

VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("tiny") / "model",
        layers=1,
        hidden=16,
        heads=2,
        kv_heads=1,
        intermediate=32,
        vocab=VOCAB,
        seed=3,
    )


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return ServedModel.load(model_dir)


def stream_text(decoder: ServedModel | Tokenizer, prompt: list[int], generated: list[int]) -> str:
    detok = IncrementalDetokenizer(decoder, prompt)
    return "".join(detok.push(t) for t in generated) + detok.flush()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), max_size=40), st.sampled_from(["", "Return the", "héllo wörld ✓"]))
def test_streamed_text_adds_up_to_the_full_decode(
    served: ServedModel, generated: list[int], prompt: str
) -> None:
    """Byte-level tokens split characters anywhere; the deltas must still add up exactly."""
    prompt_ids = served.encode(prompt)
    assert stream_text(served, prompt_ids, generated) == served.decode(generated)


def test_no_delta_ends_inside_a_character(served: ServedModel) -> None:
    ids = served.encode("✓✓ naïve ☃", add_special_tokens=False)
    detok = IncrementalDetokenizer(served, served.encode("x"))
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "✓✓ naïve ☃"


def test_word_start_markers_keep_the_first_generated_space() -> None:
    """SentencePiece-style tokenizers drop the leading space of a decode; the prompt context keeps it."""
    vocab = {"▁hello": 0, "▁world": 1, "▁again": 2, "!": 3, "<unk>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    prompt, generated = [0], [1, 3, 2]
    whole, head = tok.decode(prompt + generated), tok.decode(prompt)
    assert stream_text(tok, prompt, generated) == whole[len(head) :] == " world! again"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text("abc", max_size=4), max_size=10),
    st.lists(st.text("abc", min_size=1, max_size=3), max_size=3),
)
def test_stop_strings_cut_at_the_first_occurrence_and_nothing_is_taken_back(
    chunks: list[str], stops: list[str]
) -> None:
    # Generation halts at the first chunk that completes a stop string; text that would only have
    # come later (another stop string it might have started) never exists.
    full, hits = "", []
    for chunk in chunks:
        full += chunk
        hits = [i for i in (full.find(s) for s in stops) if i >= 0]
        if hits:
            break
    expected = full[: min(hits)] if hits else full
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted += text
        assert expected.startswith(emitted)
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    assert stopped == bool(hits)
    assert emitted == expected


def make_sequence(
    served: ServedModel, max_tokens: int, stop: tuple[str, ...] = (), ignore_eos: bool = False
) -> Sequence:
    params = GenerationParams(
        max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), stop=stop, ignore_eos=ignore_eos
    )
    return Sequence(
        seq_id=0,
        prompt=served.encode("Q:"),
        params=params,
        decoder=served,
        eos_ids=frozenset(served.config.eos_token_ids),
    )


def test_a_sequence_finishes_on_stop_string_eos_or_length(served: ServedModel) -> None:
    ids = served.encode("hello world. Bye", add_special_tokens=False)
    eos = served.config.eos_token_ids[0]

    def run(seq: Sequence, tokens: list[int]) -> tuple[str, str | None, int]:
        text, reason = "", None
        for t in tokens:
            delta = seq.append(t)
            text += delta.text
            reason = delta.finish_reason
            if reason:
                break
        return text, reason, len(seq.output)

    stop_at = next(n for n in range(len(ids) + 1) if ". B" in served.decode(ids[:n]))
    assert run(make_sequence(served, 50, stop=(". B",)), ids) == ("hello world", "stop", stop_at)
    assert run(make_sequence(served, 50), [*ids[:3], eos, *ids[3:]]) == (served.decode(ids[:3]), "stop", 4)
    assert run(make_sequence(served, 50, ignore_eos=True), [*ids[:2], eos])[1] is None
    assert run(make_sequence(served, 4), ids) == (served.decode(ids[:4]), "length", 4)


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "and now?"},
]


def test_the_models_chat_template_renders_as_transformers_does(model_dir: Path, served: ServedModel) -> None:
    hf = AutoTokenizer.from_pretrained(model_dir)
    text = served.chat.render(MESSAGES)
    assert served.chat.from_model
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    hf_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert served.encode(text, add_special_tokens=False) == list(hf_ids["input_ids"])


def test_without_a_template_the_documented_default_is_used(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    chat = ChatTemplate.from_model_dir(tmp_path)
    assert not chat.from_model and chat.source == DEFAULT_CHAT_TEMPLATE
    assert (
        chat.render(MESSAGES[1:3]) == "<s><|user|>\nhi there</s>\n<|assistant|>\nhello</s>\n<|assistant|>\n"
    )


def test_a_template_that_refuses_the_conversation_says_why(tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    chat = ChatTemplate.from_model_dir(tmp_path)
    assert chat.render(MESSAGES[1:2]) == "hi there"
    with pytest.raises(ChatTemplateError, match="system messages are not supported"):
        chat.render(MESSAGES)
