"""BatchingPredictor alone, on real models loaded through MLflow, in one event loop per test.

The controlled model (assets/controlled_model.py) holds its first ``predict`` on a gate, so the
requests that arrive meanwhile are known to be queued when the gate opens: the number and the
content of predict calls are then exact. Every wait has a deadline and says what it waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pytest
from unit_helpers import WAIT_S, controlled, gate_closed, id_frame, until, wait_started

from mlflow_deploy_plugin.serving.batching import (
    BatchingPredictor,
    QueueFull,
    UnsplittableOutput,
    batching_default,
)
from mlflow_deploy_plugin.serving.model_slot import ModelSlot


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one scenario in a fresh event loop, failing it if it has not finished by the deadline."""
    try:
        return asyncio.run(asyncio.wait_for(coro, WAIT_S))
    except TimeoutError:
        raise AssertionError(f"scenario not finished after {WAIT_S}s: a request was never answered") from None


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    """One predict thread, as the app has."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
    yield pool
    pool.shutdown(wait=True)


class Harness:
    """A predictor over the controlled model, recording what each caller sent and each batch's rows."""

    def __init__(self, slot: ModelSlot, executor: ThreadPoolExecutor, max_batch_rows: int = 4096,
                 **options: Any) -> None:
        self.model = controlled(slot)
        self.batches: list[int] = []
        self.predictor = BatchingPredictor(slot, executor, max_batch_rows, on_batch=self.batches.append, **options)
        self.submitted: list[list[int]] = []
        self._next_id = 0

    def ids(self, rows: int) -> list[int]:
        """Fresh row ids, unique across the test, so every answer shows whose row it is."""
        first, self._next_id = self._next_id, self._next_id + rows
        return list(range(first, first + rows))

    async def submit(self, ids: list[int], params: dict[str, Any] | None = None) -> list[int]:
        # predict() queues the request before its first await, so once this is recorded the
        # request is in the predictor's hands.
        self.submitted.append(ids)
        return np.asarray(await self.predictor.predict(id_frame(ids), params)).tolist()

    async def blocked_first(self) -> tuple[list[int], asyncio.Task[list[int]]]:
        """Start a one-row request whose predict blocks on the (closed) gate; return once it runs."""
        ids = self.ids(1)
        task = asyncio.create_task(self.submit(ids))
        await asyncio.to_thread(wait_started, self.model)
        return ids, task

    async def behind(self, requests: list[tuple[list[int], dict[str, Any] | None]],
                     ) -> list[asyncio.Task[list[int]]]:
        """Submit requests while the first one is predicting; return once all are queued."""
        expected = len(self.submitted) + len(requests)
        tasks = [asyncio.create_task(self.submit(ids, params)) for ids, params in requests]
        await until(lambda: len(self.submitted) == expected, f"{len(requests)} requests to be queued")
        return tasks


def doubled(ids: list[int]) -> list[int]:
    return [2 * i for i in ids]


