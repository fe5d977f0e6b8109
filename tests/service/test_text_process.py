"""``VLA_MODEL_PROCESS`` for text and captions: generations decode in the child's continuous batcher
(``service/text_process.py``).

Every request must get exactly the tokens, text, finish reasons and stream it gets from the in-thread deployment of
the same checkpoint, alone or among others, and the child must follow the streams' clients: a client that leaves
frees its sequence's slot in the child.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from service import DeploymentSpec
from service.text_process import TextModelProcess
from tests.factories import EVALUATE_REQUESTS, PREDICT_REQUESTS, png_data_url
from tests.service.conftest import serving
from tests.service.live_server import live_server_process
from tests.service.test_model_process import parent_of, wait_gone
from vla_foundry.sampling import SamplingParams


@pytest.fixture(scope="module")
def client(tiny_checkpoints):
    specs = []
    for model_type in ("transformer", "vlm"):
        checkpoint = str(tiny_checkpoints[model_type])
        specs += [DeploymentSpec(name=f"{model_type}-here", checkpoint=checkpoint, model_process=False),
                  DeploymentSpec(name=f"{model_type}-there", checkpoint=checkpoint, model_process=True)]
    with serving(*specs, max_batch_size=4, continuous_batching=True, max_new_tokens=64) as c:
        yield c


def both(client, path: str, body: dict, model_type: str = "transformer") -> tuple[httpx.Response, httpx.Response]:
    return tuple(client.post(path, json={**body, "model": f"{model_type}-{where}"}) for where in ("here", "there"))


def streamed(client, body: dict) -> tuple[str, list[str]]:
    """A streamed /v1 completion's text and its chunks' finish reasons."""
    text, reasons = [], []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                reasons.append(choice["finish_reason"])
    return "".join(text), [r for r in reasons if r]


@pytest.mark.parametrize("model_type", ["transformer", "vlm"])
def test_models_shows_the_child_and_its_continuous_batcher(client, model_type):
    here = client.get(f"/models/{model_type}-here").json()
    there = client.get(f"/models/{model_type}-there").json()
    assert there["status"] == "ready" and there["model_process"]["alive"] and here["model_process"] is None
    assert parent_of(there["model_process"]["pid"]) == os.getpid()
    assert there["batching"] == here["batching"] and there["batching"]["generation"] == "continuous"
    assert there["io"] == here["io"]


@pytest.mark.parametrize("model_type", ["transformer", "vlm"])
@pytest.mark.parametrize("settings", [{"seed": 7}, {"temperature": 0.0}, {"seed": 3, "stop": ["e"]},
                                      {"seed": 2, "top_k": 5, "top_p": 0.8}], ids=["seeded", "greedy", "stop", "top"])
def test_a_prediction_is_the_in_thread_one(client, model_type, settings):
    here, there = both(client, f"/predict/{model_type}", {**PREDICT_REQUESTS[model_type], **settings}, model_type)
    assert here.status_code == there.status_code == 200, there.text
    key = "completions" if model_type == "transformer" else "captions"
    assert here.json()[key] == there.json()[key] and here.json()["usage"] == there.json()["usage"]


def test_a_request_of_more_prompts_than_slots_runs_by_itself_in_the_child(client):
    body = {"prompt": [f"prompt {i}" for i in range(6)], "max_new_tokens": 4, "seed": 5}  # (4 slots)
    here, there = both(client, "/predict/transformer", body)
    assert here.status_code == there.status_code == 200, there.text
    assert here.json()["completions"] == there.json()["completions"] and len(there.json()["completions"]) == 6


def test_a_stream_of_more_choices_than_slots_runs_by_itself_in_the_child_and_streams(client):
    """n=6 choices with 4 slots: the child runs the generation alone, and streams its text as it is made (each
    delta in a report at once), the in-thread stream's text."""
    def choices(model: str) -> dict[int, str]:
        texts: dict[int, list[str]] = {}
        body = {"model": model, "prompt": "a", "max_tokens": 12, "seed": 4, "n": 6, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200, reply.read()
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        texts.setdefault(choice["index"], []).append(choice["text"])
        return {i: "".join(t) for i, t in texts.items()}

    there = choices("transformer-there")
    assert there == choices("transformer-here") and len(there) == 6


def test_token_ids_beyond_64_bits_are_refused_before_they_queue(client):
    for where in ("here", "there"):
        body = {"prompt_token_ids": [[2**64]], "model": f"transformer-{where}"}
        reply = client.post("/predict/transformer", json=body)
        assert reply.status_code == 422 and reply.json()["error"]["field"] == "prompt_token_ids", reply.text


def test_concurrent_captions_of_large_images_each_caption_their_own(client):
    """Frames of 64 KiB or more cross to a policy's child through shared memory, reused by every call; a caption's
    generation is sent without waiting for a reply, so its images must travel in the message, or the next request's
    would overwrite them before the child reads them."""
    bodies = [{"images": [[png_data_url(10 + i, (160, 160))]], "prompt": ["what is this"], "max_new_tokens": 6,
               "seed": 20 + i, "temperature": 1.0} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: client.post("/predict/vlm", json={**b, "model": "vlm-there"}), bodies))
    alone = [client.post("/predict/vlm", json={**b, "model": "vlm-here"}) for b in bodies]
    assert [r.status_code for r in together] == [r.status_code for r in alone] == [200] * 6, together[0].text
    assert [r.json()["captions"] for r in together] == [r.json()["captions"] for r in alone]
    assert len({json.dumps(r.json()["captions"]) for r in alone}) > 1  # (the images differ, and so do the captions)


