"""The non-decoupled sibling of a family's Triton model (`<family>_sync`, e.g. `pony_v7_sync`): its config derived
from the family's rendered config (same inputs, the family's final outputs, the same priority levels and queue
bound) and its forwarding model (`triton_repo/pony_sync/1/model.py`), so a plain KServe-v2 client can `infer`."""

from __future__ import annotations

from pathlib import Path

SYNC_SUFFIX = "_sync"
SIBLING_SOURCE = Path(__file__).with_name("triton_repo") / "pony_sync" / "1" / "model.py"
# Outputs only progress responses carry: the sibling answers with the final response alone.
PROGRESS_ONLY = frozenset({"PREVIEW"})
HEADER = (
    "# Rendered by services/sampler/sync_sibling.py from the config of {family}: the non-decoupled sibling that\n"
    "# forwards each request to {family} (BLS) and answers with its final response (plain KServe-v2 `infer`).\n"
)


def sibling_name(family: str) -> str:
    return f"{family}{SYNC_SUFFIX}"


def render_sibling_config(family_config: str, instances: int = 2) -> str:
    """config.pbtxt of the sibling of the family model whose config.pbtxt text is `family_config`: its inputs, its
    outputs less the progress-only ones, its batch size, batching delay, priority levels and queue policy, on the
    CPU (it only forwards), `instances` copies, `target_model` = the family."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    family = text_format.Parse(family_config, mc.ModelConfig())
    sibling = mc.ModelConfig(
        name=sibling_name(family.name),
        backend="python",
        max_batch_size=family.max_batch_size,
        input=family.input,
        output=[o for o in family.output if o.name not in PROGRESS_ONLY],
        dynamic_batching=family.dynamic_batching,
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=max(1, instances))],
    )
    sibling.parameters["target_model"].string_value = family.name
    return HEADER.format(family=family.name) + text_format.MessageToString(sibling)
