"""Answer tokens with real (subword) tokenizers: the candidate for an answer is the token the
model emits right after the prompt, read from the tokenized conversation with that answer
(interp.prompts.answer_token_ids), not the first token of ``tokenizer.encode(answer)``.

Tiny LLaVA and Qwen2-VL get trained SentencePiece-style (Metaspace) and byte-level BPE
tokenizers (interp.tiny.tokenizer), with their chat template and without (the architecture's
fallback format). What happens, as asserted below:

* Metaspace (Llama/Mistral style, prepend_scheme "first"): ``encode("Yes")`` is ``▁Yes``; after
  ``ASSISTANT:`` the answer is ``▁Yes`` too, but after ChatML's ``assistant\\n`` it is ``Yes``.
* byte-level (Qwen/GPT-2 style): ``encode("Yes")`` is ``Yes``; after ChatML's ``assistant\\n``
  it is ``Yes``, but after ``ASSISTANT:`` it is ``ĠYes``.
"""
import json

import pytest
import torch
from PIL import Image

import interp
from analyses.evaluate import probe_batches, score_probe
from analyses.scoring import PAPER_PROMPT, AnswerSet, prefix_answer, robust_answer
from interp import prompts, tiny
from spatialbias.errors import SpatialBiasError
from probes.format import read_rows

TEXT = PAPER_PROMPT.format(caption="a cat")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# (architecture, tokenizer) → (the token the model emits first for "Yes", encode("Yes")[0], the
# format's separator before the answer)
CASES = {("llava", "metaspace"): ("▁Yes", "▁Yes", " "), ("qwen2vl", "bytelevel"): ("Yes", "Yes", ""),
         ("llava", "bytelevel"): ("ĠYes", "Yes", " "), ("qwen2vl", "metaspace"): ("Yes", "▁Yes", "")}
PARAMS = [(a, k, t) for a, k in CASES for t in (True, False)]
IDS = [f"{a}-{k}-{'template' if t else 'fallback'}" for a, k, t in PARAMS]


def build(arch, kind, template, seed=0):
    m, p = getattr(tiny, f"build_{arch}")(seed=seed, tokenizer_kind=kind)
    if not template:
        p.chat_template = None
    return interp.load(m, p)