def test_a_refusal_made_in_the_child_keeps_its_field(client):
    """/predict's prompts are checked in the child (the request's generation is made there)."""
    context = client.get("/models/transformer-here").json()["io"]["max_seq_len"]
    body = {"prompt_token_ids": [[1] * (context - 2)], "max_new_tokens": 10, "seed": 1}  # (no room for 10)
    here, there = both(client, "/predict/transformer", body)
    assert here.status_code == there.status_code == 422, there.text
    assert here.json()["error"]["field"] == there.json()["error"]["field"] == "max_new_tokens"
    assert here.json()["error"]["message"] == there.json()["error"]["message"]


def test_concurrent_streams_each_get_the_text_they_get_alone(client):
    """Streams of different lengths, seeds and stop strings join and leave the child's batch as they come; each
    one's text and finish reason are its in-thread ones, asked alone."""
    bodies = [{"prompt": f"the cat {'sat ' * (i % 5)}on", "max_tokens": 6 + 5 * (i % 4), "seed": 40 + i,
               "temperature": 1.0, **({"stop": ["a"]} if i % 3 == 0 else {})} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda b: streamed(client, {**b, "model": "transformer-there"}), bodies))
    alone = [streamed(client, {**b, "model": "transformer-here"}) for b in bodies]
    assert together == alone
    sizes = client.get("/metrics").text
    assert 'vla_generation_sequences{deployment="transformer-there",state="running"} 0.0' in sizes


