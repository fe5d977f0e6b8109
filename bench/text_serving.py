"""Text serving under concurrent OpenAI clients: continuous batching on vs off, side by side in one run.

    .venv/bin/python bench/text_serving.py [--concurrency 1,8,32] [--seconds 5] [--rounds 3] [--warmup 2]
                                           [--checkpoint DIR] [--servers on,eager,process,off]
                                           [--device auto|cpu|cuda] [--random-model LAYERSxWIDTH]
                                           [--max-batch-size 32] [--torch-threads N]

N clients (threads of this process, each the official ``openai`` client with its own connection) stream
``/v1/completions`` back to back from one text deployment (default: the demo pack's transformer, 4 layers
of width 128, context 256), with mixed prompt lengths (3 to 40 words) and completion lengths (16 to 128
tokens), sampled at temperature 1 with a seed per request: both servers get the same requests and,
since batching keeps every request's tokens, make the same tokens. Servers side by side, all alive at once,
all with ``VLA_MAX_BATCH_SIZE=32``: continuous batching on (``VLA_CONTINUOUS_BATCHING=true``, decode steps
from graphs as served by default: one TorchScript trace on the CPU), optionally on with eager decode
steps (``--servers on,eager,off``), optionally on with the model in a process of its own (``process``:
``VLA_MODEL_PROCESS=true``, ``service/text_process.py``), and off (one request's generation at a time).
Every row runs once, untimed, first (a warm-up pass); then the rows run in --rounds rounds; in each, every
concurrency in turn, and at each concurrency every server in turn (both orders alternating from round to round), so
that a host whose speed drifts (a shared VM's moves by a third within minutes) slows the rows being
compared alike. Per server and concurrency, over the requests that end
inside the measured windows of every round: completion tokens/s (from each stream's usage; the median of the
rounds), time to first token (first streamed text) p50/p99, and inter-token latency (gaps between streamed
chunks; a chunk holds one token's text unless text was held back for a stop string or an unfinished
character, or the stream fell behind its generation: then the tokens that waited go out as one chunk) p50/p99,
all rounds' requests pooled; and the mean time to first token as the client saw it (the requests whose
first text came inside a window) beside the server's own (``vla_time_to_first_token_seconds``, read when
each window opens and closes: from the request's arrival at the metrics middleware to its first token ready
to send), which tells the server's share of it from the client's and the wire's (roughly: the server counts
a first token that holds no text yet, the client waits for text). A ratio between two rows (8
clients ÷ 1, on ÷ off) is the median of the rounds' ratios, each between rows measured seconds apart.

Goals (issue 18, 2-core CPU): tokens/s at concurrency 8 ≥ 3× concurrency 1, and time to first token
p99 at concurrency 8 ≤ 2× (one prefill of the longest prompt + one decode step of 8 sequences), both
measured here with the deployment's own batcher in this process once the servers have stopped. On a GPU
(``--device cuda --random-model 24x2048``: a random-weight 24-layer width-2048 model in bfloat16, what
``make gpu-check`` runs): tokens/s at concurrency 32 ≥ 10× concurrency 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_support import build_text_model, free_port, server_process  # noqa: E402
from service.cli import serve_command  # noqa: E402
from service.gc_pauses import freeze_long_lived  # noqa: E402

WORDS = ("the robot moves red blue cube to left right of table slowly then picks up a small cup and places it "
         "near green box").split()
GOAL_SCALING, GOAL_TTFT, GOAL_GPU_SCALING = 3.0, 2.0, 10.0
SERVERS = {"on": "continuous batching on", "eager": "continuous batching on, eager steps",
           "process": "continuous batching on, model process", "off": "continuous batching off"}


def text_checkpoint(name: str = "demo-transformer") -> Path:
    """A text experiment directory; a demo pack member's name (``demo-transformer``, ``demo-transformer_hf``) is
    built on first use, as the server builds the pack."""
    from vla_foundry.demo import ensure_demo_pack
    from vla_foundry.demo_paths import DEFAULT_DEMO_DIR

    if Path(name).is_dir() or not name.startswith("demo-"):
        return Path(name)
    return ensure_demo_pack(DEFAULT_DEMO_DIR, members=[name]) / name


def request_for(client_index: int, i: int, max_tokens_cap: int = 128) -> dict:
    """The i-th request of a client: the same in every row and on both servers (completions of 16 to 128 tokens,
    at most ``max_tokens_cap`` for a model with a short context)."""
    rng = np.random.default_rng(client_index * 100_003 + i)
    prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 41))))
    return {"prompt": prompt, "max_tokens": min(int(rng.integers(16, 129)), max_tokens_cap),
            "seed": int(rng.integers(0, 2**31)), "temperature": 1.0}


@dataclass
class Log:
    ttft: list = field(default_factory=list)
    window_ttft: list = field(default_factory=list)  # requests whose first text came inside the window
    itl: list = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    first_error: str = ""


def client_loop(base: str, index: int, start: float, end: float, log: Log, max_tokens_cap: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    i = 0
    while time.perf_counter() < end:
        body = request_for(index, i, max_tokens_cap)
        i += 1
        sent = time.perf_counter()
        arrivals, usage = [], None
        try:
            stream = client.completions.create(model="text", stream=True, stream_options={"include_usage": True},
                                               **body)
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if any(c.text for c in chunk.choices):
                    arrivals.append(time.perf_counter())
        except Exception as e:  # counted, and the client goes on
            log.errors += 1
            log.first_error = log.first_error or f"{type(e).__name__}: {e}"[:200]
            time.sleep(0.1)
            continue
        done = time.perf_counter()
        if arrivals and start <= arrivals[0] <= end:  # the population the server's own figure covers
            log.window_ttft.append(arrivals[0] - sent)
        if not start <= done <= end:  # requests that end inside the window count (their tokens, their latencies)
            continue
        if arrivals:
            log.ttft.append(arrivals[0] - sent)
            log.itl.extend(np.diff(arrivals).tolist())
        log.tokens += usage.completion_tokens if usage is not None else 0
    client.close()


@dataclass
class Row:
    server: str
    concurrency: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    errors: int
    first_error: str
    server_ttft_mean: float = float("nan")  # ms, from the server's vla_time_to_first_token_seconds


def scrape_into(into: dict, name: str, base: str) -> None:
    """``server_first_tokens`` into ``into[name]`` (None when the scrape failed: that row has no server figure)."""
    try:
        into[name] = server_first_tokens(base)
    except Exception as e:  # a bench row is not lost to one failed scrape
        print(f"  (reading {base}/metrics failed: {e})", flush=True)
        into[name] = None


def server_first_tokens(base: str) -> tuple[float, float]:
    """(count, sum in seconds) of the server's vla_time_to_first_token_seconds, every deployment."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        if family.name == "vla_time_to_first_token_seconds":
            for sample in family.samples:
                count += sample.value if sample.name.endswith("_count") else 0.0
                total += sample.value if sample.name.endswith("_sum") else 0.0
    return count, total


