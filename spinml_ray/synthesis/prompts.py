"""Prompts per label: the subject and the label's phrase, with controlled, seeded diversity."""

from __future__ import annotations

import random

VIEWS = ("close-up", "from the side", "from above", "wide shot", "from the front")
LIGHTING = ("natural daylight", "soft indoor light", "warm evening light", "bright overhead light")
SETTINGS = ("in a living room", "in a kitchen", "in a garden", "on a wooden floor", "in a bedroom")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def build_prompt(subject: str, phrase: str, seed: int, token: str | None = None, describe_setting: bool = True,
                 decorate: bool = True) -> str:
    """'A photo of a husky dog sleeping, close-up, soft indoor light, in a kitchen.'

    `token` is a personalization identifier (e.g. 'sks') placed before the subject. The setting is
    only described when the background is not given by released data (`describe_setting`). Without
    `decorate` (`synthesis.prompt_decorations: false`, the SpinML paper's form) no view, lighting or
    setting is added: 'A photo of a husky dog sleeping.'
    """
    rng = random.Random(seed)
    noun = f"{token} {subject}" if token else subject
    if not decorate:
        return f"A photo of {_article(noun)} {noun} {phrase}."
    parts = [f"A photo of {_article(noun)} {noun} {phrase}", rng.choice(VIEWS), rng.choice(LIGHTING)]
    if describe_setting:
        parts.append(rng.choice(SETTINGS))
    return ", ".join(parts) + "."
