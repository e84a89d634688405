"""``distributed_executor_backend="ray"``: the multiproc executor with ranks 1.. as Ray actors.

Rank 0 stays in the engine-core process (the driver), as with ``multiproc``; each other rank
runs ``worker_proc.run_worker`` inside a Ray actor (one CPU, or one GPU on CUDA), so Ray decides
where it runs and accounts its resources. Everything after placement (torch.distributed, the
ZMQ control plane, the failure rules) is the multiproc executor's. The driver joins the Ray
cluster named by ``RAY_ADDRESS`` (or the one ``ray start`` left on this machine; else a local
one). Ranks meet over the driver's loopback address and IPC sockets, so this backend places
one replica's ranks on the driver's node; whole replicas across nodes are
``fleetlm cluster up``'s job (docs/ROUTER.md).
"""

from __future__ import annotations

import os

from fleetlm.executor.multiproc import MultiprocExecutor


class RankActorImpl:
    """Body of one worker rank's actor."""

    def run(self, args, rank: int, init_method: str, local_ranks: int) -> int:
        from fleetlm.executor.worker_proc import run_worker

        run_worker(args, rank, init_method, local_ranks)
        return 0

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


class RayWorkerHandle:
    """``Popen``-like view of a rank's actor: ``poll``/``wait``/``kill``/``returncode``."""

    def __init__(self, ray, actor, ref) -> None:
        self.ray, self.actor, self.ref = ray, actor, ref
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            done, _ = self.ray.wait([self.ref], timeout=0)
            if done:
                try:
                    self.returncode = self.ray.get(self.ref)
                except Exception:  # the actor died or the worker raised
                    self.returncode = 1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        done, _ = self.ray.wait([self.ref], timeout=timeout)
        if not done:
            raise subprocess.TimeoutExpired("ray worker", timeout)
        return self.poll()

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if self.returncode is None:
            self.returncode = -9


class RayExecutor(MultiprocExecutor):
    def _spawn_worker(self, rank: int, init_method: str):
        from fleetlm.executor.ray_cluster import import_ray

        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        gpus = 1 if self.args.resolved_device == "cuda" else 0
        cls = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=0)(RankActorImpl)
        actor = cls.remote()
        return RayWorkerHandle(ray, actor, actor.run.remote(self.args, rank, init_method, self.world))
