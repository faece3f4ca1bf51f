"""Joining the Ray cluster from a training entry point, without guessing.

Plain `ray.init()` silently attaches to whatever cluster `/tmp/ray` last recorded, which on a shared
machine may be someone else's (or a dead one). Here the order is explicit: `settings.ray.address`,
else `RAY_ADDRESS` (set by `ray job submit`), else a fresh local head.
"""

import logging
import os

import ray

from cluster.config.serving import RaySection

logger = logging.getLogger(__name__)


def ray_address(section: RaySection) -> str:
    """The address to join: settings, then RAY_ADDRESS, then "local" (start a new head)."""
    return section.address or os.environ.get("RAY_ADDRESS") or "local"


def connect(section: RaySection, *, log_to_driver: bool = True) -> None:
    """ray.init per `ray_address` in the settings' namespace (no-op when already connected)."""
    if ray.is_initialized():
        return
    address = ray_address(section)
    if address == "local":
        ray.init(
            address="local",
            namespace=section.namespace,
            num_cpus=section.num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
        )
    else:
        # A locked operator cluster: the token comes with the environment (`ray job submit` passes the
        # cluster's; in a shell, `eval "$(solanalm ray-env)"`). Not looked up here: a token file left by
        # another cluster must not be applied to this one.
        ray.init(address=address, namespace=section.namespace, log_to_driver=log_to_driver)
    logger.info("connected to Ray at %s (namespace %s)", address, section.namespace)
