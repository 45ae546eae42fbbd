"""The one prompt builder: what a model sees for a text and its images, for every analysis
(scoring, the causal analyses, similarity, occlusion, sweeps). :meth:`interp.model.LVLM.prompt`
delegates here.

Order: the processor's own chat template (one user turn: the images, then the text; with the
generation prompt); else the architecture's published chat format (:data:`FALLBACK_TEMPLATES`,
for a checkpoint saved without a template); else ``"<marker>\\n" * n_images + text``.

Beside it, the answer tokens (:func:`answer_token_ids`): the token a model emits first when it
gives an answer, read from the conversation rendered with that answer and tokenized whole, so
that ``Yes``, ``▁Yes`` and ``ĠYes`` are told apart as the model's tokenizer does.
"""
from __future__ import annotations

from typing import Any

from interp.adapters.base import PLAIN, Adapter, ChatFormat
from spatialbias.errors import SpatialBiasError


def _fallback_templates() -> dict[str, ChatFormat]:
    from interp.adapters import ADAPTERS
    return {a.name: a.chat for a in ADAPTERS if a.chat is not PLAIN}


FALLBACK_TEMPLATES: dict[str, ChatFormat] = _fallback_templates()
"""Each architecture's published chat format (LLaVA-1.5 ``USER: <image>\\n… ASSISTANT:``,
LLaVA-v1.6-Mistral ``[INST] <image>\\n… [/INST]``, Qwen2-VL/2.5-VL ChatML, Gemma3-it, …) by
adapter name: a view of the adapters' own ``chat`` field (the one place it is declared); used
only when a checkpoint's processor has no chat template of its own."""


def has_template(processor: Any) -> bool:
    """Whether the processor carries its own chat template."""
    return bool(getattr(processor, "chat_template", None))


def chat_format(arch: "Adapter | ChatFormat | str") -> ChatFormat:
    """The fallback format of an architecture: its adapter's ``chat`` (given the adapter, its
    format, or its name), else :data:`PLAIN`."""
    if isinstance(arch, ChatFormat):
        return arch
    if isinstance(arch, Adapter):
        return arch.chat
    from interp.adapters import for_name
    a = for_name(arch)
    return PLAIN if a is None else a.chat


