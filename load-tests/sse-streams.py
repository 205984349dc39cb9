#!/usr/bin/env python3
"""Holds many server-sent event streams of one sale open (benchmark step).

Opens --count streams to --base's /api/v1/sales/<sale>/events from
127.0.0.1 only, prints "open <n>" once they are all open, reads every event,
and notes when each stream first shows the sale sold out. A poller on a
connection of its own notes when GET /api/v1/sales/<sale> first says so (the
moment the last unit went, to 20 ms). Bounded: stops after --seconds or on
SIGTERM, then writes a JSON summary to --out.
"""
import argparse
import asyncio
import json
import signal
import time
import urllib.parse


async def stream(host, port, path, state, index):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        state["errors"] += 1
        return
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        state["errors"] += 1
        writer.close()
        return
    state["open"] += 1
    try:
        while not state["stop"].is_set():
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                state["events"] += 1
                if b'"status":"sold_out"' in line and index not in state["sold_out"]:
                    state["sold_out"][index] = time.time()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        state["open"] -= 1
        writer.close()


async def poll(host, port, sale_path, state):
    """Notes when the sale's own view first says sold out."""
    reader, writer = await asyncio.open_connection(host, port)
    while not state["stop"].is_set() and state["last_unit_at"] is None:
        writer.write(f"GET {sale_path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        length = 0
        while True:
            line = await reader.readline()
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            if line in (b"\r\n", b""):
                break
        body = await reader.readexactly(length)
        if b'"stock_left":0' in body:
            state["last_unit_at"] = time.time()
        await asyncio.sleep(0.02)
    writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--sale", required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    url = urllib.parse.urlparse(args.base)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("sse-streams: loopback targets only")
    host, port = url.hostname, url.port or 80
    state = {"open": 0, "errors": 0, "events": 0, "sold_out": {}, "last_unit_at": None, "stop": asyncio.Event()}
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, state["stop"].set)
    loop.add_signal_handler(signal.SIGINT, state["stop"].set)
    path = f"/api/v1/sales/{args.sale}/events"
    tasks = []
    for i in range(args.count):
        tasks.append(asyncio.create_task(stream(host, port, path, state, i)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    deadline = time.time() + 30
    while state["open"] + state["errors"] < args.count and time.time() < deadline:
        await asyncio.sleep(0.1)
    print(f"open {state['open']}", flush=True)
    poller = asyncio.create_task(poll(host, port, f"/api/v1/sales/{args.sale}", state))
    try:
        await asyncio.wait_for(state["stop"].wait(), timeout=args.seconds)
    except asyncio.TimeoutError:
        pass
    state["stop"].set()
    poller.cancel()
    opened = state["open"]
    for t in tasks:
        t.cancel()
    seen = sorted(state["sold_out"].values())
    at = state["last_unit_at"]
    summary = {
        "requested": args.count,
        "open_at_end": opened,
        "errors": state["errors"],
        "events": state["events"],
        "saw_sold_out": len(seen),
        "last_unit_at": at,
        "max_lag_s": (max(seen) - at) if seen and at else None,
        "median_lag_s": (seen[len(seen) // 2] - at) if seen and at else None,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    asyncio.run(main())