def conversation_by_hand(lvlm, arch, template, answer):
    """The conversation text with the answer, written out independently of interp.prompts."""
    if template:
        return lvlm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]},
             {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    if arch == "llava":
        return f"USER: <image>\n{TEXT} ASSISTANT: {answer}"
    return (f"{SYSTEM}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{TEXT}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}")


@pytest.mark.parametrize("arch,kind,template", PARAMS, ids=IDS)
def test_candidate_is_the_first_answer_token_of_the_conversation(arch, kind, template):
    lvlm = build(arch, kind, template)
    tok = lvlm.tokenizer
    answers = ["Yes", "No", "dogs"]  # dogs: two tokens (dog, s)
    cands = AnswerSet.build(lvlm, answers, [TEXT])
    p_ids = tok(lvlm.prompt(TEXT), add_special_tokens=False)["input_ids"]
    want, naive, sep = CASES[arch, kind]
    for a, cand in zip(answers, cands.token_ids):
        full = tok(conversation_by_hand(lvlm, arch, template, a), add_special_tokens=False)["input_ids"]
        assert full[:len(p_ids)] == p_ids
        assert cand == full[len(p_ids)], a
        rest = prompts.answer_tokens(lvlm.processor, lvlm.adapter.name, lvlm.image_marker, TEXT, a)
        assert rest[0] == cand and rest == full[len(p_ids):len(p_ids) + len(rest)]
        decoded, before = tok.decode(p_ids + rest), tok.decode(p_ids)
        assert decoded.startswith(before) and decoded[len(before):] == sep + a  # candidate + rest = the answer
    assert tok.convert_ids_to_tokens(cands.token_ids[0]) == want
    assert tok.convert_ids_to_tokens(tok.encode("Yes", add_special_tokens=False)[0]) == naive
    assert len(tok.encode("dogs", add_special_tokens=False)) == 2


def test_the_naive_first_token_was_wrong_for_two_of_the_four():
    """The bug: encode(answer)[0] ignores what precedes the answer in the conversation."""
    wrong = {}
    for (arch, kind), (want, naive, _) in CASES.items():
        lvlm = build(arch, kind, True)
        got = AnswerSet.build(lvlm, ["Yes", "No"], [TEXT]).token_ids
        old = tuple(lvlm.tokenizer.encode(a, add_special_tokens=False)[0] for a in ["Yes", "No"])
        wrong[arch, kind] = got != old
    assert wrong == {("llava", "metaspace"): False, ("qwen2vl", "bytelevel"): False,
                     ("llava", "bytelevel"): True, ("qwen2vl", "metaspace"): True}


def one_row_probe(folder):
    folder.mkdir()
    tiny.image(48, 48, seed=3).save(folder / "0_4.png")
    (folder / "probe.jsonl").write_text(json.dumps({"id": 0, "image": "0_4.png", "caption": "a cat",
                                                    "position": "center", "answer": "Yes"}) + "\n")
    return folder


@pytest.mark.parametrize("arch,kind,template", PARAMS, ids=IDS)
def test_greedy_decode_emits_the_candidate_and_the_string_rules_read_it(arch, kind, template, tmp_path):
    lvlm = build(arch, kind, template)
    probe = one_row_probe(tmp_path / "p")
    rows = read_rows(probe)
    cands = AnswerSet.build(lvlm, ["Yes", "No"], [TEXT])
    yes = cands.token_ids[0]
    inputs = next(probe_batches(lvlm, probe, rows, 8))[3]
    head = lvlm.model.get_output_embeddings()
    seen = {}
    hook = head.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0][0, -1].detach().clone()))
    with torch.no_grad():
        lvlm.run(inputs, last_only=True)
    hook.remove()
    h = seen["h"]
    with torch.no_grad():  # edit the LM head so that the candidate gets the highest logit by 10
        head.weight[yes] = h / h.dot(h) * (float((head.weight @ h).max()) + 10)
    new = lvlm.generate(inputs, max_new_tokens=1)
    p_ids = lvlm.tokenizer(lvlm.prompt(TEXT), add_special_tokens=False)["input_ids"]
    full = lvlm.tokenizer(conversation_by_hand(lvlm, arch, template, "Yes"), add_special_tokens=False)["input_ids"]
    assert new[0, 0].item() == yes == full[len(p_ids)]  # the token that starts "Yes" in the conversation
    text = lvlm.tokenizer.decode(new[0], skip_special_tokens=True)
    assert robust_answer(text) == "Yes"
    # the paper's rule (case-sensitive startswith, nothing stripped) misses a decoded leading space
    assert text == (" Yes" if CASES[arch, kind][0] == "ĠYes" else "Yes")
    assert prefix_answer(text) == (None if text.startswith(" ") else "Yes")
    df = score_probe(lvlm, probe, {"baseline": []}, progress=False, string_rule=True, max_new_tokens=1)
    row = df.iloc[0]
    assert row.pred == "Yes" and row.correct and row.logit_diff > 5 and row.pred_text == text
    assert row.correct_robust and row.correct_prefix == (not text.startswith(" "))


@pytest.mark.parametrize("arch,kind", list(CASES))
def test_colliding_first_tokens_are_one_error_line(arch, kind):
    lvlm = build(arch, kind, True)
    with pytest.raises(SpatialBiasError) as e:
        AnswerSet.build(lvlm, ["Yes", "No", "Yes please"], [TEXT])
    msg = str(e.value)
    assert "\n" not in msg and "'Yes' and 'Yes please' share their first token" in msg
    assert repr(CASES[arch, kind][0]) in msg


