"""``triptych status``: what a broker sees -- nodes, queues, requests in flight."""

from __future__ import annotations

import argparse
import json
import sys

from protocol.messages import SERVICES, StatusReply
from triptych.client import Client, GenerationError


def status_dict(reply: StatusReply) -> dict:
    """The reply as plain data: what ``--json`` prints."""
    return {"nodes": reply.nodes, "queues": reply.queues, "requests_in_flight": reply.requests_in_flight}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _service_order(service: str) -> int:
    return SERVICES.index(service) if service in SERVICES else len(SERVICES)


def format_status(reply: StatusReply) -> str:
    """Two tables (nodes, then queues) and the number of requests in flight."""
    lines: list[str] = []
    nodes = sorted(reply.nodes, key=lambda n: (_service_order(n["service"]), n["model"], n["node"]))
    if nodes:
        rows = []
        for node in nodes:
            host, _, pid = str(node["node"]).rpartition(":")
            rows.append(
                [
                    node["service"],
                    node["model"],
                    host or str(node["node"]),
                    pid if host else "",
                    node["state"],
                    str(node.get("jobs_in_progress", 0)),
                    str(node["jobs_done"]),
                    f"{node['last_heartbeat_s']:.1f}s ago",
                ]
            )
        lines += _table(["SERVICE", "MODEL", "HOST", "PID", "STATE", "JOBS", "DONE", "LAST HEARTBEAT"], rows)
        if reply.nodes_left_out:
            lines.append(f"... and {reply.nodes_left_out} more nodes")
    else:
        lines.append("no nodes registered")
    served = {node["model"] for node in reply.nodes}
    queues = []
    for key, depth in reply.queues.items():
        service, _, model = key.partition("/")
        if depth or model in served:  # queues of unserved models only while they hold jobs
            queues.append([service, model, str(depth)])
    if queues:
        queues.sort(key=lambda row: (_service_order(row[0]), row[1]))
        lines += ["", *_table(["SERVICE", "MODEL", "QUEUED"], queues)]
    lines += ["", f"requests in flight: {reply.requests_in_flight}"]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from triptych.flags import curve_from_args

    try:
        with Client(args.broker, curve=curve_from_args(args)) as client:
            reply = client.status(timeout=args.timeout)
    except GenerationError as exc:
        print(f"triptych status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status_dict(reply), indent=2) if args.json else format_status(reply), flush=True)
    return 0
