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
from typing import Any, List, Optional

logger = logging.getLogger("fastreid.nformer")

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


class RayExecutor:
    """Every shard a Ray actor (``num_cpus`` each). Connects to ``address`` (a running cluster,
    e.g. ``auto`` or ``ray://host:10001``) or, when Ray is not initialised, starts a local
    cluster of ``local_cpus`` CPUs (shut down again by :meth:`shutdown`)."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, local_cpus: Optional[int] = None,
                 num_cpus: float = 1, object_store_memory: Optional[int] = None):
        ray = require_ray()
        self.ray, self.num_cpus, self.started = ray, num_cpus, False
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

    def create(self, cls, *args) -> Any:
        return self.ray.remote(num_cpus=self.num_cpus)(cls).remote(*args)

    def call(self, actor, method: str, *args) -> Any:
        return getattr(actor, method).remote(*args)

    def scatter(self, actor, method: str, *args, shards: int) -> List[Any]:
        """A call returning one part per shard: ``shards`` object refs, each part stored on its
        own (a shard fetches only its part). One shard: ``first`` unwraps the single part."""
        if shards == 1:
            return [actor.first.remote(method, *args)]
        return list(getattr(actor, method).options(num_returns=shards).remote(*args))

    def get(self, handles):
        return self.ray.get(handles)

    def put(self, value):
        return self.ray.put(value)

    def kill(self, actors: List[Any]) -> None:
        for actor in actors:
            self.ray.kill(actor)

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()