def percentile_ms(values: list, q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def max_tokens_cap(base: str) -> int:
    """What a request may ask for on this server's model: room left for the longest prompt (up to about 80 tokens)."""
    import httpx

    io = httpx.get(f"{base}/models", timeout=30).json()["deployments"][0]["io"]
    return max(8, min(128, io["max_seq_len"] - 96))


def run_clients(base: str, concurrency: int, warmup: float, seconds: float) -> list[Log]:
    """``concurrency`` clients for ``warmup`` + ``seconds``: each client's log of the measured window."""
    start = time.perf_counter() + warmup
    end = start + seconds
    logs = [Log() for _ in range(concurrency)]
    cap = max_tokens_cap(base)
    threads = [threading.Thread(target=client_loop, args=(base, i, start, end, logs[i], cap), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup + seconds + 180)
    return logs


def run_clients_scraped(base: str, concurrency: int, warmup: float,
                        seconds: float) -> tuple[list[Log], Optional[tuple[float, float]]]:
    """``run_clients``, and the server's first tokens (count, sum in seconds) between the measured window's opening
    and its close, read from its /metrics then (None when a read failed)."""
    scrapes: dict[str, Optional[tuple[float, float]]] = {}
    timers = [threading.Timer(at, scrape_into, (scrapes, name, base))
              for name, at in (("start", warmup), ("end", warmup + seconds))]
    for timer in timers:
        timer.start()
    try:
        logs = run_clients(base, concurrency, warmup, seconds)
    finally:
        for timer in timers:
            timer.cancel()
            timer.join()
    start, end = scrapes.get("start"), scrapes.get("end")
    return logs, (end[0] - start[0], end[1] - start[1]) if start and end else None


def row_of(server: str, concurrency: int, rounds: list[list[Log]], seconds: float) -> Row:
    """One table row from the logs of every round (``seconds`` measured each): the median of the rounds' tokens/s,
    latencies over every round's requests."""
    logs = [log for round_logs in rounds for log in round_logs]
    ttft = [x for log in logs for x in log.ttft]
    itl = [x for log in logs for x in log.itl]
    tokens_per_s = statistics.median(sum(log.tokens for log in round_logs) / seconds for round_logs in rounds)
    return Row(server, concurrency, tokens_per_s, percentile_ms(ttft, 50), percentile_ms(ttft, 99),
               percentile_ms(itl, 50), percentile_ms(itl, 99), sum(log.errors for log in logs),
               next((log.first_error for log in logs if log.first_error), ""))


def compute_floor(checkpoint: Path, sequences: int, device: str) -> tuple[float, float]:
    """(ms of one prefill of the longest prompt, ms of one decode step of ``sequences`` sequences), with the
    deployment's own batcher in this process: a first step admits (prefills) them all and decodes once, the
    next steps only decode (medians of repeated runs)."""
    from vla_foundry.pipelines import load_pipeline
    from vla_foundry.sampling import SamplingParams

    pipeline = load_pipeline(checkpoint, device=device, dtype="auto")  # the dtype the servers pick
    batcher = pipeline.continuous_batcher(sequences, prefill_tokens=10**6)  # all prefills in the first step
    batcher.warmup()  # decode steps traced (CPU) or captured (CUDA) first, as the server does at load
    longest = " ".join(WORDS[i % len(WORDS)] for i in range(40))
    first, steps = [], []
    for _ in range(5):
        for i in range(sequences):
            batcher.submit(pipeline.start_completion([longest], sampling=SamplingParams(max_new_tokens=32), seed=i),
                           lambda outcome: None)
        t = time.perf_counter()
        batcher.step()
        first.append(time.perf_counter() - t)
        assert batcher.running_sequences == sequences, "the prompts did not fit one step's prefill budget"
        for _ in range(8):
            t = time.perf_counter()
            batcher.step()
            steps.append(time.perf_counter() - t)
        batcher.fail_all(RuntimeError("measured"))
    step = statistics.median(steps)
    return (statistics.median(first) - step) / sequences * 1000, step * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a text experiment directory, or a demo pack member by name (default: "
                        "demo-transformer; demo-transformer_hf is the tiny Llama)")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row, interleaved (see above)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per row before measuring")
    parser.add_argument("--max-batch-size", type=int, default=32, help="VLA_MAX_BATCH_SIZE of both servers")
    parser.add_argument("--servers", default="on,off", help="which servers, comma-separated, in this order: on "
                        "(continuous batching, decode steps from graphs as served by default), eager (continuous "
                        "batching, eager decode steps: VLA_TRACED_SAMPLING=false VLA_CUDA_GRAPHS=false), process "
                        "(continuous batching, the model in a process of its own: VLA_MODEL_PROCESS=true), off")
    parser.add_argument("--torch-threads", default=None,
                        help="VLA_TORCH_THREADS of the servers (default: theirs, auto: the usable CPUs less one)")
    parser.add_argument("--device", default="auto", help="the servers' VLA_DEVICE: auto | cpu | cuda | cuda:N")
    parser.add_argument("--random-model", metavar="LAYERSxWIDTH", help="instead of --checkpoint: a random-weight "
                        "transformer of that shape in bfloat16, built on --device (24x2048 for the GPU goal)")
    args = parser.parse_args()
    freeze_long_lived()  # the clients' own collections skip the imports' objects (service/gc_pauses.py)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    from vla_foundry.devices import resolve_device

    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory(prefix="text-serving-") as scratch:
        if args.random_model:
            try:
                layers, width = (int(n) for n in args.random_model.lower().split("x"))
            except ValueError:
                parser.error(f"--random-model: {args.random_model!r} is not LAYERSxWIDTH, e.g. 24x2048")
            checkpoint = build_text_model(Path(scratch) / f"random-{layers}x{width}", layers, width, device)
        else:
            checkpoint = text_checkpoint(args.checkpoint or "demo-transformer")
        run(args, parser, checkpoint, device)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, checkpoint: Path, device: str) -> None:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = args.servers.split(",")
    for mode in modes:
        if mode not in SERVERS:
            parser.error(f"--servers: {mode!r} is not one of {', '.join(SERVERS)}")
    rounds: dict[tuple[str, int], list[list[Log]]] = {(SERVERS[m], c): [] for m in modes for c in concurrency}
    first_tokens: dict[tuple[str, int], list[float]] = {key: [0.0, 0.0] for key in rounds}  # server: count, sum
    with contextlib.ExitStack() as servers:
        bases = {}
        for mode in modes:
            port = free_port()
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_DEVICE": device,
                   "VLA_MAX_BATCH_SIZE": str(args.max_batch_size),
                   "VLA_CONTINUOUS_BATCHING": "false" if mode == "off" else "true",
                   **({"VLA_TORCH_THREADS": args.torch_threads} if args.torch_threads else {}),
                   **({"VLA_TRACED_SAMPLING": "false", "VLA_CUDA_GRAPHS": "false"} if mode == "eager" else {}),
                   **({"VLA_MODEL_PROCESS": "true"} if mode == "process" else {})}
            command = serve_command() + ["serve", "--checkpoint", f"{checkpoint}=text", "--host", "127.0.0.1",
                                         "--port", str(port)]
            bases[SERVERS[mode]] = servers.enter_context(server_process(command, env, port, "/health/ready",
                                                                        SERVERS[mode]))
        # Every row once, untimed, before the rounds: on an H200 the first measured row still ran cold after its
        # own warm-up (one client at 4 tokens/s, 730 ms to its first token, where later rounds gave 49-70).
        print("warm-up pass: every row once, untimed", flush=True)
        for c in concurrency:
            for base in bases.values():
                run_clients(base, c, args.warmup, 0.0)
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            # Servers and concurrencies both in alternating order: a drift within a round favours neither side of
            # a ratio in every round.
            order = list(bases) if r % 2 == 0 else list(bases)[::-1]
            for c in (concurrency if r % 2 == 0 else concurrency[::-1]):
                for server in order:
                    logs, window = run_clients_scraped(bases[server], c, args.warmup, args.seconds)
                    rounds[(server, c)].append(logs)
                    if window is not None:
                        first_tokens[(server, c)][0] += window[0]
                        first_tokens[(server, c)][1] += window[1]
                    row = row_of(server, c, [logs], args.seconds)
                    print(f"  {server}, {c} clients: {row.tokens_per_s:.0f} tokens/s, TTFT p50 {row.ttft_p50:.1f} "
                          f"ms p99 {row.ttft_p99:.1f} ms, {row.errors} errors {row.first_error}", flush=True)
    rows = {key: row_of(*key, logs, args.seconds) for key, logs in rounds.items()}
    for key, (count, total) in first_tokens.items():
        rows[key].server_ttft_mean = total / count * 1000 if count else float("nan")

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> Optional[tuple[float, list[float]]]:
        """Row a's tokens/s ÷ row b's: the median of the rounds' ratios, and each round's."""
        if a not in rounds or b not in rounds:
            return None
        each = [sum(x.tokens for x in la) / sum(y.tokens for y in lb)
                for la, lb in zip(rounds[a], rounds[b]) if sum(y.tokens for y in lb)]  # (a round of b's made none)
        return (statistics.median(each), each) if each else None

    def said(found: tuple[float, list[float]]) -> str:
        return f"{found[0]:.2f}× (rounds: {', '.join(f'{x:.2f}' for x in found[1])})"

    if device == "cpu":  # the floor with the servers' torch threads (VLA_TORCH_THREADS: auto unless given)
        import torch

        from service.torch_threads import choose_torch_threads

        threads = choose_torch_threads(args.torch_threads or "auto")[0]
        if threads is not None:
            torch.set_num_threads(threads)
    prefill_ms, step_ms = compute_floor(checkpoint, 8, device)
    print(f"\n## text serving: {checkpoint.name} on {device}, {args.rounds} rounds of {args.seconds:g} s per row, "
          "streaming /v1/completions\n")
    print("| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms | "
          "TTFT mean ms: client, server | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        ttft = [x for logs in rounds[(r.server, r.concurrency)] for log in logs for x in log.window_ttft]
        client_mean = statistics.fmean(ttft) * 1000 if ttft else float("nan")
        print(f"| {r.server} | {r.concurrency} | {r.tokens_per_s:.0f} | {r.ttft_p50:.1f} | {r.ttft_p99:.1f} | "
              f"{r.itl_p50:.1f} | {r.itl_p99:.1f} | {client_mean:.1f}, {r.server_ttft_mean:.1f} | {r.errors} |")
    on, off, eager = SERVERS["on"], SERVERS["off"], SERVERS["eager"]
    print(f"\none prefill of the longest prompt: {prefill_ms:.2f} ms; one decode step of 8 sequences: {step_ms:.2f} ms")
    scaling, one, eight = ratio((on, 8), (on, 1)), rows.get((on, 1)), rows.get((on, 8))
    if scaling and one and eight:
        floor = prefill_ms + step_ms
        print(f"- tokens/s at 8 clients ÷ 1 client: {said(scaling)} (goal ≥ {GOAL_SCALING:g}×) — "
              f"{'met' if scaling[0] >= GOAL_SCALING else 'not met'}")
        print(f"- TTFT p50 of one client alone: {one.ttft_p50:.1f} ms = {one.ttft_p50 / floor:.2f}× that floor (what a "
              "request costs over HTTP beyond its model work)")
        print(f"- TTFT p99 at 8 clients: {eight.ttft_p99:.1f} ms = {eight.ttft_p99 / floor:.2f}× (prefill + one decode "
              f"step of 8 = {floor:.2f} ms; goal ≤ {GOAL_TTFT:g}×) — "
              f"{'met' if eight.ttft_p99 <= GOAL_TTFT * floor else 'not met'}")
    gpu_scaling = ratio((on, 32), (on, 1))
    if gpu_scaling and device.startswith("cuda"):
        print(f"- GPU: tokens/s at 32 clients ÷ 1 client: {said(gpu_scaling)} (goal ≥ {GOAL_GPU_SCALING:g}×) — "
              f"{'met' if gpu_scaling[0] >= GOAL_GPU_SCALING else 'not met'}")
    for c in concurrency:
        if found := ratio((on, c), (off, c)):
            print(f"- tokens/s at {c} clients, on ÷ off: {said(found)}")
        if found := ratio((on, c), (eager, c)):
            print(f"- tokens/s at {c} clients, steps from graphs ÷ eager steps: {said(found)}")
    if found := ratio((eager, 8), (eager, 1)):
        print(f"- with eager decode steps: 8 clients ÷ 1 client {said(found)}")
    process = SERVERS["process"]
    if (found := ratio((process, 8), (process, 1))) and (eight := rows.get((process, 8))):
        floor = prefill_ms + step_ms
        print(f"- with the model process: 8 clients ÷ 1 client {said(found)} (goal ≥ {GOAL_SCALING:g}×) — "
              f"{'met' if found[0] >= GOAL_SCALING else 'not met'}; TTFT p99 at 8 clients {eight.ttft_p99:.1f} ms = "
              f"{eight.ttft_p99 / floor:.2f}× the floor (goal ≤ {GOAL_TTFT:g}×)")
    for c in concurrency:
        if found := ratio((process, c), (on, c)):
            print(f"- tokens/s at {c} clients, model process ÷ in-thread: {said(found)}")

if __name__ == "__main__":
    main()
