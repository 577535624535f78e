"""A TrainingJob worker as torchrun would start it, without torch (no wheel of
it fits the test image): NPROC_PER_NODE local ranks, each with the global rank
NODE_RANK * NPROC_PER_NODE + local rank, meet rank 0's pod at
MASTER_ADDR:MASTER_PORT, as torch.distributed's TCP store does. Rank 0's pod
serves the store; it checks that every rank of 0..WORLD_SIZE-1 came exactly
once and that all agree on WORLD_SIZE, and tells each. Exit 0 when all agreed.

The tests run it with `python -c` (its source as the container's command).
Their knobs, by environment: FAIL_RANK (a node rank that exits 1 after the
rendezvous on attempt 0) and HOLD (attempt 0 stays up after the rendezvous,
until its pod is deleted). ATTEMPT is the pod's gpucluster.dev/attempt label.
"""

import json
import os
import socket
import sys
import threading
import time

DEADLINE = time.monotonic() + 240
env = os.environ
world, nproc, node_rank = int(env["WORLD_SIZE"]), int(env["NPROC_PER_NODE"]), int(env["NODE_RANK"])
master, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
attempt = env.get("ATTEMPT", "0")
agreed: dict[int, bool] = {}  # global rank -> what the store said


def log(message: str) -> None:
    print(f"{socket.gethostname()} attempt {attempt}: {message}", flush=True)


def serve_store() -> None:
    """Rank 0's pod: takes every rank's hello, then answers all at once."""
    server = socket.create_server(("", port), backlog=world)
    server.settimeout(max(1.0, DEADLINE - time.monotonic()))
    hellos = []
    while len(hellos) < world:
        conn, peer = server.accept()
        hello = json.loads(conn.makefile().readline())
        hellos.append((conn, hello, peer[0]))
    ranks = sorted(h["rank"] for _, h, _ in hellos)
    all_agree = ranks == list(range(world)) and all(h["world_size"] == world for _, h, _ in hellos)
    peers = sorted({peer for _, _, peer in hellos})
    log(f"store: {len(hellos)} ranks from {len(peers)} pods {peers}; agreed={all_agree}")
    for conn, _, _ in hellos:
        conn.sendall((json.dumps({"agreed": all_agree, "ranks": ranks}) + "\n").encode())
        conn.close()


def connect() -> tuple[socket.socket, str]:
    """Connects to the store, resolving MASTER_ADDR again on every try: on a
    gang restart the name moves to the new rank 0's pod, and the old pod's
    address can linger in DNS (a cache, a terminating pod still published)."""
    while True:
        try:
            for *_, address in socket.getaddrinfo(master, port, socket.AF_INET, socket.SOCK_STREAM):
                try:
                    return socket.create_connection(address, timeout=5), address[0]
                except OSError:
                    pass
        except OSError:
            pass
        if time.monotonic() > DEADLINE:
            raise TimeoutError(f"no store at {master}:{port}")
        time.sleep(0.5)


def rank(local: int) -> None:
    me = node_rank * nproc + local
    conn, address = connect()
    conn.sendall((json.dumps({"rank": me, "world_size": world}) + "\n").encode())
    conn.settimeout(max(1.0, DEADLINE - time.monotonic()))
    answer = json.loads(conn.makefile().readline())
    agreed[me] = answer["agreed"]
    verdict = f"all {world} ranks agreed" if answer["agreed"] else f"no agreement, ranks {answer['ranks']}"
    log(f"rank {me}/{world}: MASTER_ADDR {master} -> {address}; {verdict}")


threads = [threading.Thread(target=rank, args=(local,)) for local in range(nproc)]
if node_rank == 0:
    threads.append(threading.Thread(target=serve_store))
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if len(agreed) != nproc or not all(agreed.values()):
    log("rendezvous failed")
    sys.exit(1)
if attempt == "0" and env.get("FAIL_RANK") == str(node_rank):
    log("exiting 1, as FAIL_RANK asks")
    sys.exit(1)
if attempt == "0" and env.get("HOLD"):
    log("holding, as HOLD asks")
    while True:
        time.sleep(3600)
log("done")
