"""One source for the prompt formats that training, evaluation and the analysis share.

Everything is LLaVA-1.5's conversation template (the one llava-hf's LLaVA-1.5 checkpoints and the
embedded / mini-study models are trained on)::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

:data:`TEMPLATES` are the single-turn evaluation prompts (the instruction suffixes are
LLaVA-1.5's evaluation prompts); :func:`human_text` is the human turn of a template, which the
instruction data renders with :data:`USER` / :data:`ASSISTANT` around it, so a model is trained
on exactly the text it is evaluated with.
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


def human_text(prompt: str) -> str:
    """The human turn of a single-turn prompt (the template's text between USER and ASSISTANT)."""
    if not (prompt.startswith(USER) and prompt.endswith(ASSISTANT)):
        raise ValueError(f"prompt {prompt[:40]!r}... is not in the USER: ... ASSISTANT: template")
    return prompt[len(USER):-len(ASSISTANT)]
