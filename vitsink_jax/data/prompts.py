"""One source for the prompt formats that training, evaluation and the analysis share.

Everything is LLaVA-1.5's conversation template (the one llava-hf's LLaVA-1.5 checkpoints and the
embedded / mini-study models are trained on)::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

:data:`TEMPLATES` are the single-turn evaluation prompts (the instruction suffixes are
LLaVA-1.5's evaluation prompts); :func:`human_text` is the human turn of a template, which the
instruction data renders with :data:`USER` / :data:`ASSISTANT` around it, so a model is trained
on exactly the text it is evaluated with.

LLaVA-1.5 itself trains and evaluates every row after the vicuna_v1 system prompt ("A chat
between a curious user ...", conv_vicuna_v1), and TinyLLaVA Factory's phi / qwen2_base / llama
templates put the same text first (:data:`SYSTEMS`: "vicuna_v1", or its other name
"tinyllava"); such a model is trained and evaluated with that prefix (train.py ``data.system``,
evaluate.py ``eval.system``); the rest of the string is the same (TinyLLaVA's end of turn is the
tokenizer's EOS, as here). The embedded and mini-study models are trained without one.

A family with a chat markup of its own (Gemma 3's ``<start_of_turn>user`` ...) keeps these
templates as they are written and has them rendered in its markup when they are tokenized
(:class:`Chat`, :data:`CHATS`, :func:`prompt_format`); how its processor expands an image is in
its :class:`ImageSlots`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

USER = "USER: "
ASSISTANT = " ASSISTANT:"
LETTERS = "ABCDEFGHIJ"  # option letters of multiple-choice prompts (VLMEvalKit: A-J)
MC_FORMATS = ("letter", "cloze")  # the answer: the option's letter, or its text (cloze)
SHORT_ANSWER = "Answer the question using a single word or phrase."

TEMPLATES = {
    "mc": f"{USER}<image>\n{{question}}\n{{options}}\nAnswer with the option's letter from the "
          f"given choices directly.{ASSISTANT}",
    "yesno": f"{USER}<image>\n{{question}}\n{SHORT_ANSWER}{ASSISTANT}",
    "open": f"{USER}<image>\n{{question}}\n{SHORT_ANSWER}{ASSISTANT}",
    "cloze": f"{USER}<image>\n{{question}}{ASSISTANT}",
}
# the analysis (Findings 1-3): a free answer to a question about the image
ANALYSIS = f"{USER}<image>\n{{question}}{ASSISTANT}"
# system prompts by name (a name not here is taken as the text itself; "" = none)
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The "
             "assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEMS = {"": "", "vicuna_v1": VICUNA_V1, "tinyllava": VICUNA_V1}


def system_prefix(system: str) -> str:
    """The text before the first ``USER:`` for a system prompt (a name of :data:`SYSTEMS` or the
    text itself): the text and one space, or "" for none."""
    text = SYSTEMS.get(system, system)
    return f"{text} " if text else ""


def with_system(templates: dict, system: str) -> dict:
    """``templates`` with the system prompt ``system`` before each (unchanged for "")."""
    prefix = system_prefix(system)
    return {k: prefix + v for k, v in templates.items()}


@dataclasses.dataclass(frozen=True)
class Chat:
    """A family's chat markup: a human turn is ``user`` + text + ``assistant``, an answer
    ``answer_sep`` + text + ``end`` (None: the tokenizer's EOS). ``image`` is how the
    templates' ``<image>\n`` is written (Gemma 3's chat template puts the text right after the
    image). System prompts (:data:`SYSTEMS`) are LLaVA-template prefixes only."""

    name: str
    user: str
    assistant: str
    answer_sep: str = " "
    end: Optional[str] = None
    image: str = "<image>\n"

    def human(self, text: str) -> str:
        """A human turn's text in this markup (its image placeholders rewritten)."""
        return text.replace("<image>\n", self.image)

    def render(self, prompt: str) -> str:
        """A single-turn prompt written in LLaVA's template (:data:`TEMPLATES`, a system prompt
        before ``USER:`` allowed) -> the same prompt in this markup. Other text is returned as
        it is."""
        if self.name == "llava" or USER not in prompt or not prompt.endswith(ASSISTANT):
            return prompt
        if prompt.index(USER):
            raise ValueError(f"a system prompt before {USER!r} is LLaVA's template; the {self.name} "
                             f"chat markup takes none here: {prompt[:40]!r}...")
        return self.user + self.human(human_text(prompt)) + self.assistant


