"""What a batch of robot requests costs to cross to a model process and back: `Channel` vs multiprocessing.

    python bench/model_process_channel.py [--rounds 6] [--calls 10]

`service/model_process.py` sends each batch's `PolicyRequest`s to the child through a `Channel` (a local
socket, msgpack; frames of 64 KiB or more copied once into shared memory: an `Arena`). This times a round
trip (the requests there, a small acknowledgement back) for three batches, three ways over the same kind
of socket: multiprocessing's `Connection` (the frames pickled in band: for comparison only, the server
never unpickles), `Channel` with the frames in the message, `Channel` with them in an arena; the three
echo processes (forked) alive at once and the calls interleaved in rounds: 16 robots with three 224 px
cameras, one robot with one 224 px camera, one robot with the demo policy's 32 px camera (its frames small
enough to stay in the message).
Printed: the median round trip of each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time

import numpy as np
from multiprocessing.connection import Connection

from service.model_process import Arena, Channel
from vla_foundry.pipelines.action import PolicyRequest
from vla_foundry.robotics.observations import RawObservation


def echo(channel, inherited: list) -> None:
    """The other process: answer each message with its length until the channel closes. ``inherited``: this
    side's ends of the channels made before it, which the fork copied; closed first, or an echo would hold its own
    channel's other end open and never see it close."""
    for end in inherited:
        end.close()
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
    context = multiprocessing.get_context("fork")  # (the echoes inherit the sockets and the arena's memory)
    ends, echoes = [], []
    for kind in ("connection", "socket", "arena"):
        ours, theirs = socket.socketpair()
        if kind == "connection":
            ends.append(Connection(ours.detach()))
            theirs_end = Connection(theirs.detach())
        else:
            arena = Arena.create() if kind == "arena" else None
            if kind == "arena" and arena is None:
                raise SystemExit("os.memfd_create is missing here: no arena")
            ends.append(Channel(ours, send_arena=arena))
            theirs_end = Channel(theirs, receive_arena=Arena(os.dup(arena.fd)) if arena else None)
        echoes.append(context.Process(target=echo, args=(theirs_end, ends), daemon=True))
        echoes[-1].start()
        theirs_end.close()
    rng = np.random.default_rng(0)
    for label, requests in (("16 robots, 3 cameras of 224 px", batch(16, 224, 3, rng)),
                            ("1 robot, 1 camera of 224 px", batch(1, 224, 1, rng)),
                            ("1 robot, 1 camera of 32 px", batch(1, 32, 1, rng))):
        times: dict[str, list[float]] = {"Connection (in band)": [], "Channel, in the message": [],
                                         "Channel, shared memory": []}
        for _ in range(args.rounds):
            for name, end in zip(times, ends):
                for _ in range(args.calls):
                    started = time.perf_counter()
                    end.send(requests)
                    end.recv()
                    times[name].append(time.perf_counter() - started)
        megabytes = sum(f.nbytes for r in requests for f in r.sample.images.values()) / 1e6
        print(f"{label} ({megabytes:.1f} MB of frames): " + ", ".join(
            f"{name} {statistics.median(values) * 1e3:.3f} ms" for name, values in times.items()))
    for end in ends:
        end.close()
    for process in echoes:
        process.join(10)


if __name__ == "__main__":
    main()
