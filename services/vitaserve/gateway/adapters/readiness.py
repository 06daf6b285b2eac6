"""Readiness of the telephony adapters, as load balancers and probes ask for it.

The gateway's gRPC health (the kubelet's readiness probe) is SERVING only once every adapter it was
asked to serve listens: the adapters start before the gRPC server says SERVING, and each adapter has
a named status of its own in the same health service (`vita.gateway.<protocol>`: a probe or a load
balancer can ask for one). All of them turn NOT_SERVING together when the replica drains.

A WebSocket port also answers a plain `GET /healthz`: cloud load balancers and Ingress controllers
health-check the backend port they route to, over HTTP; 200 while the replica takes calls, 503 once
it drains (the same moment gRPC health says NOT_SERVING). AudioSocket is raw TCP: a TCP check.
"""

from __future__ import annotations

from http import HTTPStatus

HEALTH_PATH = "/healthz"


def health_name(protocol: str) -> str:
    """The adapter's service name in grpc.health.v1."""
    return f"vita.gateway.{protocol}"


def http_health(servicer, connection, request):
    """websockets' process_request: the answer to GET /healthz, or None for any other request (an
    upgrade goes on)."""
    if request.path.split("?", 1)[0] != HEALTH_PATH:
        return None
    if servicer.draining:
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "NOT_SERVING: draining\n")
    return connection.respond(HTTPStatus.OK, "SERVING\n")
