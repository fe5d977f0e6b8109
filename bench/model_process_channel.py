"""What a batch of robot requests costs to cross to a model process and back: `Channel` vs multiprocessing.

    python bench/model_process_channel.py [--rounds 6] [--calls 10]

`service/model_process.py` sends each batch's `PolicyRequest`s to the child through a `Channel` (a local
socket; pickle protocol 5 with the frames out of band). This times a round trip (the requests there, a
small acknowledgement back) for three batches, `Channel` against multiprocessing's `Connection` (the
frames pickled in band) over the same kind of socket, both echo processes alive at once and the calls
interleaved in rounds: 16 robots with three 224 px cameras, one robot with one 224 px camera, one robot
with the demo policy's 32 px camera. Printed: the median round trip of each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time

import numpy as np
from multiprocessing.connection import Connection

from service.model_process import Channel
from vla_foundry.pipelines.action import PolicyRequest
from vla_foundry.robotics.observations import RawObservation


def echo(channel) -> None:
    """The other process: answer each message with its length until the channel closes."""
    while True:
        try:
            message = channel.recv()
        except (EOFError, OSError):
            return
        channel.send(len(message))


def batch(robots: int, size: int, cameras: int, rng: np.random.Generator) -> list[PolicyRequest]:
    return [PolicyRequest(RawObservation({f"cam{k}_t0": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                                          for k in range(cameras)},
                                         {"state": np.zeros((2, 7), np.float32)}, "pick up the block"), seed=i)
            for i in range(robots)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=10, help="round trips per channel per round")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ours, theirs = socket.socketpair()
    connection = Connection(ours.detach())
    echoes = [context.Process(target=echo, args=(Connection(theirs.detach()),))]
    ours, theirs = socket.socketpair()
    channel = Channel(ours)
    echoes.append(context.Process(target=echo, args=(Channel(theirs),)))
    for process in echoes:
        process.start()
    theirs.close()
    rng = np.random.default_rng(0)
    for label, requests in (("16 robots, 3 cameras of 224 px", batch(16, 224, 3, rng)),
                            ("1 robot, 1 camera of 224 px", batch(1, 224, 1, rng)),
                            ("1 robot, 1 camera of 32 px", batch(1, 32, 1, rng))):
        times: dict[str, list[float]] = {"Connection (in band)": [], "Channel (out of band)": []}
        for _ in range(args.rounds):
            for name, end in zip(times, (connection, channel)):
                for _ in range(args.calls):
                    started = time.perf_counter()
                    end.send(requests)
                    end.recv()
                    times[name].append(time.perf_counter() - started)
        megabytes = sum(f.nbytes for r in requests for f in r.sample.images.values()) / 1e6
        print(f"{label} ({megabytes:.1f} MB of frames): " + ", ".join(
            f"{name} {statistics.median(values) * 1e3:.3f} ms" for name, values in times.items()))
    connection.close()
    channel.close()
    for process in echoes:
        process.join(10)


if __name__ == "__main__":
    main()