def test_a_lone_request_is_predicted_at_once(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    ids = harness.ids(3)
    assert run(harness.submit(ids)) == doubled(ids)
    assert harness.model.calls == [ids]
    assert harness.batches == [3]


def test_requests_arriving_during_a_prediction_share_one_call(controlled_slot: ModelSlot,
                                                              executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    waiting = [harness.ids(size) for size in (1, 2, 3, 4, 5)]

    async def scenario() -> tuple[list[int], list[list[int]]]:
        with gate_closed(harness.model):
            first_ids, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
        return first_ids, [await first, *await asyncio.gather(*tasks)]

    first_ids, answers = run(scenario())
    assert answers == [doubled(ids) for ids in [first_ids, *waiting]], "each caller gets its own rows, in order"
    assert harness.model.calls == [first_ids, [i for ids in waiting for i in ids]], (
        "the five queued requests must be predicted in one call")
    assert harness.batches == [1, 15]
    assert harness.predictor.last_batch_sizes == [1, 2, 3, 4, 5]


def test_requests_sent_when_a_batch_is_answered_join_the_next_batch(controlled_slot: ModelSlot,
                                                                    executor: ThreadPoolExecutor) -> None:
    """A closed-loop client sends its next requests as soon as it is answered: the batcher lets the
    event loop queue them before it takes the next batch, instead of predicting what happened to be
    queued alone and the newcomers in a call of their own (issue 10: batch sizes that collapse)."""
    # Settling's time cap far away: the test is about the quiet turns, not the machine's speed (on a
    # loaded machine a 10 ms cap can pass between two turns).
    harness = Harness(controlled_slot, executor, settle_max_s=60.0)
    behind_ids = harness.ids(1)
    follow_ids = [harness.ids(1), harness.ids(2)]

    async def scenario() -> list[list[int]]:
        async def first_then_more() -> list[list[int]]:
            answers = [await first]
            # Answered: send the next two at once, in this step (as a client's next requests
            # arrive together on a socket the loop reads after answering).
            more = [asyncio.ensure_future(harness.submit(ids)) for ids in follow_ids]
            return answers + list(await asyncio.gather(*more))

        with gate_closed(harness.model):
            first_ids, first = await harness.blocked_first()
            [behind] = await harness.behind([(behind_ids, None)])
            client = asyncio.create_task(first_then_more())
        return [*await client, await behind]

    answers = run(scenario())
    assert answers[1:] == [doubled(ids) for ids in [*follow_ids, behind_ids]]
    assert harness.batches == [1, 4], (
        f"the request queued behind the first and the two sent when it was answered must share one "
        f"call; rows per call were {harness.batches}")


def test_a_lone_request_at_an_idle_model_is_predicted_without_settling(controlled_slot: ModelSlot,
                                                                       executor: ThreadPoolExecutor) -> None:
    """Settling is for the requests a batch's answers bring back; a lone caller at an idle model gains
    nothing from it, and each turn of the loop hands the GIL to the worker's other threads (a shadow's
    copy sender), which showed in p99 at c = 1."""
    predictor = BatchingPredictor(controlled_slot, executor, 4096, settle_max_s=60.0)
    settled_with: list[int] = []
    settle = predictor._settle

    async def counting_settle() -> None:
        settled_with.append(predictor.queued)
        await settle()

    predictor._settle = counting_settle  # type: ignore[method-assign]

    async def scenario() -> list[Any]:
        return [await predictor.predict(id_frame([i]), None) for i in range(3)]

    answers = run(scenario())
    assert [np.asarray(answer).tolist() for answer in answers] == [doubled([i]) for i in range(3)]
    assert not any(settled_with), f"a lone request waited for the loop to settle: queue lengths {settled_with}"


def test_settling_stops_once_a_full_batch_is_queued(controlled_slot: ModelSlot,
                                                    executor: ThreadPoolExecutor) -> None:
    """Requests queued on every turn of the loop never let settling go quiet: once the queue holds a
    full batch (``max_batch_rows``) it is taken, rather than the predict thread idling beside it until
    the time cap or half of ``max_queue``."""
    sent = 0
    sent_at_calls: list[int] = []
    predictor = BatchingPredictor(controlled_slot, executor, 4, on_batch=lambda rows: sent_at_calls.append(sent),
                                  max_queue=1000, settle_max_s=60.0)

    async def scenario() -> list[Any]:
        nonlocal sent
        tasks = []
        for i in range(200):  # one request a turn, as a loop reading many connections queues them
            tasks.append(asyncio.ensure_future(predictor.predict(id_frame([i]), None)))
            sent += 1
            await asyncio.sleep(0)
        return list(await asyncio.gather(*tasks))

    answers = run(scenario())
    assert [np.asarray(answer).tolist() for answer in answers] == [doubled([i]) for i in range(200)]
    assert sent_at_calls and sent_at_calls[0] < 200, (
        f"the first batch must be taken while requests still arrive, once 4 rows wait; calls began "
        f"when {sent_at_calls[:3]} requests had been sent")
    assert predictor._queued_rows == 0, "every queued row is counted out again once answered"


def test_many_concurrent_requests_take_fewer_calls_and_each_gets_its_own_rows(
        controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    sizes = np.random.default_rng(3).integers(1, 6, size=60).tolist()
    requests = [harness.ids(size) for size in sizes]

    async def scenario() -> list[list[int]]:
        return list(await asyncio.gather(*(harness.submit(ids) for ids in requests)))

    answers = run(scenario())
    assert answers == [doubled(ids) for ids in requests]
    assert len(harness.model.calls) < len(requests) / 2, harness.batches
    assert sorted(i for call in harness.model.calls for i in call) == list(range(sum(sizes))), (
        "every row predicted exactly once")


def test_batches_never_exceed_max_batch_rows(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor, max_batch_rows=5)
    waiting = [harness.ids(size) for size in (2, 2, 2, 1, 3)]

    async def scenario() -> list[list[int]]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
        await first
        return list(await asyncio.gather(*tasks))

    assert run(scenario()) == [doubled(ids) for ids in waiting]
    # Taken in arrival order while they fit: 2+2 (a third 2 would make 6), 2+1, then 3.
    assert [len(call) for call in harness.model.calls] == [1, 4, 3, 3]
    assert harness.batches == [1, 4, 3, 3]


def test_a_request_as_large_as_max_batch_rows_is_predicted_alone(controlled_slot: ModelSlot,
                                                                 executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor, max_batch_rows=5)
    large, small_a, small_b = harness.ids(5), harness.ids(1), harness.ids(1)

    async def scenario() -> tuple[list[list[int]], list[int]]:
        with gate_closed(harness.model):
            first_ids, first = await harness.blocked_first()
            tasks = await harness.behind([(large, None), (small_a, None), (small_b, None)])
        return [await first, *await asyncio.gather(*tasks)], first_ids

    answers, first_ids = run(scenario())
    assert answers == [doubled(ids) for ids in (first_ids, large, small_a, small_b)]
    assert harness.model.calls == [first_ids, large, small_a + small_b]


def test_max_batch_rows_of_one_disables_batching(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor, max_batch_rows=1)
    waiting = [harness.ids(size) for size in (1, 2, 1)]

    async def scenario() -> tuple[list[list[int]], list[int]]:
        with gate_closed(harness.model):
            first_ids, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
        return [await first, *await asyncio.gather(*tasks)], first_ids

    answers, first_ids = run(scenario())
    assert answers == [doubled(ids) for ids in (first_ids, *waiting)]
    assert harness.model.calls == [first_ids, *waiting], "one predict call per request"


def test_a_request_whose_rows_fail_fails_alone(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    good_a, bad, good_b = harness.ids(2), harness.ids(2), harness.ids(1)
    harness.model.poison = frozenset({bad[1]})

    async def scenario() -> list[Any]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(good_a, None), (bad, None), (good_b, None)])
        await first
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    answer_a, failure, answer_b = run(scenario())
    assert answer_a == doubled(good_a)
    assert answer_b == doubled(good_b)
    assert isinstance(failure, ValueError) and f"poisoned ids [{bad[1]}]" in str(failure), repr(failure)
    # The batch failed as a whole, then each request was retried alone.
    assert harness.model.calls[1:] == [good_a + bad + good_b, good_a, bad, good_b]

    # The predictor is not left stuck: the next request is answered.
    later = harness.ids(2)
    assert run(harness.submit(later)) == doubled(later)


def test_requests_with_params_are_never_batched(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    tripled, plain_a, plain_b = harness.ids(2), harness.ids(1), harness.ids(2)

    async def scenario() -> list[list[int]]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(tripled, {"factor": 3}), (plain_a, None), (plain_b, None)])
        await first
        return list(await asyncio.gather(*tasks))

    assert run(scenario()) == [[3 * i for i in tripled], doubled(plain_a), doubled(plain_b)]
    assert harness.model.calls[1:] == [tripled, plain_a + plain_b]


def test_a_cancelled_queued_request_is_never_predicted(controlled_slot: ModelSlot,
                                                       executor: ThreadPoolExecutor) -> None:
    """What a timeout does to a queued request: the app's asyncio.timeout cancels it."""
    harness = Harness(controlled_slot, executor)
    kept_a, dropped, kept_b = harness.ids(1), harness.ids(2), harness.ids(1)

    async def scenario() -> list[Any]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(kept_a, None), (dropped, None), (kept_b, None)])
            tasks[1].cancel()
            await until(tasks[1].done, "the cancelled request to finish")
        await first
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    answer_a, cancelled, answer_b = run(scenario())
    assert isinstance(cancelled, asyncio.CancelledError), repr(cancelled)
    assert (answer_a, answer_b) == (doubled(kept_a), doubled(kept_b))
    assert harness.model.calls[1:] == [kept_a + kept_b]
    assert harness.predictor._queued_rows == 0, "the cancelled request's rows are counted out of the queue"


