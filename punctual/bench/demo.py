"""`punctual demo`'s real questions: asked one at a time through the chat API, answered greedily."""
from __future__ import annotations

import time

import httpx

from punctual.bench.loadgen import Endpoint

QUESTIONS = [
    "What is the capital of France?",
    "What is the boiling point of water in Celsius?",
    "Name three primary colors.",
    "How many days are there in a week?",
]
ANSWER_TOKENS = 40


def ask(endpoint: Endpoint, questions: list[str] = QUESTIONS) -> list[tuple[str, str, float]]:
    """(question, answer, seconds) for each question, sent alone so its latency is its own."""
    answers = []
    with httpx.Client(trust_env=False, timeout=120.0, headers=endpoint.headers) as client:
        for question in questions:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": ANSWER_TOKENS,
                    "temperature": 0.0}
            if endpoint.model:
                body["model"] = endpoint.model
            start = time.perf_counter()
            response = client.post(f"{endpoint.api_url}/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"]
            answers.append((question, answer, time.perf_counter() - start))
    return answers


def answers_table(answers: list[tuple[str, str, float]]) -> str:
    lines = ["question -> answer (greedy, whole answer in ms)"]
    for question, answer, seconds in answers:
        flat = " ".join(answer.split())
        lines.append(f"  {question}\n    -> {flat}  ({seconds * 1000:.0f} ms)")
    return "\n".join(lines)
