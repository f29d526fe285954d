"""One source for the prompt formats that training, evaluation and the analysis share.

Everything is LLaVA-1.5's conversation template (the one llava-hf's LLaVA-1.5 checkpoints and the
embedded / mini-study models are trained on)::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

:data:`TEMPLATES` are the single-turn evaluation prompts (the instruction suffixes are
LLaVA-1.5's evaluation prompts); :func:`human_text` is the human turn of a template, which the
instruction data renders with :data:`USER` / :data:`ASSISTANT` around it, so a model is trained
on exactly the text it is evaluated with.

A model family whose template adds a system prompt before the first ``USER:`` (TinyLLaVA
Factory's phi / qwen2_base / llama templates: :data:`SYSTEMS`) is trained and evaluated with
that prefix (train.py ``data.system``, evaluate.py ``eval.system``); the rest of the string is
the same (TinyLLaVA's end of turn is the tokenizer's EOS, as here).
"""

from __future__ import annotations

USER = "USER: "
ASSISTANT = " ASSISTANT:"
LETTERS = "ABCDEFGHIJ"  # option letters of multiple-choice prompts (VLMEvalKit: A-J)
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
SYSTEMS = {"": "", "tinyllava": "A chat between a curious user and an artificial intelligence "
           "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
           "questions."}


def system_prefix(system: str) -> str:
    """The text before the first ``USER:`` for a system prompt (a name of :data:`SYSTEMS` or the
    text itself): the text and one space, or "" for none."""
    text = SYSTEMS.get(system, system)
    return f"{text} " if text else ""


def with_system(templates: dict, system: str) -> dict:
    """``templates`` with the system prompt ``system`` before each (unchanged for "")."""
    prefix = system_prefix(system)
    return {k: prefix + v for k, v in templates.items()}


def human_start(prompt: str) -> int:
    """Where the human turn of a single-turn prompt starts (after a system prompt and USER)."""
    if USER not in prompt or not prompt.endswith(ASSISTANT):
        raise ValueError(f"prompt {prompt[:40]!r}... is not in the USER: ... ASSISTANT: template")
    return prompt.index(USER) + len(USER)


def human_text(prompt: str) -> str:
    """The human turn of a single-turn prompt (the template's text between USER and ASSISTANT)."""
    return prompt[human_start(prompt):-len(ASSISTANT)]
