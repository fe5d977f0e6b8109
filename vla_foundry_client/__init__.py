"""A robot's client for VLA Foundry Serve policies: numpy, msgpack and websockets only (HTTP on the
standard library's sockets).

The robot loop, with the server keeping the history (so each step sends only the current
frame and proprioception row)::

    from vla_foundry_client import ActionChunkBroker, HttpPolicyClient

    with HttpPolicyClient("http://127.0.0.1:8000", session_id="robot-1") as client:
        broker = ActionChunkBroker(client)  # one action per step; a new chunk every n_action_steps
        while robot.running():
            robot.apply(broker.act({"images": {"front": robot.camera()}, "lowdim": {"arm__pos": robot.position()},
                                    "language_instruction": "pick up the red block"}))

``WebsocketPolicyClient("ws://127.0.0.1:8000")`` drops in for ``HttpPolicyClient`` (one
connection is one session). A refusal raises ``PolicyServerError`` with the status, the
error type and, over HTTP, the field at fault. ``examples/robot_loop.py`` runs this loop on the
simulated reach task against the demo policy.
"""

from vla_foundry_client.arrays import pack, pack_array, unpack, unpack_array
from vla_foundry_client.broker import ActionChunkBroker
from vla_foundry_client.errors import PolicyServerError
from vla_foundry_client.http import HttpPolicyClient
from vla_foundry_client.websocket import WebsocketPolicyClient

__all__ = ["ActionChunkBroker", "HttpPolicyClient", "PolicyServerError", "WebsocketPolicyClient", "pack",
           "pack_array", "unpack", "unpack_array"]