CHATS = {"llava": Chat("llava", USER, ASSISTANT),
         # InternVL's ChatML turns (its Qwen2 LLM's), the image on a line of its own
         "internvl": Chat("internvl", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
                          answer_sep="", end="<|im_end|>\n"),
         # Qwen2.5-VL's ChatML turns, the text right after the image (its default system
         # prompt left out, as InternVL's)
         "qwen2_5_vl": Chat("qwen2_5_vl", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
                            answer_sep="", end="<|im_end|>\n", image="<image>"),
         "gemma3": Chat("gemma3", "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                        answer_sep="", end="<end_of_turn>\n", image="<image>")}


@dataclasses.dataclass(frozen=True)
class ImageSlots:
    """What one ``<image>`` of a prompt becomes, as the family's processor expands it:
    ``text_before`` (tokenized with the text before it), the ids ``before``, ``count`` copies of
    ``token`` per tile of the image (InternVL; one tile elsewhere), the ids ``after``, then
    ``text_after`` (tokenized with the text after it)."""

    count: int
    token: int
    before: tuple = ()
    after: tuple = ()
    text_before: str = ""
    text_after: str = ""

    def ids(self, tiles: int = 1) -> list:
        """The ids of an image of ``tiles`` tiles."""
        return [*self.before, *[self.token] * (self.count * tiles), *self.after]


INTERNVL_IMAGE = ("<img>", "</img>")  # InternVL's tokens around an image's tiles


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How prompts become ids for one model: its chat markup and its image expansion."""

    chat: Chat
    image: ImageSlots

    def stop_ids(self, tokenizer) -> tuple:
        """The ids that end an answer: the tokenizer's EOS and the chat's end-of-turn token
        (Gemma 3's ``<end_of_turn>``, as its generation config stops on both)."""
        ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        if self.chat.end is not None:
            end = tokenizer.convert_tokens_to_ids(self.chat.end.strip())
            if end is not None and end != tokenizer.unk_token_id and end not in ids:
                ids.append(end)
        return tuple(ids)

    @staticmethod
    def cut(ids, stops: tuple):
        """ids [T] up to the first of ``stops`` (all of them when none occurs)."""
        at = [i for i, t in enumerate(ids) if int(t) in stops]
        return ids[:at[0]] if at else ids


def prompt_format(config, tokenizer=None, image_tokens: int = 0) -> PromptFormat:
    """The prompt format of an LVLM config: LLaVA's template and ``num_image_tokens`` image ids,
    Gemma 3's chat markup and ``\n\n<boi> image ids <eoi>\n\n`` (Gemma3Processor's), or
    InternVL's ChatML and ``<img>`` image ids per tile ``</img>`` (InternVLProcessor's; the ids
    of ``<img>`` / ``</img>`` are the ``tokenizer``'s, required for InternVL), or Qwen2.5-VL's
    ChatML and ``<|vision_start|>`` image ids ``<|vision_end|>`` (Qwen2_5_VLProcessor's, for an
    image of the config's ``image_size``; another size has (H / unit) x (W / unit) ids: replace
    the slots' ``count``). ``image_tokens``: image ids per image (tile) when not the config's
    ``num_image_tokens`` (0), e.g. the tokens a token reduction keeps."""
    count = image_tokens or config.num_image_tokens
    if config.model_type == "qwen2_5_vl":
        return PromptFormat(CHATS["qwen2_5_vl"], ImageSlots(
            count, config.image_token_index, (config.vision_start_token_id,),
            (config.vision_end_token_id,)))

    if config.model_type == "internvl":
        marks = [None if tokenizer is None else tokenizer.convert_tokens_to_ids(t) for t in INTERNVL_IMAGE]
        if None in marks or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in marks):
            raise ValueError(f"an InternVL prompt needs a tokenizer with {' and '.join(INTERNVL_IMAGE)}")
        return PromptFormat(CHATS["internvl"], ImageSlots(
            count, config.image_token_index, (marks[0],), (marks[1],)))
    if config.model_type == "gemma3":
        return PromptFormat(CHATS["gemma3"], ImageSlots(
            count, config.image_token_index, (config.boi_token_index,),
            (config.eoi_token_index,), "\n\n", "\n\n"))
    return PromptFormat(CHATS["llava"], ImageSlots(count, config.image_token_index))


def _chat_of(prompt: str) -> Chat:
    for chat in CHATS.values():
        if chat.user in prompt and prompt.endswith(chat.assistant):
            return chat
    raise ValueError(f"prompt {prompt[:40]!r}... is in no chat template ({', '.join(CHATS)})")


def human_start(prompt: str) -> int:
    """Where the human turn of a single-turn prompt starts (after a system prompt and the user
    marker of its chat markup: LLaVA's ``USER:``, Gemma 3's ...)."""
    chat = _chat_of(prompt)
    return prompt.index(chat.user) + len(chat.user)


def human_text(prompt: str) -> str:
    """The human turn of a single-turn prompt (the template's text between the user marker and
    the assistant marker)."""
    return prompt[human_start(prompt):-len(_chat_of(prompt).assistant)]


# ------------------------------------------------- benchmark records as prompts and answers ---

def check_mc_format(mc_format: str) -> None:
    """ValueError unless ``mc_format`` is one of :data:`MC_FORMATS`."""
    if mc_format not in MC_FORMATS:
        raise ValueError(f"multiple-choice format {mc_format!r} not one of {MC_FORMATS}")


def prompt_text(rec: dict, templates: dict, mc_format: str = "letter") -> str:
    """The record's prompt: its kind's template filled with the question and lettered options
    (multiple choice under ``mc_format="cloze"``: the cloze template, question only)."""
    check_mc_format(mc_format)
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(rec["options"]))
    kind = "cloze" if rec["kind"] == "mc" and mc_format == "cloze" else rec["kind"]
    return templates[kind].format(question=rec["question"], options=options)


def answer_text(rec: dict, mc_format: str = "letter") -> str:
    """The gold answer as the model should say it (the letter, or the option text in cloze)."""
    if rec["kind"] == "mc" and mc_format == "cloze":
        return rec["options"][LETTERS.index(rec["answer"])]
    return rec["answer"]
