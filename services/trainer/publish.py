"""Publishing a finished run: the sampler's LoadVersion RPC when the sampler is reachable, else a catalog row."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from pony_common.config import Settings
from services.sampler.client import SamplerClient
from services.trainer.store import RunStore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    uri: str
    loaded_by_sampler: bool
    note: str = ""


def load_in_sampler(settings: Settings, uri: str, run_id: str) -> tuple[int, bool] | None:
    """Calls `pony.v1.Sampler/LoadVersion`; (version, active) it answered, or None when the sampler is not there.

    Errors other than "not reachable" propagate as grpc.RpcError.
    """
    if not settings.sampler_addr:
        return None
    timeout = max(settings.rpc_timeout_s, settings.sampler.triton_start_timeout_s)
    client = SamplerClient(settings, timeout=timeout)
    if not client.reachable(CONNECT_TIMEOUT_S):
        return None
    version = client.load_version(uri, run_id, timeout=timeout)
    return int(version.version), bool(version.active)


def publish_run(settings: Settings, store: RunStore, run_id: str, uri: str) -> Published:
    """Makes the run's final pipeline the next `settings.trainer.publish_model` version (once per run).

    With a reachable sampler, its LoadVersion picks the version number and serves it; the catalog row is
    linked (or added, when the sampler keeps another catalog). Without one, the row is written here and the
    sampler finds it in model_versions when it starts.
    """
    name = settings.trainer.publish_model
    run = store.get(run_id)
    if run.model_version is not None:
        return Published(name, run.model_version, run.checkpoint_uri or uri, False, "already published")
    note = ""
    try:
        loaded = load_in_sampler(settings, uri, run_id)
    except grpc.RpcError as exc:
        loaded = None
        note = f"sampler LoadVersion failed: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        log.warning("sampler could not load the new version", extra={"run_id": run_id, "error": note})
    except ImportError:
        loaded = None
        note = "sampler stubs not generated"
    if loaded is not None:
        version, active = loaded
        version = store.publish(run_id, name, uri, version=version, active=active)
        if active:
            store.activate(name, version)
        store.log(run_id, f"sampler loaded {name} version {version}")
        return Published(name, version, uri, True)
    version = store.publish(run_id, name, uri)
    store.log(run_id, note or f"sampler at {settings.sampler_addr} not reachable: recorded in the catalog only")
    return Published(name, version, uri, False, note)