def test_cancelling_the_request_being_predicted_leaves_the_queue_answered(
        controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    waiting = [harness.ids(1), harness.ids(2)]

    async def scenario() -> tuple[list[list[int]], list[int]]:
        with gate_closed(harness.model):
            first_ids, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
            first.cancel()
            await until(first.done, "the cancelled request to finish")
        assert first.cancelled()
        return list(await asyncio.gather(*tasks)), first_ids

    answers, first_ids = run(scenario())
    assert answers == [doubled(ids) for ids in waiting]
    assert harness.model.calls == [first_ids, waiting[0] + waiting[1]]


def test_coalesced_sklearn_predictions_equal_one_by_one(classifier_slot: ModelSlot, executor: ThreadPoolExecutor,
                                                        iris: tuple[pd.DataFrame, pd.Series]) -> None:
    features, _ = iris
    rng = np.random.default_rng(11)
    starts = rng.integers(0, len(features) - 4, size=40)
    requests = [features.iloc[start:start + size].reset_index(drop=True)
                for start, size in zip(starts, rng.integers(1, 5, size=40), strict=True)]
    expected = [classifier_slot.predict(frame).tolist() for frame in requests]
    assert len({value for answer in expected for value in answer}) == 3, "rows of every class, so mix-ups show"
    batches: list[int] = []
    predictor = BatchingPredictor(classifier_slot, executor, 4096, on_batch=batches.append)

    async def scenario() -> list[list[int]]:
        answers = await asyncio.gather(*(predictor.predict(frame, None) for frame in requests))
        return [np.asarray(answer).tolist() for answer in answers]

    assert run(scenario()) == expected
    assert len(batches) < len(requests), batches
    assert sum(batches) == sum(len(frame) for frame in requests)


# -- the bounded queue ------------------------------------------------------------------------


def test_a_full_queue_refuses_at_once_and_recovers_when_it_drains(controlled_slot: ModelSlot,
                                                                 executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor, max_queue=3)
    waiting = [harness.ids(1) for _ in range(3)]
    refused = harness.ids(1)

    async def scenario() -> tuple[list[list[int]], BaseException | None]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
            assert harness.predictor.queued == 3 and harness.predictor.full
            error = None
            try:
                await harness.predictor.predict(id_frame(refused), None)  # refused before any await
            except QueueFull as exc:
                error = exc
        await first
        return list(await asyncio.gather(*tasks)), error

    answers, error = run(scenario())
    assert isinstance(error, QueueFull) and "max_queue=3" in str(error), repr(error)
    assert answers == [doubled(ids) for ids in waiting]
    assert refused[0] not in [i for call in harness.model.calls for i in call], "a refused request is never predicted"
    assert harness.predictor.queued == 0 and not harness.predictor.full
    later = harness.ids(2)
    assert run(harness.submit(later)) == doubled(later), "the predictor recovers by itself"


def test_a_request_that_gives_up_leaves_the_queue_at_once(controlled_slot: ModelSlot,
                                                         executor: ThreadPoolExecutor) -> None:
    """What a timeout does: asyncio.wait_for cancels the request; its place (and data) is freed."""
    harness = Harness(controlled_slot, executor, max_queue=2)
    kept, timed_out = harness.ids(1), harness.ids(1)

    async def scenario() -> list[int]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(kept, None)])
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(harness.submit(timed_out), 0.05)
            assert harness.predictor.queued == 1, "the timed-out request still holds a place"
            # Its place is free again while the model is still busy: another request is admitted.
            tasks += await harness.behind([(harness.ids(1), None)])
            assert harness.predictor.queued == 2
        await first
        return [i for task in await asyncio.gather(*tasks) for i in task]

    run(scenario())
    assert timed_out[0] not in [i for call in harness.model.calls for i in call]


