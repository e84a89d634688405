"""``fleetlm cluster up``: whole replicas placed across a Ray cluster, behind the router.

Each replica is a Ray actor (``ReplicaActor``, ``max_restarts=-1``) that starts ``fleetlm
serve`` on its node (a free port on the node's address) and dies when that server dies, so Ray
restarts it, which starts a fresh server. The server is bound to the actor's life too
(``PR_SET_PDEATHSIG``): a killed actor leaves no server behind.

The ``ClusterController`` runs in the ``cluster up`` process next to the router: once a second
it asks every actor for its URL; a new URL (first start or a restart) replaces the old one in
the router's pool, where it enters rotation when its health check passes. Ray is an optional
extra (``pip install 'fleetlm[ray]'``), imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading

logger = logging.getLogger("fleetlm.router")
NAMESPACE = "fleetlm"


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'fleetlm[ray]'") from None
    return ray


def _die_with_parent() -> None:
    """In the server process: get SIGTERM when the actor process that started it exits."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ReplicaActorImpl:
    """The body of the replica actor (wrapped by ``ray.remote`` in ``replica_actor_class``)."""

    def __init__(self, serve_argv: list[str]) -> None:
        import ray

        from fleetlm.executor.multiproc import free_port

        host = ray.util.get_node_ip_address()
        port = free_port()
        cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", *serve_argv, "--host", host,
               "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._url = f"http://{host}:{port}"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        code = self.proc.wait()
        logger.error("replica server %s exited (code %s); the actor exits so Ray restarts it", self._url, code)
        os._exit(1)

    def url(self) -> str:
        return self._url

    def server_pid(self) -> int:
        return self.proc.pid


def replica_actor_class(ray, num_cpus: float):
    return ray.remote(num_cpus=num_cpus, max_restarts=-1, max_task_retries=0)(ReplicaActorImpl)


class ClusterController:
    """Keeps the router's pool equal to the actors' current URLs."""

    def __init__(self, ray, pool, replicas: int, serve_argv: list[str], num_cpus: float) -> None:
        self.ray, self.pool = ray, pool
        cls = replica_actor_class(ray, num_cpus)
        self.actors = [cls.options(name=f"fleetlm-replica-{i}", namespace=NAMESPACE).remote(serve_argv)
                       for i in range(replicas)]
        self.urls: list[str | None] = [None] * replicas
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cluster-controller")

    async def _loop(self) -> None:
        while True:
            await asyncio.gather(*(self._sync(i) for i in range(len(self.actors))), return_exceptions=True)
            await asyncio.sleep(1.0)

    async def _sync(self, i: int) -> None:
        from fleetlm.router.config import WorkerSpec

        try:
            url = await asyncio.wait_for(self.actors[i].url.remote(), 10)
        except Exception:  # restarting (RayActorError) or slow: look again next round
            return
        old = self.urls[i]
        if url == old:
            return
        if old is not None and old in self.pool.replicas:
            await self.pool.remove_worker(old)
            logger.info("replica %d restarted: %s replaces %s", i, url, old)
        self.pool.track(WorkerSpec(url))
        self.urls[i] = url

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)


async def run_cluster(config, replicas: int, serve_argv: list[str], address: str | None, num_cpus: float) -> int:
    """Connect to Ray (``address``; None starts a local one), place the replicas, serve the
    router until SIGTERM/SIGINT, then drain and remove the replicas."""
    from fleetlm.router.server import Router, open_site, wait_for_signal

    ray = import_ray()
    if address is None:  # a local cluster of our own
        ray.init(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    router = Router(config)
    await router.start()
    controller = ClusterController(ray, router.pool, replicas, serve_argv, num_cpus)
    controller.start()
    runner = await open_site(router)
    logger.info("cluster: %d replica actor(s) placed; they join the router as they become healthy", replicas)
    await wait_for_signal()
    await router.drain()
    await controller.stop()
    await runner.cleanup()
    await router.close()
    ray.shutdown()
    return 0
