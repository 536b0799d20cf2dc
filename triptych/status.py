"""``triptych status``: what a broker sees -- nodes, queues, requests in flight."""

from __future__ import annotations

import argparse
import json
import sys

from protocol.messages import SERVICES, StatusReply
from protocol.stages import DENOISER
from triptych.client import Client, GenerationError


def status_dict(reply: StatusReply) -> dict:
    """The reply as plain data: what ``--json`` prints, with what each model offers (:func:`model_offers`)."""
    return {
        "nodes": reply.nodes,
        "queues": reply.queues,
        "requests_in_flight": reply.requests_in_flight,
        "models": model_offers(reply.nodes),
    }


def model_offers(nodes: list[dict]) -> dict[str, dict[str, list[str]]]:
    """Per model, what its denoiser nodes announced: ``samplers``, ``loras`` (the adapters in their
    folders when they started) and ``step_caches`` (the step-cache kinds they apply), each the union
    over the model's denoisers, sorted."""
    offers: dict[str, dict[str, set[str]]] = {}
    for node in nodes:
        if node.get("service") != DENOISER:
            continue
        info = node.get("info") if isinstance(node.get("info"), dict) else {}
        offer = offers.setdefault(str(node.get("model")), {"samplers": set(), "loras": set(), "step_caches": set()})
        for key, names in offer.items():
            if isinstance(info.get(key), list):
                names.update(map(str, info[key]))
    return {model: {key: sorted(names) for key, names in offer.items()} for model, offer in sorted(offers.items())}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _service_order(service: str) -> int:
    return SERVICES.index(service) if service in SERVICES else len(SERVICES)


def seconds_per_image(node: dict) -> float | None:
    """A node's seconds of work per image (its ``busy_seconds`` over its ``images``); None before its first."""
    stats = node.get("stats") or {}
    images, busy = stats.get("images"), stats.get("busy_seconds")
    if not isinstance(images, int | float) or not isinstance(busy, int | float) or images <= 0:
        return None
    return busy / images


def stage_rates(nodes: list[dict]) -> list[list[str]]:
    """Per service and model: nodes, node-seconds per image, and the images per second those nodes
    make when kept busy -- the stage with the fewest images per second is the one to add nodes to."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for node in nodes:
        groups.setdefault((node["service"], node["model"]), []).append(node)
    rows = []
    for (service, model), members in sorted(groups.items(), key=lambda item: (_service_order(item[0][0]), item[0][1])):
        measured = [node for node in members if seconds_per_image(node) is not None]
        images = sum(node["stats"]["images"] for node in measured)
        busy = sum(node["stats"]["busy_seconds"] for node in measured)
        per_image = busy / images if images else None
        rate = len(members) / per_image if per_image else None
        rows.append(
            [
                service,
                model,
                str(len(members)),
                "-" if per_image is None else f"{per_image:.2f}",
                "-" if rate is None else f"{rate:.2f}",
            ]
        )
    return rows


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
                    "-" if (per_image := seconds_per_image(node)) is None else f"{per_image:.2f}",
                ]
            )
        header = ["SERVICE", "MODEL", "HOST", "PID", "STATE", "JOBS", "DONE", "LAST HEARTBEAT", "S/IMAGE"]
        lines += _table(header, rows)
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
    if nodes:
        lines += ["", *_table(["SERVICE", "MODEL", "NODES", "S/IMAGE", "IMAGES/S"], stage_rates(nodes))]
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
