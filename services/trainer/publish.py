"""Publishing a finished run: the sampler's LoadVersion RPC when the sampler is reachable, else a catalog row; a
LoRA run becomes a row of the shared `adapters` table instead (the sampler applies adapters per request)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from pony_common.catalog.models import AdapterRow, ModelVersionRow
from pony_common.config import Settings
from services.sampler.client import SamplerClient
from services.trainer.evaluation.gate import after_publish  # the promotion gate (PONY_EVAL_*)
from services.trainer.spec import LORA_WEIGHTS
from services.trainer.store import RunStore

if TYPE_CHECKING:
    from services.trainer.evaluation.engine import EvalRequest

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    uri: str
    loaded_by_sampler: bool
    note: str = ""


def load_in_sampler(settings: Settings, uri: str, run_id: str, *, candidate: bool = False) -> tuple[int, bool] | None:
    """Calls `pony.v1.Sampler/LoadVersion` (`candidate`: beside the serving version, no traffic moved); (version,
    active) it answered, or None when the sampler is not there.

    Errors other than "not reachable" propagate as grpc.RpcError.
    """
    if not settings.sampler_addr:
        return None
    timeout = max(settings.rpc_timeout_s, settings.sampler.triton_start_timeout_s)
    client = SamplerClient(settings, timeout=timeout)
    if not client.reachable(CONNECT_TIMEOUT_S):
        return None
    version = client.load_version(uri, run_id, candidate=candidate, timeout=timeout)
    return int(version.version), bool(version.active)


class SamplerCandidates:
    """The gate's `Candidates` over the sampler's PromoteVersion / DiscardVersion (admin token)."""

    def __init__(self, settings: Settings) -> None:
        timeout = max(settings.rpc_timeout_s, settings.sampler.triton_start_timeout_s)
        self.client = SamplerClient(settings, timeout=timeout)

    def promote(self, name: str, version: int) -> None:
        self.client.promote_version(version, model=name)

    def discard(self, name: str, version: int, reason: str) -> None:
        self.client.discard_version(version, model=name, reason=reason)


def publish_run(
    settings: Settings, store: RunStore, run_id: str, uri: str, *, evaluation: EvalRequest | None = None
) -> Published:
    """Makes the run's final pipeline the next `settings.trainer.publish_model` version (once per run).
    With PONY_EVAL_AFTER_PUBLISH it is loaded as a candidate, evaluated (`evaluation`: the grid; default: the
    default grid as low-priority jobs), then promoted or discarded (services/trainer/evaluation/gate.py).

    With a reachable sampler, its LoadVersion picks the version number and serves it; the catalog row is
    linked (or added, when the sampler keeps another catalog). Without one, the row is written here and the
    sampler finds it in model_versions when it starts.
    """
    if (Path(uri) / LORA_WEIGHTS).is_file():
        return publish_adapter(settings, store, run_id, uri)
    name = settings.trainer.publish_model
    run = store.get(run_id)
    if run.model_version is not None:
        return Published(name, run.model_version, run.checkpoint_uri or uri, False, "already published")
    note = ""
    gated = settings.eval_after_publish  # a candidate first: evaluated, then promoted or discarded
    try:
        loaded = load_in_sampler(settings, uri, run_id, candidate=gated)
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
        if not gated:
            store.log(run_id, f"sampler loaded {name} version {version}")
            return Published(name, version, uri, True, "")
        store.log(run_id, f"sampler loaded {name} version {version} as a candidate (not serving)")
        gate_note = after_publish(settings, store, run_id, name, version, SamplerCandidates(settings), evaluation)
        return Published(name, version, uri, True, gate_note)
    if gated:  # a catalog row would serve unevaluated once a sampler starts (it imports rows newer than its folders)
        note = (note or f"sampler at {settings.sampler_addr} not reachable") + (
            ": not published (PONY_EVAL_AFTER_PUBLISH evaluates a candidate in the sampler first)"
        )
        store.log(run_id, note)
        return Published(name, 0, uri, False, note)
    version = store.publish(run_id, name, uri)
    store.log(run_id, note or f"sampler at {settings.sampler_addr} not reachable: recorded in the catalog only")
    return Published(name, version, uri, False, note)


ADAPTER_FAMILY = "pony_v7"  # LoRAs train on the AuraFlow (V7) transformer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_adapter(settings: Settings, store: RunStore, run_id: str, uri: str) -> Published:
    """Records a LoRA run's weights as the next version of adapter `<spec name>` (once per run: a second call
    returns the first row). The base model version is the published `publish_model` version whose uri is the run's
    base model, when there is one."""
    run = store.get(run_id)
    lora = run.spec.get("lora") or {}
    base_uri = run.spec.get("base_model") or settings.model_path("trainer")
    name = str(run.spec.get("name") or run.name)
    sha256 = _sha256(Path(uri) / LORA_WEIGHTS)
    for _ in range(5):
        try:
            with store.catalog.session() as s:
                existing = s.scalar(select(AdapterRow).where(AdapterRow.run_id == run_id))
                if existing is not None:
                    return Published(existing.name, existing.version, existing.uri, False, "already published")
                latest = s.scalar(select(func.max(AdapterRow.version)).where(AdapterRow.name == name))
                base_version = s.scalar(
                    select(func.max(ModelVersionRow.version)).where(
                        ModelVersionRow.name == settings.trainer.publish_model, ModelVersionRow.uri == base_uri
                    )
                )
                row = AdapterRow(
                    name=name,
                    version=(latest or 0) + 1,
                    family=ADAPTER_FAMILY,
                    base_model_version=base_version,
                    base_model_uri=base_uri,
                    uri=uri,
                    sha256=sha256,
                    rank=int(lora.get("rank", 0)),
                    alpha=float(lora.get("alpha", 0.0)),
                    run_id=run_id,
                )
                s.add(row)
        except IntegrityError:
            continue  # another publisher took that version (or this run): look again
        store.set_checkpoint(run_id, uri)
        store.log(run_id, f"published adapter {name} version {row.version}")
        return Published(name, row.version, uri, False, "adapter")
    raise RuntimeError(f"could not allocate a version of adapter {name}")
