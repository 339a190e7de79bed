"""Load shedding and batching defaults of the app, in process (real app, real models, TestClient).

The controlled model holds its predict calls on a gate, so which requests wait in the queue is
known exactly; the queue's depth is read from the app's own /metrics.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from unit_helpers import (
    WAIT_S,
    ServeFactory,
    assert_error,
    controlled,
    gate_closed,
    id_frame,
    metric,
    split_body,
    wait_started,
)

from mlflow_deploy_plugin.serving.model_slot import ModelSlot


def post(client: Any, ids: list[int]) -> Any:
    return client.post("/invocations", content=json.dumps(split_body(id_frame(ids))),
                       headers={"content-type": "application/json"})


def wait_queued(client: Any, depth: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while metric(client.get("/metrics").text, "mlflow_deploy_queued_requests") != depth:
        assert time.monotonic() < deadline, f"the queue never reached {depth} requests"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_at_once_and_recovers(serve: ServeFactory,
                                                                       controlled_slot: ModelSlot) -> None:
    model = controlled(controlled_slot)
    served = serve(controlled_slot, max_queue=2)
    with ThreadPoolExecutor(max_workers=3) as pool, gate_closed(model):
        first = pool.submit(post, served.client, [1])
        wait_started(model)
        queued = [pool.submit(post, served.client, [i]) for i in (2, 3)]
        wait_queued(served.client, 2)
        refused = post(served.client, [4])  # answered while the model is still held
        assert_error(refused, 503, "TEMPORARILY_UNAVAILABLE", "max_queue=2")
        assert refused.headers["retry-after"] == "1"
    assert [future.result().json() for future in (first, *queued)] == [
        {"predictions": [2]}, {"predictions": [4]}, {"predictions": [6]}]
    assert 4 not in [i for call in model.calls for i in call], "a shed request never reaches the model"
    assert post(served.client, [5]).json() == {"predictions": [10]}, "recovered once the queue drained"
    text = served.client.get("/metrics").text
    assert metric(text, "mlflow_deploy_requests_total", status="503") == 1
    assert metric(text, "mlflow_deploy_queued_requests") == 0


def test_a_timed_out_request_frees_its_place_in_the_queue(serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    model = controlled(controlled_slot)
    served = serve(controlled_slot, max_queue=1, timeout_s=1.0)
    with ThreadPoolExecutor(max_workers=2) as pool, gate_closed(model):
        first = pool.submit(post, served.client, [1])
        wait_started(model)
        assert_error(post(served.client, [2]), 504, "DEADLINE_EXCEEDED")  # queued, then timed out
        assert metric(served.client.get("/metrics").text, "mlflow_deploy_queued_requests") == 0
        later = pool.submit(post, served.client, [3])  # admitted (not a 503): the place is free again
        wait_queued(served.client, 1)
    assert first.result().status_code == 504  # held past timeout_s by the gate
    # `later` may itself time out on a busy machine before the gate opens; either way it was admitted.
    assert later.result().status_code in (200, 504), later.text
    assert [1] in model.calls and [2] not in model.calls, "the timed-out queued request was never predicted"


def test_every_request_a_replica_holds_ends_within_timeout_s_even_if_the_model_never_answers(
        serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    """What bounds a retiring Ray replica's drain (engines/ray/shutdown.py): a request's timeout_s
    counts from joining the queue, so all max_ongoing_requests (2 x max_queue) requests Serve hands a
    replica end (504 for the running call and the queue, 503 beyond it) while the model is still held:
    none waits for the queue ahead of it to be predicted."""
    model = controlled(controlled_slot)
    served = serve(controlled_slot, max_queue=3, timeout_s=3.0)
    with ThreadPoolExecutor(max_workers=6) as pool, gate_closed(model):
        running = pool.submit(post, served.client, [1])
        wait_started(model)
        queued = [pool.submit(post, served.client, [i]) for i in (2, 3, 4)]
        wait_queued(served.client, 3)
        refused = [pool.submit(post, served.client, [i]) for i in (5, 6)]
        done, pending = wait([running, *queued, *refused], timeout=WAIT_S)
        assert not pending, f"{len(pending)} requests still wait for the held model"
        assert model.calls == [[1]], "a queued request reached the model"
    assert [f.result().status_code for f in (running, *queued)] == [504] * 4
    for future in refused:
        assert_error(future.result(), 503, "TEMPORARILY_UNAVAILABLE", "max_queue=3")


def test_custom_pyfunc_models_are_not_batched_unless_asked(serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    model = controlled(controlled_slot)
    for batching, expected in (("auto", [[1], [2], [3]]), ("true", [[1], [2, 3]]), ("false", [[1], [2], [3]])):
        model.calls.clear()
        served = serve(controlled_slot, batching=batching)
        with ThreadPoolExecutor(max_workers=3) as pool, gate_closed(model):
            first = pool.submit(post, served.client, [1])
            wait_started(model)
            rest = [pool.submit(post, served.client, [i]) for i in (2, 3)]
            wait_queued(served.client, 2)
        assert [f.result().json()["predictions"] for f in (first, *rest)] == [[2], [4], [6]]
        # Requests 2 and 3 are sent at once: their order within one batch is not fixed.
        assert sorted(sorted(call) for call in model.calls) == expected, (batching, model.calls)
        while model.started.acquire(blocking=False):
            pass



def test_max_queue_is_per_served_version(serve: ServeFactory, controlled_slot: ModelSlot,
                                         controlled_path: Any) -> None:
    """What the README and the help text say of -C max_queue: per worker and per served version.
    With two versions served (a canary), one version's full queue sheds its own requests only: the
    other version's requests still join theirs (so one worker holds up to 2 x max_queue waiting)."""
    from unit_helpers import load_slot

    canary_slot = load_slot(controlled_path, "8", name="controlled")
    served = serve([(controlled_slot, 50.0), (canary_slot, 50.0)], max_queue=1)
    model = controlled(controlled_slot)

    def post_to(version: str, ids: list[int]) -> Any:
        return served.client.post("/invocations", content=json.dumps(split_body(id_frame(ids))),
                                  headers={"content-type": "application/json", "x-model-version": version})

    with ThreadPoolExecutor(max_workers=3) as pool, gate_closed(model):
        first = pool.submit(post_to, "7", [1])
        wait_started(model)  # version 7 holds the worker's one predict thread
        queued = [pool.submit(post_to, "7", [2])]
        wait_queued(served.client, 1)
        assert_error(post_to("7", [3]), 503, "TEMPORARILY_UNAVAILABLE", "max_queue=1")  # 7's queue is full
        queued.append(pool.submit(post_to, "8", [4]))  # 8's queue is its own: not refused
        deadline = time.monotonic() + WAIT_S
        while metric(served.client.get("/metrics").text, "mlflow_deploy_in_flight_requests") != 3:
            assert time.monotonic() < deadline, "the canary's request never arrived"
            time.sleep(0.01)
        assert not queued[-1].done()  # waiting for the predict thread version 7 holds, not refused
        assert_error(post_to("7", [5]), 503, "TEMPORARILY_UNAVAILABLE", "max_queue=1")  # 7 still full
    answers = [future.result() for future in (first, *queued)]
    assert [(a.status_code, a.headers["x-model-version"]) for a in answers] == [(200, "7"), (200, "7"), (200, "8")]
    assert metric(served.client.get("/metrics").text, "mlflow_deploy_requests_total", status="503") == 2
