"""The unit every evaluation suite produces and the runner consumes: one tokenised prompt with its
references and the name of the metric that scores it.

Suites (needle, RULER-style tasks, LongBench files) only build :class:`Example` lists; the runner
(:mod:`uncomp_cli.eval.runner`) generates for every method × budget and scores each prediction
with ``METRICS[example.metric]`` from :mod:`uncomp_cli.eval.metrics`. Keeping the two apart lets a
grid share tokenisation and the loaded model across all its runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One prompt of an evaluation.

    id: unique and stable for the same settings and seed (finished runs are matched by it).
    task: the suite's task name, e.g. ``"needle"``, ``"multikey"``, ``"hotpotqa"``.
    prompt_ids: the full prompt, chat template and answer prefix included.
    answers: acceptable reference answers (the metric decides how they are compared).
    metric: a key of :data:`uncomp_cli.eval.metrics.METRICS`.
    max_new_tokens: how much the model may answer.
    length: the grid's length axis (target prompt tokens); ``len(prompt_ids)`` is the actual one.
    meta: JSON-serialisable extras reported with the prediction (needle depth, LongBench fields).
    context_tokens: how many leading prompt tokens are context, asked about by the rest; what a
    query-agnostic run compresses before the question (None: the suite cannot split its prompts).
    """

    id: str
    task: str
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    metric: str
    max_new_tokens: int
    length: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    context_tokens: int | None = field(default=None, compare=False, hash=False)
