"""Questions per stream at the LM worker: every caption update answers each question over the same
window, each answer equals asking that question alone, the questions cost only their own tokens
(the window's audio KV is shared), and questions changed live apply from the next update."""

from __future__ import annotations

import dataclasses

import redis
import torch

from lm_service.engines.base import CaptionEngine, CaptionRequest, caption_all
from lm_service.worker import LMWorker
from services.model.generation import GenerationOptions
from services.monitor.answers import yes_no
from services.transport import keys
from services.wire.settings import (
    QUESTIONS_FIELD,
    Question,
    StreamSettings,
    questions_to_text,
    settings_to_hash,
)
from tests.lm_service.test_redelivery import (
    DEFAULTS,
    ONE_AT_A_TIME,
    SETTINGS,
    SID,
    Publisher,
    client,  # noqa: F401  (a fixture)
    ended,
    events,
    messages,
    run_until,
)

QUESTIONS = (Question("tone", "Is there a tone?"), Question("what", "What sound is this?"))
N = 8  # publications (16 s)


def register(r: redis.Redis, questions: tuple[Question, ...]) -> None:
    settings = StreamSettings(session=dataclasses.replace(SETTINGS, questions=questions))
    r.hset(keys.session_config(SID), mapping=settings_to_hash(settings))
    r.zadd(keys.ACTIVE_SESSIONS, {SID: 1})


def run(r: redis.Redis, engine: CaptionEngine, questions: tuple[Question, ...]) -> tuple[list[dict], int]:
    """Every event of an N-publication session, and the prompt tokens the engine computed for it
    (from a warm start: the shared system-prompt prefix is already cached)."""
    r.flushall()
    register(r, questions)
    Publisher(r)(*messages(N, engine.hidden_size, seed=31))
    caption_all(engine, [CaptionRequest(torch.zeros(5, engine.hidden_size), SETTINGS.prompt)], 120)
    before = engine.stats().computed_prompt_tokens
    w = LMWorker(r, engine, worker_id="wq", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    run_until(w, ended(r), "the end")
    computed = engine.stats().computed_prompt_tokens - before
    engine.end_stream(SID)
    return [e for e in events(r) if e.get("type", "caption") == "caption"], computed


def window_tokens(engine: CaptionEngine, start_s: float, end_s: float) -> torch.Tensor:
    tokens = torch.cat([m.tokens for m in messages(N, engine.hidden_size, seed=31)])
    return tokens[round(start_s * 5) : round(end_s * 5)]


def test_every_update_answers_every_question_like_asking_it_alone(
    client: redis.Redis,  # noqa: F811
    engine: CaptionEngine,
) -> None:
    evs, _ = run(client, engine, QUESTIONS)
    captions = [e for e in evs if not e.get("question_id")]
    assert captions
    for cap in captions:
        key = (cap["segment_id"], cap["revision"], cap["window_start"], cap["window_end"], cap["is_final"])
        answers = {
            e["question_id"]: e
            for e in evs
            if e.get("question_id")
            and (e["segment_id"], e["revision"], e["window_start"], e["window_end"], e["is_final"]) == key
        }
        assert set(answers) == {"tone", "what"}, (key, evs)
        tokens = window_tokens(engine, float(cap["window_start"]), float(cap["window_end"]))
        opts = GenerationOptions(max_new_tokens=SETTINGS.max_new_tokens)
        alone = caption_all(engine, [CaptionRequest(tokens, q.text, opts) for q in QUESTIONS], 120)
        for q, res in zip(QUESTIONS, alone, strict=True):
            assert answers[q.id]["text"] == res.text, (q, key)
            flag = yes_no(res.text)
            assert answers[q.id]["answer"] == ("" if flag is None else "1" if flag else "0")


def test_questions_cost_only_their_own_tokens(
    client: redis.Redis,  # noqa: F811
    engine: CaptionEngine,
) -> None:
    plain, computed_plain = run(client, engine, ())
    asked, computed_asked = run(client, engine, QUESTIONS)
    updates = len(plain)
    assert updates == len([e for e in asked if not e.get("question_id")])
    own = sum(len(engine._prompt(q.text, "").suffix_ids) for q in QUESTIONS)  # type: ignore[attr-defined]
    assert computed_asked - computed_plain == updates * own


def test_questions_changed_live_apply_from_the_next_update(
    client: redis.Redis,  # noqa: F811
    engine: CaptionEngine,
) -> None:
    client.flushall()
    register(client, QUESTIONS)
    msgs = messages(N, engine.hidden_size, seed=31)
    publish = Publisher(client)
    publish(*msgs[:3])
    w = LMWorker(client, engine, worker_id="wl", defaults=DEFAULTS, limits=ONE_AT_A_TIME)
    run_until(w, lambda: client.hget(keys.session_state(SID), "last_seq") == b"3", "seq 3")
    seen = len(events(client))
    client.hset(
        keys.session_config(SID),
        QUESTIONS_FIELD,
        questions_to_text([Question("alarm", "Is there an alarm?")]),
    )
    w.ownership.refresh_questions()
    publish(*msgs[3:])
    run_until(w, ended(client), "the end")
    engine.end_stream(SID)
    before, after = events(client)[:seen], events(client)[seen:]
    assert {e.get("question_id") for e in before if e.get("question_id")} == {"tone", "what"}
    assert {e.get("question_id") for e in after if e.get("question_id")} == {"alarm"}
    assert sum(1 for e in after if e.get("question_id") == "alarm") == sum(
        1 for e in after if e.get("type", "caption") == "caption" and not e.get("question_id")
    )