def test_batching_off_predicts_each_request_alone(controlled_slot: ModelSlot, executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor, batching=False)
    waiting = [harness.ids(size) for size in (1, 2, 3)]

    async def scenario() -> list[list[int]]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
        await first
        return list(await asyncio.gather(*tasks))

    assert run(scenario()) == [doubled(ids) for ids in waiting]
    assert harness.model.calls[1:] == waiting


def test_an_output_that_cannot_be_split_is_never_predicted_twice(controlled_slot: ModelSlot,
                                                                 executor: ThreadPoolExecutor) -> None:
    harness = Harness(controlled_slot, executor)
    harness.model.aggregate = True  # one number per call, whatever the rows
    waiting = [harness.ids(1), harness.ids(2)]

    async def scenario() -> list[Any]:
        with gate_closed(harness.model):
            _, first = await harness.blocked_first()
            tasks = await harness.behind([(ids, None) for ids in waiting])
        await first
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    outcomes = run(scenario())
    assert all(isinstance(outcome, UnsplittableOutput) for outcome in outcomes), outcomes
    assert harness.model.calls[1:] == [waiting[0] + waiting[1]], "the batch's rows were predicted once, only"
    assert not harness.predictor.batching, "batching stops for this model"
    alone = harness.ids(3)
    assert run(harness.submit(alone)) == [2 * sum(alone)]


def test_batching_is_on_by_default_only_for_row_wise_flavors(classifier_slot: ModelSlot,
                                                             controlled_slot: ModelSlot) -> None:
    assert batching_default(classifier_slot.metadata.flavors)  # sklearn
    assert not batching_default(controlled_slot.metadata.flavors)  # a custom python_function model
    assert batching_default({"python_function": {}, "xgboost": {}})
    assert not batching_default(None)
