"""The prompt content policy: the rules alone, then by the gateway in-process over a fake Triton (a
refused prompt costs Triton nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sd_triton.gateway.access.keys import create_key
from sd_triton.gateway.access.policy import Rules, check, load_policy_file
from tests.gateway.access_support import CHEAP, bearer, sample
from tests.gateway.inprocess import FakeTriton, gateway_client

# --- the rules alone ---


def test_words_match_whole_words_case_insensitively() -> None:
    rules = Rules.build("global", ["kale", "c++", "red wine"], [], "test")
    assert rules.first_match("eat KALE now") == 'global word "kale"'
    assert rules.first_match("Kale.") == 'global word "kale"'
    assert rules.first_match("a kaleidoscope, kales") is None  # not a whole word
    assert rules.first_match("learn C++ today") == 'global word "c++"'
    assert rules.first_match("a glass of Red  Wine") is None  # the phrase as written, one space
    assert rules.first_match("a glass of red wine") == 'global word "red wine"'


def test_regexes_search_anywhere_as_written() -> None:
    rules = Rules.build("key", [], [r"b[a4]nned\d+", r"(?i)shout"], "test")
    assert rules.first_match("xb4nned42y") == r'key regex "b[a4]nned\d+"'
    assert rules.first_match("BANNED1") is None  # case-sensitive unless the regex says (?i)
    assert rules.first_match("SHOUT") == 'key regex "(?i)shout"'


def test_check_names_the_prompt_and_checks_global_rules_first() -> None:
    global_rules = Rules.build("global", ["fox"], [], "test")
    key_rules = Rules.build("key", ["hen"], [], "test")
    assert check(["a cat", "a hen and a fox"], global_rules, key_rules).index == 1  # type: ignore[union-attr]
    assert check(["a hen and a fox"], global_rules, key_rules).rule == 'global word "fox"'  # type: ignore[union-attr]
    assert check(["a cat"], global_rules, key_rules) is None


def test_bad_rules_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"regexes\[1\]: invalid regex '\(unclosed'"):
        Rules.build("global", [], ["ok", "(unclosed"], "policy file p.json")
    with pytest.raises(ValueError, match="words: each must be a non-empty string"):
        Rules.build("global", [" "], [], "test")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"words": ["x"], "regex": ["y"]}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['regex'\]"):
        load_policy_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_policy_file(path)
    with pytest.raises(ValueError, match="not found"):
        load_policy_file(tmp_path / "missing.json")
    assert not load_policy_file(None)  # no file: no rules


def test_bad_regex_stops_the_gateway_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"regexes": ["fine", "[oops"]}))
    env = {"SD_GATEWAY_POLICY_FILE": str(path), "SD_GATEWAY_KEYS_FILE": str(tmp_path / "keys.json")}
    done = subprocess.run(
        [sys.executable, "-m", "sd_triton.cli", "gateway", "--port", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "regexes[1]: invalid regex '[oops'" in done.stderr


# --- over HTTP ---


@pytest.fixture(scope="module")
def policy_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("policy")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"words": ["forbidden"], "regexes": [r"b[a4]nned\d+"]}))
    keys = tmp / "keys.json"
    strict = create_key(keys, "strict", block_words=["kale"], block_regexes=[r"^draw"])
    plain = create_key(keys, "plain")
    backend = FakeTriton()
    with gateway_client(backend, policy_file=str(policy), keys_file=str(keys)) as http:
        yield {"http": http, "backend": backend, "strict": bearer(strict.token), "plain": bearer(plain.token)}


def test_refused_prompt_is_400_before_any_triton_work(
    policy_gateway: dict,
) -> None:
    http, headers = policy_gateway["http"], policy_gateway["plain"]
    before_triton = len(policy_gateway["backend"].calls)
    before_metric = sample(http, "gateway_rejections_total", reason="content_policy")

    response = http.post("/v1/generate", json={"prompt": "a FORBIDDEN fruit", **CHEAP}, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {
            "type": "content_policy",
            "code": "content_policy",
            "message": """prompt: refused by the content policy (rule global word "forbidden")""",
            "field": "prompt",
        }
    }
    batch = {"prompts": ["a cat", "a b4nned77 dog"], **CHEAP}
    response = http.post("/v1/generate/batch", json=batch, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("content_policy", "prompts")
    assert error["message"].startswith("prompts[1]: refused by the content policy (rule global regex")

    assert len(policy_gateway["backend"].calls) == before_triton  # nothing reached Triton
    assert sample(http, "gateway_rejections_total", reason="content_policy") == before_metric + 2


def test_negative_prompt_and_partial_words_pass(
    policy_gateway: dict,
) -> None:
    http = policy_gateway["http"]
    before = len(policy_gateway["backend"].calls)
    body = {"prompt": "an unforbidden garden", "negative_prompt": "forbidden banned1", **CHEAP}
    response = http.post("/v1/generate", json=body, headers=policy_gateway["plain"])
    assert response.status_code == 200, response.text
    assert len(policy_gateway["backend"].calls) > before  # this one did reach Triton: the count can move


def test_per_key_additions_apply_to_their_key_only(policy_gateway: dict) -> None:
    http = policy_gateway["http"]
    for prompt, rule in (("a Kale salad", 'key word "kale"'), ("draw a boat", 'key regex "^draw"')):
        response = http.post(
            "/v1/generate", json={"prompt": prompt, **CHEAP}, headers=policy_gateway["strict"]
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == f"prompt: refused by the content policy (rule {rule})"
    response = http.post(
        "/v1/generate", json={"prompt": "a kale salad", **CHEAP}, headers=policy_gateway["plain"]
    )
    assert response.status_code == 200, response.text


def test_openai_route_answers_in_openai_shape(
    policy_gateway: dict,
) -> None:
    before = len(policy_gateway["backend"].calls)
    response = policy_gateway["http"].post(
        "/v1/images/generations", json={"prompt": "forbidden fruit", "size": "64x64"},
        headers=policy_gateway["strict"],
    )  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "content_policy_violation"
    assert error["param"] == "prompt"
    assert "refused by the content policy" in error["message"]
    assert len(policy_gateway["backend"].calls) == before
