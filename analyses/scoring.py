"""Answer scoring: from logits (the probe's candidate answers, read at the answer position),
and from generated text by the paper's string rule and a robust one (for comparability with
the paper's numbers). Prompts come from :mod:`interp.prompts` (``LVLM.prompt``)."""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from interp.errors import SpatialBiasError

PAPER_PROMPT = ("Determine if there is a sub-image in the given image that matches the text following.\n"
                "Text: {caption}\nThe answer should only contain 'Yes' or 'No', without reasoning process.\n")


@dataclass(frozen=True)
class AnswerSet:
    """Candidate answers and the first token id of each (what the model must emit first)."""
    answers: tuple[str, ...]
    token_ids: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, answers) -> "AnswerSet":
        answers = tuple(answers)
        ids = []
        for a in answers:
            toks = tokenizer.encode(a, add_special_tokens=False)
            if not toks:
                raise SpatialBiasError(f"answer {a!r} tokenizes to nothing; check the probe's answers")
            if toks[0] in set(getattr(tokenizer, "all_special_ids", ()) or ()):
                raise SpatialBiasError(
                    f"the model's vocabulary has no token for answer {a!r} (it becomes the special token "
                    f"{tokenizer.convert_ids_to_tokens(toks[0])!r}), so the model cannot give this answer; score this "
                    "probe with a model that knows its answer words (the bundled organism knows only its shapes task)")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise SpatialBiasError(f"answers {answers} share a first token; give answers that differ in their first token")
        return cls(answers, tuple(ids))

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
