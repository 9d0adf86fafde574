"""Serving benchmark: throughput and p50/p99 latency at 1, 4 and 16 concurrent clients, with
dynamic batching on (``serve.max_batch_size``) and off (``max_batch_size=1``), same tiny model,
one Ray, one replica. Prints JSON.

    python jobs/bench_serve.py                    # about 5 minutes on 2 CPU cores
    python jobs/bench_serve.py --model /models/sd15 --steps 30 --size 512 --gpus 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time


async def load(url: str, clients: int, requests: int, body: dict) -> dict:
    import httpx

    gate, latencies, statuses = asyncio.Semaphore(clients), [], []

    async def one(client, index):
        async with gate:
            started = time.perf_counter()
            response = await client.post(url, json={**body, "seed": index})
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": requests, "errors": sum(s != 200 for s in statuses),
            "requests_per_s": round(requests / wall, 3),
            "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], 3)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:sd")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size when batching is on")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per replica")
    parser.add_argument("--cpus", type=float, default=2, help="CPUs per replica (its torch threads on CPU)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()

    import ray
    from ray import serve

    from selma.core.config import Resources, ServeConfig
    from selma.core.models import resolve_model
    from selma.serve.app import build_app, serve_run

    # Logical CPUs: the replica's plus the ingress's; the threads come from --cpus.
    ray.init(num_cpus=int(args.cpus) + 1, include_dashboard=False, log_to_driver=False)
    model = resolve_model(args.model)
    body = {"prompt": "three red apples next to a blue chair", "size": f"{args.size}x{args.size}",
            "steps": args.steps}
    clients = [int(c) for c in args.clients.split(",")]
    results: dict = {"model": args.model, "steps": args.steps, "size": args.size,
                     "resources": {"gpus": args.gpus, "cpus": args.cpus}, "max_batch_size": args.batch}
    for name, batch in (("batching_on", args.batch), ("batching_off", 1)):
        config = ServeConfig(max_batch_size=batch, batch_wait_timeout_s=0.05, max_ongoing_requests=max(16, batch),
                             max_queued_requests=256, resources=Resources(gpus=args.gpus, cpus=args.cpus),
                             max_steps=max(100, args.steps))
        port = free_port()
        serve_run(build_app(config, base_model=model, default_steps=args.steps), "127.0.0.1", port, blocking=False)
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        asyncio.run(load(url, 2, 4, body))  # warm-up
        results[name] = [asyncio.run(load(url, c, c * args.requests_per_client, body)) for c in clients]
        serve.shutdown()
    results["throughput_batching_on_vs_off"] = {
        str(on["clients"]): round(on["requests_per_s"] / off["requests_per_s"], 3)
        for on, off in zip(results["batching_on"], results["batching_off"])}
    print(json.dumps(results, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
