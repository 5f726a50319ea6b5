"""The prompt content policy: blocked words (case-insensitive, whole words) and regular expressions,
global ones from `policy_file` plus each API key's own additions. Checked on `prompt` / `prompts`
before any Triton work; `negative_prompt` is not checked (it names what the image must not show)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Violation:
    """The first rule a prompt breaks: `rule` names it for the error message."""

    index: int  # which prompt of the request
    rule: str


def compile_regex(pattern: str, where: str) -> re.Pattern[str]:
    """Compile one policy regex; a bad one is a ValueError naming it and where it came from."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regex {pattern!r}: {exc}") from None


def _word_pattern(word: str) -> re.Pattern[str]:
    # whole words: no word character right before or after (\b fails next to "+" or "-")
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Rules:
    """One set of compiled rules; `scope` ("global" or "key") goes into the error message."""

    scope: str
    words: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    _compiled: tuple[tuple[str, re.Pattern[str]], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(
        cls,
        scope: str,
        words: Iterable[str],
        regexes: Iterable[str],
        where: str,
        fields: tuple[str, str] = ("words", "regexes"),
    ) -> Rules:
        """Compile the rules; ValueError naming `where`, the field (`fields`: the words' and the
        regexes' names there) and the bad rule."""
        words, regexes = tuple(words), tuple(regexes)
        words_field, regexes_field = fields
        compiled: list[tuple[str, re.Pattern[str]]] = []
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"{where}: {words_field}: each must be a non-empty string, got {word!r}")
            compiled.append((f'{scope} word "{word.strip()}"', _word_pattern(word)))
        for i, pattern in enumerate(regexes):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(
                    f"{where}: {regexes_field}[{i}]: must be a non-empty string, got {pattern!r}"
                )
            compiled.append(
                (f'{scope} regex "{pattern}"', compile_regex(pattern, f"{where}: {regexes_field}[{i}]"))
            )
        return cls(scope, words, regexes, tuple(compiled))

    def first_match(self, text: str) -> str | None:
        for rule, pattern in self._compiled:
            if pattern.search(text):
                return rule
        return None

    def __bool__(self) -> bool:
        return bool(self._compiled)


def load_policy_file(path: str | Path | None) -> Rules:
    """The global rules: `{"words": [...], "regexes": [...]}` (both optional); no file: no rules."""
    if path is None:
        return Rules("global")
    path = Path(path)
    where = f"policy file {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: not found (setting policy_file / SD_GATEWAY_POLICY_FILE)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f'{where}: must be a JSON object {{"words": [...], "regexes": [...]}}')
    unknown = set(data) - {"words", "regexes"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected words, regexes")
    for name in ("words", "regexes"):
        if not isinstance(data.get(name, []), list):
            raise ValueError(f"{where}: {name}: must be a list of strings")
    return Rules.build("global", data.get("words", []), data.get("regexes", []), where)


def check(prompts: Sequence[str], *rule_sets: Rules) -> Violation | None:
    """The first prompt that breaks a rule (global rules first, then the key's), or None."""
    for index, prompt in enumerate(prompts):
        for rules in rule_sets:
            rule = rules.first_match(prompt)
            if rule is not None:
                return Violation(index, rule)
    return None
