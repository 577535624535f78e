"""The torchrun rendezvous environment of a gang's workers."""

from __future__ import annotations


def torchrun_env(job_name: str, namespace: str, rank: int, workers: int, gpus_per_worker: int,
                 port: int) -> list[dict[str, str]]:
    """The rendezvous environment of one worker, in both spellings torchrun
    reads (plain and PET_*). MASTER_ADDR is rank 0's stable DNS name through
    the job's headless Service."""
    master = f"{job_name}-0.{job_name}.{namespace}.svc"
    values = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(workers * gpus_per_worker),
        "NNODES": str(workers),
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": str(gpus_per_worker),
        "PET_MASTER_ADDR": master,
        "PET_MASTER_PORT": str(port),
        "PET_NNODES": str(workers),
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(gpus_per_worker),
    }
    return [{"name": k, "value": v} for k, v in values.items()]
