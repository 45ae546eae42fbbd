"""Answer scoring: from logits (the probe's candidate answers, read at the answer position),
and from generated text by the paper's string rule and a robust one (for comparability with
the paper's numbers). Prompts come from :mod:`interp.prompts` (``LVLM.prompt``)."""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

import torch

from spatialbias.errors import SpatialBiasError
from interp.prompts import answer_token_ids

PAPER_PROMPT = ("Determine if there is a sub-image in the given image that matches the text following.\n"
                "Text: {caption}\nThe answer should only contain 'Yes' or 'No', without reasoning process.\n")


@dataclass(frozen=True)
class AnswerSet:
    """Candidate answers and, for each, the token the model emits first when it gives that answer
    right after the prompt (:func:`interp.prompts.answer_token_ids`)."""
    answers: tuple[str, ...]
    token_ids: tuple[int, ...]

    @classmethod
    def build(cls, lvlm, answers, texts: Sequence[str] = ("",)) -> "AnswerSet":
        """The candidates of ``answers`` for an :class:`interp.model.LVLM`, read after the prompt
        of each distinct text in ``texts`` (the probe rows' prompt texts; default: an empty
        question). Every prompt must give the same token per answer, else one error line (the
        tokenizer joins the answer to the end of some prompts); answers whose first tokens
        collide, or that the vocabulary lacks, are refused with one line."""
        answers = tuple(answers)
        got: dict[tuple[int, ...], str] = {}
        for t in dict.fromkeys(texts):
            ids = answer_token_ids(lvlm.processor, lvlm.adapter, lvlm.image_marker, t, answers)
            got.setdefault(ids, t)
            if len(got) > 1:
                (a_ids, a_text), (b_ids, b_text) = list(got.items())[:2]
                k = next(j for j in range(len(answers)) if a_ids[j] != b_ids[j])
                conv = lvlm.tokenizer.convert_ids_to_tokens
                raise SpatialBiasError(
                    f"answer {answers[k]!r} starts with token {conv(a_ids[k])!r} after the prompt for {a_text[:40]!r} "
                    f"but {conv(b_ids[k])!r} after {b_text[:40]!r}; the tokenizer joins the answer to the prompt's "
                    "end, so use a chat template that ends the prompt at a fixed assistant header")
        if not got:
            raise SpatialBiasError("no prompt texts to read the answer tokens after; give at least one row")
        return cls(answers, next(iter(got)))

    def score(self, logits: torch.Tensor, answers: list[str]) -> dict[str, torch.Tensor]:
        """Score last-position logits (B, V) against the correct answers (B names).

        Returns per row: ``pred`` (index into answers), ``correct`` (bool), ``p_correct``
        (softmax over the candidate tokens only), ``logit_diff`` (correct logit minus the best
        other candidate's).
        """
        try:
            target = torch.tensor([self.answers.index(a) for a in answers], device=logits.device)
        except ValueError:
            bad = sorted(set(answers) - set(self.answers))
            raise SpatialBiasError(f"answer(s) {bad} are not among the candidates {self.answers}") from None
        cand = logits[:, list(self.token_ids)].float()
        pred = cand.argmax(-1)
        p = cand.softmax(-1)
        right = cand.gather(1, target[:, None])[:, 0]
        others = cand.scatter(1, target[:, None], float("-inf")).max(-1).values
        return {"pred": pred, "correct": pred == target, "p_correct": p.gather(1, target[:, None])[:, 0],
                "logit_diff": right - others}


def prefix_answer(text: str, answers=("Yes", "No")) -> str | None:
    """The paper's string rule: the answer the generated ``text`` starts with, case-sensitive
    and with nothing stripped (``"Yes, ..."`` → Yes; ``" yes"`` → None). The longest matching
    answer wins; None when the text starts with none of them."""
    hits = [a for a in answers if text.startswith(a)]
    return max(hits, key=len) if hits else None


_STRIP = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb`"


def robust_answer(text: str, answers=("Yes", "No")) -> str | None:
    """A robust string rule: the first word of ``text`` after stripping whitespace,
    punctuation and quotes, compared case-insensitively with each answer (``' "yes." '`` →
    Yes; ``"Yesterday"`` → None). None when the first word is no answer."""
    words = text.strip(_STRIP).split()
    if not words:
        return None
    first = words[0].strip(_STRIP).casefold()
    for a in answers:
        if a.casefold() == first:
            return a
    return None


def prompt_text(row) -> str:
    """The text of a probe row as the model sees it: the paper's prompt for captions, else the question."""
    return PAPER_PROMPT.format(caption=row.caption) if row.caption is not None else row.question
