"""``HttpPolicyClient``: a policy deployment over HTTP, on one keep-alive connection
(``vla_foundry_client.connection``: HTTP/1.1 on a plain socket, the cheapest round trip for
one robot asking one server; threads sharing a client take turns).

Observations are the server's nested form::

    {"images": {"front": frame, ...},          # (H, W, 3) uint8 array, PNG/JPEG bytes, or a list per image index
     "lowdim": {"arm__pos": position, ...},    # [P+1][d] rows, or with a session just the current [d] row
     "language_instruction": "pick up the red block"}

numpy arrays travel as typed arrays (raw bytes in msgpack, base64 in JSON). Replies come back
with their action arrays as float32 numpy arrays.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional
from urllib.parse import quote

import msgpack
import numpy as np

from vla_foundry_client.arrays import MessagePacker, pack, unpack
from vla_foundry_client.connection import HttpReply, KeepAliveConnection
from vla_foundry_client.errors import PolicyServerError, auth_headers, retry_after_seconds, server_error

MSGPACK = "application/msgpack"
ACTION_ARRAYS = ("action_chunk", "action")  # reply keys holding [T][A] or [A] numbers


class HttpPolicyClient:
    """Talks to ``vla-foundry serve`` at ``base_url`` (e.g. ``http://127.0.0.1:8000``).

    ``model`` names the deployment (default: the one policy of ``policy_type`` served there);
    ``session_id`` keeps this robot's history on the server, so each request needs only the
    current step; ``format`` is the wire format of requests and replies (msgpack is smaller and
    faster for camera frames; JSON is easier to read in logs); ``api_key`` is sent as
    ``Authorization: Api-Key <key>`` (default: the ``VLA_API_KEY`` environment variable; none:
    no header, for a server without keys).
    """

    def __init__(self, base_url: str, *, model: Optional[str] = None, session_id: Optional[str] = None,
                 format: str = "msgpack", timeout: float = 10.0, policy_type: str = "diffusion_policy",
                 api_key: Optional[str] = None):
        if format not in ("msgpack", "json"):
            raise ValueError(f"format must be 'msgpack' or 'json'; got {format!r}")
        self.model, self.session_id, self.format, self.policy_type = model, session_id, format, policy_type
        self._auth = auth_headers(api_key)
        # The connection stays open between control steps (no TCP handshake per request).
        self._http = KeepAliveConnection(base_url, timeout=timeout)
        self._packer = MessagePacker()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the calls

    def metadata(self) -> dict[str, Any]:
        """The deployment's ``io`` (cameras, image indices, proprioception and action fields, horizon,
        ``n_action_steps``, …) plus its ``model`` name, as the websocket's first frame has them."""
        if self.model is not None:
            deployment = self._call("GET", f"/models/{quote(self.model, safe='')}")
        else:
            served = self._call("GET", "/models")["deployments"]
            policies = [d for d in served if d.get("type") == self.policy_type and d.get("status") != "failed"]
            if len(policies) != 1:
                names = ", ".join(d["name"] for d in policies) or "none"
                raise ValueError(f"expected one {self.policy_type!r} deployment at {self._http.base_url}, found "
                                 f"{names}; name one with model=")
            deployment = policies[0]
        return {**deployment["io"], "model": deployment["name"], "session_id": self.session_id}

    def infer(self, observation: dict[str, Any], **request_fields: Any) -> dict[str, Any]:
        """An action chunk for ``observation``: ``POST /predict/{policy_type}``.

        ``request_fields`` are the request's other fields (``seed``, ``step``, ``timestamp``,
        ``past_actions``, ``num_inference_steps``, ``noise``). The reply's ``action_chunk`` is a
        float32 [P+1+F, A] array whose row ``first_action_index`` is the action to execute now;
        ``actions`` holds the same per field.
        """
        body = {**self._routing(), "observation": observation, **request_fields}
        if self.session_id is not None:
            body.setdefault("session_id", self.session_id)
        return _with_action_arrays(self._call("POST", f"/predict/{self.policy_type}", body))

    def step(self, observation: dict[str, Any], **request_fields: Any) -> dict[str, Any]:
        """One action for the current control step: ``POST /sessions/{session_id}/step``; the server
        replans every ``open_loop_steps`` steps. The reply's ``action`` is a float32 [A] array."""
        body = {**self._routing(), "observation": observation, **request_fields}
        return _with_action_arrays(self._call("POST", f"/sessions/{self._session()}/step", body))

    def reset(self, seed: Optional[int] = None) -> dict[str, Any]:
        """Start a new episode: the session forgets its history (``seed`` seeds its next plans).

        A session the server does not hold yet (never used, expired) has nothing to forget; that is
        not an error unless a ``seed`` was asked for, which then cannot be applied.
        """
        body = None if seed is None else {"seed": seed}
        try:
            return self._call("POST", f"/sessions/{self._session()}/reset", body)
        except PolicyServerError as e:
            if e.status != 404 or e.field != "session_id" or seed is not None:
                raise
            return {"session_id": self.session_id, "reset": False}

    def sessions(self) -> list[dict[str, Any]]:
        """The robot sessions the server holds (``GET /sessions``)."""
        return self._call("GET", "/sessions")["sessions"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HttpPolicyClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the wire

    def _routing(self) -> dict[str, Any]:
        return {} if self.model is None else {"model": self.model}

    def _session(self) -> str:
        if self.session_id is None:
            raise ValueError("this call needs a session: create the client with session_id=")
        return self.session_id

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> dict[str, Any]:
        binary = self.format == "msgpack"
        headers = {"accept": MSGPACK if binary else "application/json", **self._auth}
        with self._lock:  # one exchange at a time: the packed buffer is reused by the next one
            content = None
            if body is not None:
                headers["content-type"] = MSGPACK if binary else "application/json"
                packed = pack(body, binary=binary)
                content = self._packer.pack(packed) if binary else json.dumps(packed).encode()
            reply = self._http.request(method, path, content, headers)
        payload = _decode(reply)
        if reply.status >= 400:
            raise _server_error(reply, payload)
        return payload


def _decode(reply: HttpReply) -> Any:
    """The reply body (msgpack or JSON, by its content type), arrays unpacked; None if undecodable."""
    try:
        if reply.content_type == MSGPACK:
            return unpack(msgpack.unpackb(reply.content, raw=False))
        return unpack(json.loads(reply.content))
    except ValueError:  # not JSON / msgpack (a proxy's HTML error page, say)
        return None


def _server_error(reply: HttpReply, payload: Any) -> PolicyServerError:
    return server_error(reply.status, payload, reply.text[:500] or reply.reason,
                        retry_after_seconds(reply.headers.get("retry-after")))


def _with_action_arrays(payload: dict[str, Any]) -> dict[str, Any]:
    """Action numbers as float32 arrays (the server computes in float32, so nothing is lost)."""
    out = dict(payload)
    for key in ACTION_ARRAYS:
        if key in out:
            out[key] = np.asarray(out[key], dtype=np.float32)
    if isinstance(out.get("actions"), dict):
        out["actions"] = {field: np.asarray(rows, dtype=np.float32) for field, rows in out["actions"].items()}
    return out