def _user_turn(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def prompt(processor: Any, adapter: "Adapter | str", marker: str, text: str, n_images: int = 1) -> str:
    """The prompt string for ``text`` after ``n_images`` images (one ``marker`` each): the
    processor's chat template with the generation prompt when it has one, else the
    architecture's :data:`FALLBACK_TEMPLATES` entry, else ``marker\\n`` per image + text."""
    if has_template(processor):
        return processor.apply_chat_template([_user_turn(text, n_images)], add_generation_prompt=True)
    return chat_format(adapter).render(marker, text, n_images)


# ---------------------------------------------------------------------------------------------
# Answer tokens: what the model would emit first when it gives an answer


def conversation(processor: Any, adapter: "Adapter | str", marker: str, text: str, answer: str,
                 n_images: int = 1) -> tuple[str, str]:
    """(the prompt, the whole conversation with the assistant's ``answer``) as the model's chat
    format renders them: the processor's chat template with an assistant turn holding the
    answer, else the fallback format's prompt + its ``answer_sep`` + the answer (a space after
    ``ASSISTANT:`` / ``[/INST]`` / plain text, nothing after ChatML's or Gemma's header)."""
    p = prompt(processor, adapter, marker, text, n_images)
    if has_template(processor):
        turns = [_user_turn(text, n_images), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return p, processor.apply_chat_template(turns, add_generation_prompt=False)
    return p, p + chat_format(adapter).answer_sep + answer


def answer_tokens(processor: Any, adapter: "Adapter | str", marker: str, text: str, answer: str,
                  n_images: int = 1) -> list[int]:
    """The token ids of ``answer`` as they follow the prompt for ``text`` in the tokenized
    conversation (:func:`conversation`); the first is the token the model emits first when it
    gives this answer. Both texts are tokenized without added special tokens (BOS/EOS).

    Raises :class:`interp.errors.SpatialBiasError` (one line) when the prompt's tokens are not a
    prefix of the conversation's (the tokenizer merges across the boundary), when the first
    token after the prompt does not begin the answer (the format puts something else there, or
    the space before the answer is a token of its own, which would not tell answers apart), or
    when that token is a special token (the vocabulary has no token for the answer)."""
    tok = getattr(processor, "tokenizer", processor)
    if not answer.strip():
        raise SpatialBiasError(f"answer {answer!r} is empty; give every row a non-empty answer")
    if not getattr(tok, "is_fast", False):
        raise SpatialBiasError(f"{type(tok).__name__} is a slow tokenizer; answer tokens are read from a fast "
                               "tokenizer's offsets: load the checkpoint's fast tokenizer (tokenizer.json)")
    p, full = conversation(processor, adapter, marker, text, answer, n_images)
    ids_p = tok(p, add_special_tokens=False)["input_ids"]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = enc["input_ids"], enc["offset_mapping"]
    n = len(ids_p)
    if len(ids) <= n and ids == ids_p[:len(ids)]:
        raise SpatialBiasError(f"answer {answer!r}: the chat template renders nothing after the prompt for an "
                               "assistant turn holding it; use a template that renders assistant turns")
    if ids[:n] != ids_p:
        cut = next((i for i, (a, b) in enumerate(zip(ids, ids_p)) if a != b), min(n, len(ids)))
        raise SpatialBiasError(
            f"answer {answer!r}: the tokenizer merges the end of the prompt with the answer (the prompt's tokens "
            f"end {tok.convert_ids_to_tokens(ids_p[cut:][-3:])}, the conversation's go on "
            f"{tok.convert_ids_to_tokens(ids[cut:cut + 3])}), so no next token gives the answer; use a chat "
            "template whose generation prompt ends at a token boundary")
    start = spans[n][0]
    a0 = full.find(answer, start)
    if a0 < 0 or spans[n][1] <= a0:
        between = full[start:a0] if a0 >= 0 else full[start:start + 20]
        if a0 >= 0 and not between.strip():
            raise SpatialBiasError(
                f"answer {answer!r}: the model's first token for it would be {tok.convert_ids_to_tokens(ids[n])!r}, "
                f"the space before it alone (the vocabulary has no token for {between + answer[:2]!r}…), which does "
                "not tell the answers apart; give answers whose first word the vocabulary has after a space, or "
                "score by generated text (--string-rule)")
        raise SpatialBiasError(
            f"answer {answer!r}: the first token after the prompt is {tok.convert_ids_to_tokens(ids[n])!r} "
            f"({between!r}), not the start of the answer, so the answer's first token is not what the model "
            "emits next; use a chat template that puts the answer right after the generation prompt")
    special = set(getattr(tok, "all_special_ids", ()) or ()) | {
        i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    if ids[n] in special:
        raise SpatialBiasError(
            f"the model's vocabulary has no token for answer {answer!r} (it becomes the special token "
            f"{tok.convert_ids_to_tokens(ids[n])!r}), so the model cannot give this answer; score this probe with "
            "a model that knows its answer words (the bundled organism knows only its shapes task)")
    end = a0 + len(answer)
    return [i for i, (s, _) in zip(ids[n:], spans[n:]) if s < end]


def answer_token_ids(processor: Any, adapter: "Adapter | str", marker: str, text: str, answers,
                     n_images: int = 1) -> tuple[int, ...]:
    """The candidate token of each answer after the prompt for ``text``: the first of
    :func:`answer_tokens` (e.g. ``▁Yes`` after ``ASSISTANT:`` with a SentencePiece tokenizer,
    ``Yes`` after ChatML's ``assistant\\n`` with a byte-level one). One per answer, in order;
    one :class:`interp.errors.SpatialBiasError` line when two answers share it."""
    answers = tuple(answers)
    ids = tuple(answer_tokens(processor, adapter, marker, text, a, n_images)[0] for a in answers)
    if len(set(ids)) != len(ids):
        tok = getattr(processor, "tokenizer", processor)
        first = {}
        for a, i in zip(answers, ids):
            if i in first:
                raise SpatialBiasError(
                    f"answers {first[i]!r} and {a!r} share their first token {tok.convert_ids_to_tokens(i)!r}, so "
                    f"the logits cannot tell them apart (answers {list(answers)}); give answers that differ in their "
                    "first token")
            first[i] = a
    return ids
