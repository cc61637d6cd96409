"""Synthetic traces with other reuse shapes than conversations, for checking policies beyond the
shipped trace (tests and ``python -m hicache.replay.policy_study --workload NAME``).

Each generator returns ``(chains, prompt_tokens)`` in the trace's units: chains of 512-token
block ids, prefix-chained (the same id always follows the same parent), and each prompt's token
count. A fixed ``seed`` gives the same workload every time.

- ``shared_prompts``  a few system prompts of Zipf popularity, each followed by an independent
  question that is never asked again: reuse is all in the shared heads.
- ``few_shot``        one instruction block, then one of many few-shot example sets (Zipf
  popularity, long), then a fresh query: a two-level tree whose middle level is reused.
- ``conversations``   conversations with a random number of turns, each turn extending the
  previous prompt, turns of different conversations interleaved.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["WORKLOADS", "conversations", "few_shot", "shared_prompts"]

BLOCK_TOKENS = 512
Workload = tuple[list[tuple[int, ...]], list[int]]


class _Ids:
    """Block ids of a prefix tree: a child is named by its parent and its own content."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, object], int] = {}

    def chain(self, parts: Sequence[object], parent: int = -1) -> list[int]:
        out = []
        for part in parts:
            parent = self._ids.setdefault((parent, part), len(self._ids))
            out.append(parent)
        return out


def _zipf(rng: random.Random, n: int, s: float = 1.0) -> int:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights)[0]


def _tokens(rng: random.Random, blocks: int) -> int:
    # the last block is partial, as in real prompts
    return (blocks - 1) * BLOCK_TOKENS + rng.randint(1, BLOCK_TOKENS)


def shared_prompts(
    seed: int = 0, requests: int = 6000, prompts: int = 40, prompt_blocks: int = 6
) -> Workload:
    rng = random.Random(seed)
    ids = _Ids()
    chains, tokens = [], []
    for i in range(requests):
        p = _zipf(rng, prompts)
        head = [("prompt", p, j) for j in range(prompt_blocks)]
        question = [("question", i, j) for j in range(rng.randint(1, 4))]
        chain = ids.chain([*head, *question])
        chains.append(tuple(chain))
        tokens.append(_tokens(rng, len(chain)))
    return chains, tokens


def few_shot(seed: int = 0, requests: int = 6000, templates: int = 300) -> Workload:
    rng = random.Random(seed)
    ids = _Ids()
    lengths = [rng.randint(4, 24) for _ in range(templates)]
    chains, tokens = [], []
    for i in range(requests):
        t = _zipf(rng, templates, 0.8)
        examples = [("examples", t, j) for j in range(lengths[t])]
        query = [("query", i, j) for j in range(rng.randint(1, 2))]
        chain = ids.chain([("instruction",), *examples, *query])
        chains.append(tuple(chain))
        tokens.append(_tokens(rng, len(chain)))
    return chains, tokens


def conversations(seed: int = 0, requests: int = 6000, active: int = 60) -> Workload:
    rng = random.Random(seed)
    ids = _Ids()
    open_: list[tuple[int, list[object], int]] = []  # (conversation, parts so far, turns left)
    started = 0
    chains: list[tuple[int, ...]] = []
    tokens: list[int] = []
    while len(chains) < requests:
        if len(open_) < active or rng.random() < 0.1:
            doc: list[object] = [("doc", started, j) for j in range(rng.randint(2, 30))]
            open_.append((started, doc, rng.choice((0, 0, 1, 2, 4, 8))))
            started += 1
        k = rng.randrange(len(open_))
        conv, parts, left = open_[k]
        turn = [*parts, ("turn", conv, len(chains))]
        chain = ids.chain([("system",), *turn, ("tail", len(chains))])
        chains.append(tuple(chain))
        tokens.append(_tokens(rng, len(chain)))
        if left == 0:
            open_.pop(k)
        else:
            open_[k] = (conv, turn, left - 1)
    return chains, tokens


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "shared_prompts": shared_prompts,
    "few_shot": few_shot,
    "conversations": conversations,
}
