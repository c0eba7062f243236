"""An EC2 API stand-in: moto's server on 127.0.0.1, plus what moto does not check.

The real aiobotocore client talks to it over HTTP. A WSGI layer in front of moto:

- rejects what the real EC2 rejects and moto accepts: user-data over 16,384 bytes,
  instance types that are not in botocore's own ``InstanceType`` enum, metadata options
  and shutdown behaviours outside the API's values;
- answers ``GetConsoleOutput`` with what the booted VM really printed;
- injects faults on request (an error code for the Nth call of an action), in EC2's own
  XML error shape, so every step of start, scale-up and close can be failed in turn;
- records every action called, in order.

A watcher boots each instance moto records, from its user-data, on the private address
moto gave it (the tests use a VPC in 127.0.0.0/8, so those addresses are this
machine's), and stops it when the instance is terminated.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import botocore.session
from moto.backends import get_backend
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from .booter import VMBooter

ACCOUNT = "123456789012"
USER_DATA_LIMIT = 16_384
_INSTANCE_TYPES = set(
    botocore.session.get_session().get_service_model("ec2").shape_for("InstanceType").enum
)


def _error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
    return status, body.encode()


def _check_run_instances(params: dict[str, str]) -> tuple[int, bytes] | None:
    """What the real RunInstances refuses and moto lets through."""
    user_data = params.get("UserData")
    if user_data is not None:
        raw = base64.b64decode(user_data)
        if len(raw) > USER_DATA_LIMIT:
            return _error(
                "InvalidParameterValue",
                f"User data is limited to {USER_DATA_LIMIT} bytes (got {len(raw)})",
            )
    instance_type = params.get("InstanceType", "m1.small")
    if instance_type not in _INSTANCE_TYPES:
        return _error("InvalidParameterValue", f"Invalid value '{instance_type}' for InstanceType.")
    allowed = {
        "MetadataOptions.HttpTokens": {"optional", "required"},
        "MetadataOptions.HttpEndpoint": {"enabled", "disabled"},
        "InstanceInitiatedShutdownBehavior": {"stop", "terminate"},
    }
    for key, values in allowed.items():
        if key in params and params[key] not in values:
            return _error("InvalidParameterValue", f"Invalid value '{params[key]}' for {key}")
    hop = params.get("MetadataOptions.HttpPutResponseHopLimit")
    if hop is not None and not 1 <= int(hop) <= 64:
        return _error("InvalidParameterValue", "HttpPutResponseHopLimit must be 1 to 64")
    return None


class EC2StandIn:
    """moto's EC2 behind the checks above, booting what it launches."""

    def __init__(self, booter: VMBooter, region: str = "us-east-1") -> None:
        self.booter = booter
        self.region = region
        self.calls: list[str] = []
        #: The parameters of every RunInstances request, as the API received them.
        self.launches: list[dict[str, str]] = []
        self._faults: dict[tuple[str, int], tuple[str, int]] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._booted: dict[str, str] = {}  # instance id -> booter vm id
        self._stop = threading.Event()

    # -- faults ---------------------------------------------------------------------------

    def fail(
        self, action: str, code: str = "InternalFailure", *, occurrence: int = 1, status: int = 400
    ) -> None:
        """Answer the ``occurrence``-th call of ``action`` from now on with ``code``."""
        with self._lock:
            self._faults[(action, self._counts[action] + occurrence)] = (code, status)

    def throttle(self, action: str, occurrence: int = 1) -> None:
        self.fail(action, "RequestLimitExceeded", occurrence=occurrence, status=503)

    # -- the WSGI layer -------------------------------------------------------------------

    def _wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def middleware(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            action = params.get("Action", "")
            with self._lock:
                self.calls.append(action)
                self._counts[action] += 1
                fault = self._faults.pop((action, self._counts[action]), None)
            answer = None
            if fault is not None:
                code, status = fault
                answer = _error(code, f"injected fault for {action}", status)
            elif action == "RunInstances":
                answer = _check_run_instances(params)
                self.launches.append(params)
            elif action == "GetConsoleOutput":
                answer = self._console_output(params.get("InstanceId", ""))
            if answer is not None:
                status, payload = answer
                reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}[status]
                start_response(
                    f"{status} {reason}",
                    [("Content-Type", "text/xml"), ("Content-Length", str(len(payload)))],
                )
                return [payload]
            environ["wsgi.input"] = io.BytesIO(body)
            response = list(app(environ, start_response))
            if action == "TerminateInstances":
                # A terminated instance's VM is gone before EC2 reports it terminated.
                for key, value in params.items():
                    if key.startswith("InstanceId.") and value in self._booted:
                        self.booter.stop(self._booted.pop(value))
            return response

        return middleware

    def _console_output(self, instance_id: str) -> tuple[int, bytes]:
        vm = self.booter.vms.get(self._booted.get(instance_id, ""))
        text = vm.console_output() if vm else ""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            f"<requestId>{uuid.uuid4()}</requestId><instanceId>{escape(instance_id)}</instanceId>"
            f"<timestamp>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}</timestamp>"
            f"<output>{base64.b64encode(text.encode()).decode()}</output>"
            "</GetConsoleOutputResponse>"
        )
        return 200, body.encode()

    # -- booting what moto launches --------------------------------------------------------

    def _backend(self) -> Any:
        return get_backend("ec2")[ACCOUNT][self.region]

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._sync_vms()
            except RuntimeError:  # moto's dicts changed under us: look again
                continue

    def _sync_vms(self) -> None:
        for reservation in list(self._backend().reservations.values()):
            for instance in list(reservation.instances):
                state = instance._state.name
                if state in ("pending", "running") and instance.id not in self._booted:
                    tags = self._backend().tags.get(instance.id, {})
                    cluster = tags.get("dask-secure-cloud-cluster", "untagged")
                    name = tags.get("Name", instance.id).removeprefix(
                        f"dask-secure-cloud-{cluster}-"
                    )
                    user_data = instance.user_data
                    if isinstance(user_data, list):
                        user_data = user_data[0]
                    raw = base64.b64decode(str(user_data)) if user_data else b"#cloud-config\n{}\n"
                    vm = self.booter.boot(
                        raw,
                        address=instance.private_ip,
                        cluster_id=cluster,
                        name=name,
                        role="scheduler" if name == "scheduler" else "worker",
                    )
                    self._booted[instance.id] = vm.vm_id
                elif state in ("shutting-down", "terminated") and instance.id in self._booted:
                    self.booter.stop(self._booted.pop(instance.id))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        app = self._wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self._serve = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._serve.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def reset(self) -> None:
        """Forget every resource and call, as a fresh account would have none."""
        self.booter.stop_all()
        self._booted.clear()
        get_backend("ec2").reset()
        self.calls.clear()
        self.launches.clear()
        self._faults.clear()
        self._counts.clear()

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(5)
        self._server.shutdown()
        self._serve.join(5)
        self.booter.stop_all()