def test_a_prompt_that_ends_inside_the_answers_token_is_refused():
    """A generation prompt ending in a space: byte-level BPE writes 'ĠYes' in the conversation,
    so the prompt's last token 'Ġ' is not a prefix; one line, no candidate."""
    lvlm = build("llava", "bytelevel", True)
    lvlm.processor.chat_template = tiny.LLAVA_CHAT.replace("ASSISTANT:{%- endif", "{{ 'ASSISTANT: ' }}{%- endif")
    assert lvlm.prompt(TEXT).endswith("ASSISTANT: ")
    with pytest.raises(SpatialBiasError, match="merges the end of the prompt with the answer") as e:
        AnswerSet.build(lvlm, ["Yes", "No"], [TEXT])
    assert "\n" not in str(e.value)


def test_a_template_that_drops_the_assistant_turn_is_refused():
    lvlm = build("qwen2vl", "bytelevel", True)
    lvlm.processor.chat_template = tiny.QWEN_CHATML.replace("{%- for m in messages -%}",
                                                            "{%- for m in messages if m['role'] == 'user' -%}")
    with pytest.raises(SpatialBiasError, match="renders nothing after the prompt") as e:
        AnswerSet.build(lvlm, ["Yes", "No"], [TEXT])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel"])
def test_an_answer_whose_first_token_is_a_bare_space_is_refused(kind):
    """'zebra' after 'ASSISTANT:' starts with the space marker alone (these small vocabularies have
    no ▁z / Ġz): that token says nothing about the answer, so it cannot be its candidate."""
    lvlm = build("llava", kind, True)
    with pytest.raises(SpatialBiasError, match="answer 'zebra': the model's first token for it would be") as e:
        AnswerSet.build(lvlm, ["Yes", "zebra"], [TEXT])
    assert "\n" not in str(e.value) and ("'▁'" if kind == "metaspace" else "'Ġ'") in str(e.value)


def test_answers_that_start_differently_after_different_prompts_are_refused():
    """A template that puts a space before the answer only after questions ending in '?' (none
    otherwise):
    'ĠYes' after one prompt, 'Yes' after the other. No single candidate: one line."""
    lvlm = build("llava", "bytelevel", True)
    lvlm.processor.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}USER: <image>\n{{ m['content'][-1]['text'] }}"
        "{%- else -%} ASSISTANT:{{ ' ' if messages[0]['content'][-1]['text'].endswith('?') else '' }}"
        "{{ m['content'][0]['text'] }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%} ASSISTANT:{%- endif -%}")
    assert AnswerSet.build(lvlm, ["Yes", "No"], ["is it ?"]).token_ids != AnswerSet.build(
        lvlm, ["Yes", "No"], ["is it."]).token_ids
    with pytest.raises(SpatialBiasError, match="starts with token 'ĠYes' after the prompt for 'is it \\?' but "
                                               "'Yes' after 'is it.'") as e:
        AnswerSet.build(lvlm, ["Yes", "No"], ["is it ?", "is it ?", "is it."])
    assert "\n" not in str(e.value)


def test_trained_tokenizers_survive_save_and_load(tmp_path):
    """A saved tiny checkpoint loads back with the same tokenizer: same prompt, same candidates."""
    lvlm = build("llava", "metaspace", True)
    back = interp.load(tiny.save(lvlm.model, lvlm.processor, tmp_path / "m"))
    assert back.prompt(TEXT) == lvlm.prompt(TEXT)
    assert AnswerSet.build(back, ["Yes", "No"], [TEXT]) == AnswerSet.build(lvlm, ["Yes", "No"], [TEXT])
    img = Image.new("RGB", (32, 32))
    assert torch.equal(back.inputs([img], [back.prompt(TEXT)])["input_ids"],
                       lvlm.inputs([img], [lvlm.prompt(TEXT)])["input_ids"])