def test_a_client_that_leaves_mid_stream_leaves_the_deployment_serving(client):
    body = {"model": "transformer-there", "prompt": "a", "max_tokens": 60, "seed": 1, "stream": True,
            "temperature": 1.0}
    running = 'vla_generation_sequences{deployment="transformer-there",state="running"}'
    with client.stream("POST", "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    deadline = time.monotonic() + 10
    while f"{running} 0.0" not in client.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"{running} 0.0" in client.get("/metrics").text
    here, there = both(client, "/predict/transformer", PREDICT_REQUESTS["transformer"])
    assert there.status_code == 200 and there.json()["completions"] == here.json()["completions"]


@pytest.mark.parametrize("model_type", ["transformer", "vlm"])
def test_evaluations_run_in_the_child_as_in_the_thread(client, model_type):
    here, there = both(client, f"/evaluate/{model_type}", EVALUATE_REQUESTS[model_type], model_type)
    assert here.status_code == there.status_code == 200, there.text
    assert here.json()["loss"] == there.json()["loss"]


def test_a_cancelled_generation_is_dropped_by_the_child(tiny_checkpoints):
    """The server's side of the batcher cancels a generation (its client left): the child drops it at its next step,
    its text stops, and the batcher serves on."""
    from service.text_process import TextModelProcess
    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.sampling import SamplingParams

    checkpoint = tiny_checkpoints["transformer"]
    local = load_pipeline(checkpoint)
    prompt, short = [[3, 4, 5]], SamplingParams(3, 0.0)
    long = SamplingParams(local.model.max_seq_len - 4, 0.0)  # (the whole context: far longer than the test's steps)
    assert local.complete(None, prompt, sampling=long, seed=0).completions[0].finish_reason == "length"  # (no eos)
    process = TextModelProcess.start(local, {"path": checkpoint}, name="cancelling")
    try:
        batcher = process.continuous_batcher(4, None)
        deltas, outcomes, cancel = [], [], [False]
        generation = process.start_completion(None, prompt, sampling=long, seed=0, on_text=lambda *d: deltas.append(d))
        batcher.submit(generation, outcomes.append, cancelled=lambda: cancel[0])
        while not deltas:
            batcher.step()
        assert batcher.running_sequences == 1 and batcher.child_generations == 1
        cancel[0] = True
        batcher.step()  # (tells the child; nothing left to wait for here)
        assert not batcher.active and batcher.running_sequences == 0
        seen = len(deltas)
        batcher.submit(process.start_completion(None, prompt, sampling=short, seed=0), outcomes.append)
        while batcher.active:
            batcher.step()
        (result,) = outcomes  # the cancelled one never ends here
        assert result.completions[0].token_ids == local.complete(None, prompt, sampling=short, seed=0).completions[
            0].token_ids
        assert batcher.child_generations == 0 and len(deltas) == seen  # (the long one would still be running there)
    finally:
        process.close()


def test_a_row_that_ends_before_the_others_stops_counting_as_running(tiny_checkpoints):
    """A generation of two rows whose first one meets its stop string early: from the child's report of that step
    on, the server's side of the batcher counts one running sequence, as the local batcher does (the ended row's
    slot is free there); before, it counted both rows until the generation ended."""
    local, checkpoint = lone_parts(tiny_checkpoints)
    prompts, sampling = [[3, 4, 5], [6, 7]], SamplingParams(40, 0.0)
    free = local.complete(None, prompts, sampling=sampling, seed=0).completions
    first, second = free[0].text, free[1].text
    stop = next(first[i:i + 2] for i in range(1, len(first) - 1) if first[i:i + 2] not in second)
    ended, long = local.complete(None, prompts, sampling=sampling, seed=0, stop=[stop]).completions
    assert ended.finish_reason == "stop" and len(ended.token_ids) + 2 < len(long.token_ids)
    process = TextModelProcess.start(local, {"path": checkpoint}, name="rows-ending")
    try:
        batcher = process.continuous_batcher(4, None)
        outcomes, counts = [], []
        generation = process.start_completion(None, prompts, sampling=sampling, seed=0, stop=[stop])
        batcher.submit(generation, outcomes.append)
        while batcher.active:
            batcher.step()
            if not outcomes:  # (while the generation runs)
                counts.append(batcher.running_sequences)
        # both rows, then the second alone for its last steps (a step here may take several of the child's reports)
        assert counts == sorted(counts, reverse=True) and max(counts) == 2 and 1 in counts, counts
        assert [c.token_ids for c in outcomes[0].completions] == [ended.token_ids, long.token_ids]
    finally:
        process.close()


def test_a_generation_running_by_itself_in_the_child_counts_its_rows_as_running(tiny_checkpoints):
    """Two rows on one slot: the child runs the generation by itself, and while it streams the server's side of the
    batcher counts both rows as running, as the local batcher does (before, none: they held no slot)."""
    local, checkpoint = lone_parts(tiny_checkpoints)
    process = TextModelProcess.start(local, {"path": checkpoint}, name="counted")
    try:
        batcher = process.continuous_batcher(1, None)
        running, outcomes = set(), []
        generation = process.start_completion(None, [[3, 4, 5], [6, 7, 8]], sampling=SamplingParams(6, 0.0), seed=0,
                                              on_text=lambda *delta: running.add(batcher.running_sequences))
        batcher.submit(generation, outcomes.append)
        while batcher.active:
            batcher.step()
        assert running == {2} and batcher.running_sequences == 0 and len(outcomes[0].completions) == 2
    finally:
        process.close()


class Gone(Exception):
    pass


def leaves(*delta):  # a stream whose client has gone at its first delta
    raise Gone()


def lone_parts(tiny_checkpoints):
    """The tiny transformer's checkpoint and its pipeline here (what a child's generations are compared with)."""
    from vla_foundry.pipelines import load_pipeline

    checkpoint = tiny_checkpoints["transformer"]
    return load_pipeline(checkpoint), checkpoint


def test_a_stream_running_by_itself_in_the_child_stops_when_its_client_leaves(tiny_checkpoints):
    """A generation of more rows than slots runs by itself inside the child's ``submit``, where the child's loop
    reads no message: it still hears the server's cancel after each delta it reports, and stops as a stream
    in-thread stops when its client leaves (before, it ran to its length, holding up every other stream)."""
    local, checkpoint = lone_parts(tiny_checkpoints)
    prompts, long = [[3, 4, 5], [6, 7, 8]], SamplingParams(local.model.max_seq_len - 8, 0.0)
    process = TextModelProcess.start(local, {"path": checkpoint}, name="alone")
    try:
        batcher = process.continuous_batcher(1, None)  # two rows, one slot: it runs by itself
        reported, take = [0], batcher.take

        def counting(report):
            reported[0] += len(report["deltas"])
            take(report)

        batcher.take = counting
        outcomes = []
        batcher.submit(process.start_completion(None, prompts, sampling=long, seed=0, on_text=leaves), outcomes.append)
        while batcher.active:
            batcher.step()
        assert len(outcomes) == 1 and isinstance(outcomes[0], Gone)
        short = SamplingParams(3, 0.0)
        batcher.submit(process.start_completion(None, [[3, 4, 5]], sampling=short, seed=0), outcomes.append)
        while batcher.active:  # (the child's reports of the one that left come in before this one's)
            batcher.step()
        assert outcomes[1].completions[0].token_ids == local.complete(None, [[3, 4, 5]], sampling=short,
                                                                      seed=0).completions[0].token_ids
        # Stopped long before its length (2 rows × max_new_tokens deltas): the child goes on decoding until the
        # server's cancel arrives, a few steps on an idle machine, more on a loaded one.
        assert reported[0] < long.max_new_tokens, \
            f"the child sent {reported[0]} deltas for a stream whose client left at its first"
    finally:
        process.close()


def test_a_stream_running_by_itself_hears_its_cancel_behind_other_requests(tiny_checkpoints):
    """As above, with other requests' submits reaching the child after the lone generation began: the child reads
    past them (they wait their turn) to the cancels. A waiting request whose client has gone too leaves before it
    starts (it streams nothing), and the one still wanted then gets its solo tokens. Before, the first submit read
    stopped the reading: the cancel was heard only when the lone generation had run its whole length."""
    local, checkpoint = lone_parts(tiny_checkpoints)
    long, short = SamplingParams(local.model.max_seq_len - 8, 0.0), SamplingParams(3, 0.0)
    process = TextModelProcess.start(local, {"path": checkpoint}, name="behind")
    try:
        batcher = process.continuous_batcher(1, None)  # two rows, one slot: the first runs by itself
        streamed, take = collections.Counter(), batcher.take

        def counting(report):
            streamed.update(delta[0] for delta in report["deltas"])  # (deltas per generation)
            take(report)

        batcher.take = counting
        outcomes = []
        batcher.submit(process.start_completion(None, [[3, 4, 5], [6, 7, 8]], sampling=long, seed=0, on_text=leaves),
                       outcomes.append)
        batcher.submit(process.start_completion(None, [[9, 10]], sampling=long, seed=0, on_text=lambda *d: None),
                       outcomes.append, cancelled=lambda: True)  # (its client has gone before it starts)
        batcher.submit(process.start_completion(None, [[3, 4, 5]], sampling=short, seed=0), outcomes.append)
        while batcher.active:
            batcher.step()
        assert len(outcomes) == 2 and isinstance(outcomes[0], Gone)
        assert outcomes[1].completions[0].token_ids == local.complete(None, [[3, 4, 5]], sampling=short,
                                                                      seed=0).completions[0].token_ids
        assert len(streamed) == 1, f"deltas of {len(streamed)} generations: {streamed}"  # (the lone one's only)
        assert sum(streamed.values()) < long.max_new_tokens, \
            f"the child sent {streamed} deltas for a stream that left at its first"  # (of 2 × max_new_tokens)
    finally:
        process.close()


def test_the_openai_client_streams_from_a_model_process_and_a_killed_child_is_restarted(tiny_checkpoints, tmp_path):
    """Through the real CLI and the official ``openai`` client: a stream from the child's batcher has the text of
    the same request unstreamed; the child is killed, restarted with its batcher, and streams the same again."""
    env = {"VLA_MODEL_PROCESS": "true", "VLA_CONTINUOUS_BATCHING": "true"}
    serve = ["--checkpoint", f"{tiny_checkpoints['transformer']}=text"]
    with live_server_process(serve, tmp_path / "demo", env=env) as (base, server):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        ask = dict(model="text", prompt="the robot", max_tokens=24, seed=11, temperature=1.0)

        def stream() -> str:
            return "".join(chunk.choices[0].text for chunk in client.completions.create(**ask, stream=True))

        whole = client.completions.create(**ask).choices[0].text
        assert stream() == whole and whole
        child = httpx.get(f"{base}/models/text").json()["model_process"]["pid"]
        assert parent_of(child) == server.pid
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/models/text").json()["status"] == "ready" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{base}/models/text").json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as refused:  # (503 while the new child loads)
            client.completions.create(**ask)
        assert refused.value.status_code == 503
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/models/text").json()["status"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
        info = httpx.get(f"{base}/models/text").json()
        assert info["model_process"]["restarts"] == 1 and info["model_process"]["pid"] != child
        assert info["batching"]["generation"] == "continuous" and wait_gone(child)
        assert stream() == whole
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_a_send_that_finds_the_socket_full_takes_the_childs_reports_meanwhile():
    """Both sides can have a lot to say at once: the child step reports it sends while it does not read (it reads
    between steps), and the server a large message (a caption's images) while it waits for no report. A send that
    only wrote would wait for a child that waits for it to read; ``_send`` takes the reports while it waits. Here a
    stand-in child sends 4 MB of reports before it reads anything, and the server sends it 4 MB."""
    import socket
    import threading

    import numpy as np

    from service.model_process import Channel
    from service.text_process import TextModelProcess

    ours, theirs = socket.socketpair()
    child = Channel(theirs)
    reports, received = [], []

    def stand_in_child() -> None:
        for i in range(64):
            child.send(("step", {"n": i, "padding": b"x" * 65536}), answered=False)
        received.append(child.recv())

    class Batcher:
        def take(self, report: dict) -> None:
            reports.append(report["n"])

    process = object.__new__(TextModelProcess)  # (the channel alone: no child process behind it)
    process._conn, process._batcher = Channel(ours), Batcher()
    big = np.arange(1 << 20, dtype=np.int32)  # 4 MB, far more than a socket holds
    threads = [threading.Thread(target=stand_in_child, daemon=True), threading.Thread(
        target=process._send, args=(("submit", (1, "start_caption", ([big],), {}, False), {}),),
        kwargs={"answered": False}, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)  # (a send that only wrote: both would still wait)
    assert reports == list(range(len(reports))) and len(reports) >= 1
    (operation, args, _), = received
    assert operation == "submit" and np.array_equal(args[2][0][0], big)
    ours.close()
    theirs.close()


def test_closing_a_child_that_takes_nothing_ends_within_the_close_timeout():
    """``close`` is bounded as a whole, its message included: here the socket towards a stand-in child is full and
    the child only sends step reports (as one running a generation by itself does), so the close message never goes
    out whole; ``close`` still returns within ``CLOSE_TIMEOUT_S`` and kills the child."""
    import socket
    import subprocess
    import threading

    from service.model_process import CLOSE_TIMEOUT_S, Channel
    from service.text_process import TextModelProcess

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:  # what the server wrote before and the busy child has not read: the socket towards it is full
        while True:
            ours.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    ours.setblocking(True)
    child, stop = Channel(theirs), threading.Event()

    def reporting_child() -> None:
        try:
            while not stop.is_set():
                child.send(("step", {"deltas": [], "done": [], "started": [], "held": 1, "expected_wait_s": 0.0}),
                           answered=False)
        except OSError:
            pass

    class Local:
        def close(self) -> None:
            pass

    threading.Thread(target=reporting_child, daemon=True).start()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the child's process
    process = object.__new__(TextModelProcess)  # (the channel and a process: nothing loaded behind them)
    process._conn, process._process, process._lock, process._local = Channel(ours), stand_in, threading.Lock(), Local()
    process._closing, process._starting, process._batcher, process._close_once = False, None, None, threading.Lock()
    closing = threading.Thread(target=process.close, daemon=True)
    started = time.monotonic()
    closing.start()
    closing.join(CLOSE_TIMEOUT_S + 5)
    try:
        assert not closing.is_alive(), "close() still waits for a child that takes nothing"
        assert time.monotonic() - started < CLOSE_TIMEOUT_S + 2 and stand_in.poll() is not None  # (killed)
    finally:
        stop.set()
        stand_in.kill()
        theirs.close()


def test_a_model_that_cannot_join_a_running_batch_runs_on_its_thread(tiny_checkpoints, monkeypatch):
    """A model process streams only from a continuous batcher: a text model without slots is served on its thread
    (from the copy already loaded, on the CPU), one request's generation at a time."""
    from vla_foundry.pipelines.text import TextPipeline

    monkeypatch.setattr(TextPipeline, "decodes_continuously", property(lambda self: False))
    spec = DeploymentSpec(name="t", checkpoint=str(tiny_checkpoints["transformer"]), model_process=True)
    with serving(spec, continuous_batching=True) as c:
        info = c.get("/models/t").json()
        assert info["status"] == "ready" and info["model_process"] is None
        assert info["batching"]["generation"] == "per_request"
        reply = c.post("/predict/transformer", json={**PREDICT_REQUESTS["transformer"], "model": "t"})
        assert reply.status_code == 200 and len(reply.json()["completions"]) == 2


class RecordingConn:
    """What the child's engine sends to the server, recorded; ``fail`` makes every send find the server gone."""

    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    def send(self, message) -> None:
        if self.fail:
            raise BrokenPipeError("the server has gone")
        self.sent.append(message)


def test_the_child_reports_each_admissions_first_tokens_at_once_and_stops_when_the_server_is_gone(tiny_checkpoints):
    """A step that admits three generations sends three reports (each with its generation marked started, in order)
    before the step's own report; a report that finds the server gone ends the step with that OSError, not with a
    logged "decode step failed" that fails every generation."""
    import torch

    from service.text_process import GenerationEngine
    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.sampling import SamplingParams

    pipeline = load_pipeline(tiny_checkpoints["transformer"])
    greedy = {"sampling": SamplingParams(max_new_tokens=4, temperature=0.0), "seed": 0}
    engine = GenerationEngine(pipeline, RecordingConn(), torch.device("cpu"))
    engine.make_batcher(4, None, None)
    for key in range(3):
        engine.submit(key, "start_completion", (None, [[5 + key, 9, 12]]), dict(greedy), streams=True)
    engine.step()
    reports = [report for kind, report in engine.conn.sent if kind == "step"]
    assert [report["started"] for report in reports] == [[0], [1], [2], []]

    gone = GenerationEngine(pipeline, RecordingConn(fail=True), torch.device("cpu"))
    gone.make_batcher(4, None, None)
    gone.submit(0, "start_completion", (None, [[5, 9, 12]]), dict(greedy), streams=True)
    with pytest.raises(OSError):
        gone.step()
    assert not gone._done  # nothing was failed as if the batcher had broken


def test_a_stream_whose_child_dies_ends_with_the_503_that_names_it(tiny_checkpoints):
    """The model process dies mid-stream: the stream's in-band error is the 503 every other request it ran gets
    (naming the signal; ``unavailable``, to retry), not a generic internal error with a traceback logged."""
    spec = DeploymentSpec(name="there", checkpoint=str(tiny_checkpoints["transformer"]), model_process=True)
    with serving(spec, max_batch_size=4, continuous_batching=True, max_new_tokens=64) as client:
        pid = client.get("/models/there").json()["model_process"]["pid"]
        lines, killed = [], False
        with client.stream("POST", "/v1/completions", json={"model": "there", "prompt": "the", "max_tokens": 60,
                                                            "seed": 1, "stream": True, "n": 2}) as reply:
            for line in reply.iter_lines():
                if line:
                    lines.append(line)
                if not killed and line.startswith("data: {"):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
    errors = [json.loads(line.removeprefix("data: "))["error"] for line in lines if line.startswith('data: {"error"')]
    assert errors and lines[-1] == "data: [DONE]", lines[-3:]
    assert errors[0]["type"] == "unavailable" and "killed by signal 9" in errors[0]["message"], errors[0]


def test_the_expected_wait_counts_the_generations_sent_since_the_childs_last_report():
    """Admission reads the child's slots from its last step report. Generations sent to it since were not counted:
    a burst between two reports found the free slots of the report each time and was admitted whole (40 of 40
    requests with a deadline admitted, against 30-35 in-thread). They now count as waiting ahead, as a local
    batcher counts each from its submit."""
    from service.text_process import RemoteBatcher, RemoteGeneration
    from vla_foundry.continuous import SlotOutlook

    class Child:  # (what the batcher sends: nothing answers here)
        def send_to_engine(self, *message):
            pass

    batcher = RemoteBatcher(Child(), {"num_slots": 2, "cache_bytes": 0, "decode_mode": "eager", "prefill_tokens": 8})
    batcher.submit(RemoteGeneration("complete", (), {}, ids=[[1]]), lambda outcome: None)  # (key 0)
    # The child holds it (decoding, 10 steps left at most) and has one slot free, steps of 10 ms.
    batcher.take({"outlook": SlotOutlook(short=-1, ends=((10, 1),), step_seconds=0.01, num_slots=2), "held": 1,
                  "started": [0], "decoding": {0: 1}, "deltas": [], "done": []})
    assert batcher.expected_wait_s(1) == 0.0  # the free slot
    batcher.submit(RemoteGeneration("complete", (), {}, ids=[[1]]), lambda outcome: None)  # takes it, unreported
    assert batcher.expected_wait_s(1) == pytest.approx(0.1)  # until the running one could end
    assert batcher.expected_wait_s(3) == 0.0  # (more rows than slots: it runs by itself at once)
    batcher.take({"outlook": SlotOutlook(short=0, ends=((9, 1), (10, 1)), step_seconds=0.01, num_slots=2),
                  "held": 2, "started": [1], "decoding": {0: 1, 1: 1}, "deltas": [], "done": []})
    assert batcher.expected_wait_s(1) == pytest.approx(0.09)  # now in the report: counted once, not twice
