"""Where the shards run: Ray actors (:class:`RayExecutor`, a local cluster or ``address``) or
plain objects in this process (:class:`LocalExecutor`: the same calls, for a quick check
without Ray). Calls return handles (Ray ``ObjectRef`` s, or values); a handle passed to another
call is resolved there, so rows between shards go through Ray's object store without passing
through the driver.

Ray is imported here only, lazily: without it, :func:`require_ray` raises one line saying how
to install it. Pure Python (and ray); must not import FastReID.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

logger = logging.getLogger(__name__)

INSTALL_HINT = ("the ray engine needs Ray: pip install 'nformer-fastreid[distributed]' "
                "(or pip install ray)")


def require_ray():
    """The ``ray`` module, or an ``ImportError`` whose one line says how to install it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


class LocalExecutor:
    """Every shard an object in this process (no Ray): for checks and a single machine."""

    name = "local"

    def create(self, cls, *args) -> Any:
        return cls(*args)

    def call(self, actor, method: str, *args) -> Any:
        return getattr(actor, method)(*args)

    def scatter(self, actor, method: str, *args, shards: int) -> List[Any]:
        """A call returning one part per shard: a list of ``shards`` handles."""
        return list(getattr(actor, method)(*args))

    def get(self, handles):
        return handles

    def put(self, value):
        return value

    def shutdown(self) -> None:
        pass


class Host:
    """A Ray actor that hosts one shard object (``cls(*args)``) at a time, so that a worker
    process (torch and faiss imported, seconds to start) serves one call after another."""

    def __init__(self):
        self.obj = None

    def host(self, cls, *args) -> bool:
        self.obj = None  # the previous shard's memory goes first
        self.obj = cls(*args)
        return True

    def call(self, method: str, *args):
        return getattr(self.obj, method)(*args)

    def first(self, method: str, *args):
        """The first part of a per-shard answer (one shard: one return value)."""
        return getattr(self.obj, method)(*args)[0]

    def release(self) -> bool:
        self.obj = None
        return True


_SHARED: dict = {}


def shared_ray_executor(address: Optional[str] = None, local_cpus: Optional[int] = None
                        ) -> "RayExecutor":
    """One :class:`RayExecutor` per process (its shard workers stay warm between calls; Ray's
    exit hook stops a local cluster at exit). A local cluster gets at least ``local_cpus``
    CPUs (the shards) and at least the machine's cores."""
    ray = require_ray()
    executor = _SHARED.get("ray")
    if executor is None or not ray.is_initialized():
        cpus = None if address else max(int(local_cpus or 1), os.cpu_count() or 1)
        executor = _SHARED["ray"] = RayExecutor(address=address, local_cpus=cpus)
    return executor


class RayExecutor:
    """Every shard on a Ray actor (a :class:`Host`, ``num_cpus`` each). Connects to ``address``
    (a running cluster: ``auto``, ``ray://host:10001``) or, when Ray is not initialised, starts a
    local cluster of ``local_cpus`` CPUs (shut down again by :meth:`shutdown`). The hosts are
    kept between runs of this executor (:meth:`release`) and killed by :meth:`shutdown`."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, local_cpus: Optional[int] = None,
                 num_cpus: float = 1, object_store_memory: Optional[int] = None):
        ray = require_ray()
        self.ray, self.num_cpus, self.started = ray, num_cpus, False
        self.hosts: List[Any] = []
        self.busy: List[Any] = []
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False)
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = local_cpus
                if object_store_memory:
                    kwargs["object_store_memory"] = object_store_memory
            ray.init(**kwargs)
            self.started = True
        logger.info("ray engine: cluster with %s CPUs (%s)",
                    ray.cluster_resources().get("CPU"), address or "local")

    def reserve(self, shards: int) -> None:
        """A clear error, instead of actors waiting forever, when the cluster cannot place
        ``shards`` workers of ``num_cpus`` CPUs each (hosts already started count)."""
        free = len(self.hosts) - len(self.busy)
        cpus = self.ray.available_resources().get("CPU", 0.0)
        if free + int(cpus // self.num_cpus + 1e-9) < shards:
            total = self.ray.cluster_resources().get("CPU", 0.0)
            raise ValueError(f"the Ray cluster has {total:g} CPUs ({cpus:g} free, {free} idle "
                             f"shard workers); {shards} shards need one CPU each: use --shards "
                             f"<= {free + int(cpus // self.num_cpus)} or a larger cluster")

    def create(self, cls, *args) -> Any:
        free = [h for h in self.hosts if not any(h is b for b in self.busy)]
        host = free[0] if free else self.ray.remote(num_cpus=self.num_cpus)(Host).remote()
        if not free:
            self.hosts.append(host)
        self.busy.append(host)
        host.host.remote(cls, *args)
        return host

    def call(self, actor, method: str, *args) -> Any:
        return actor.call.remote(method, *args)

    def scatter(self, actor, method: str, *args, shards: int) -> List[Any]:
        """A call returning one part per shard: ``shards`` object refs, each part stored on its
        own (a shard fetches only its part). One shard: ``first`` unwraps the single part."""
        if shards == 1:
            return [actor.first.remote(method, *args)]
        return list(actor.call.options(num_returns=shards).remote(method, *args))

    def get(self, handles):
        return self.ray.get(handles)

    def put(self, value):
        return self.ray.put(value)

    def release(self, actors: List[Any]) -> None:
        """The shards' memory freed; their hosts free for the next run."""
        self.ray.get([a.release.remote() for a in actors])
        self.busy = [b for b in self.busy if not any(b is a for a in actors)]

    def shutdown(self) -> None:
        if _SHARED.get("ray") is self:
            del _SHARED["ray"]
        for host in self.hosts:
            self.ray.kill(host)
        self.hosts, self.busy = [], []
        if self.started:
            self.ray.shutdown()
