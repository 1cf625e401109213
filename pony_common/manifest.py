"""The training-manifest schema (`manifest.parquet`): written by the curation export, read by the trainer.

One row per image. `TRAINING_COLUMNS` are the columns a training run needs; the others describe the image for
people and tools (score, style, rating, source, rank). `image_uri` is relative to the manifest's folder
(`images/<id>.<ext>`); tags and the prompt follow the export's model family's convention (pony_common.prompts).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("category", pa.string()),
        ("captions", pa.string()),  # JSON object: kind -> text
        ("special_tags", pa.list_(pa.string())),  # score tag(s), style, source, rating, palette (never dropped)
        ("tags", pa.list_(pa.string())),  # extra content tags (characters first, no artist)
        ("prompt", pa.string()),  # the assembled prompt, fitted to the family's text-encoder token budget
        ("prompt_tokens", pa.int32()),  # its length in the family tokenizer's tokens (null: not counted)
        ("score", pa.float32()),
        ("score_tag", pa.string()),
        ("score_tags_v6", pa.list_(pa.string())),  # V6 tags true of the image: score_N, score_K_up for 4 <= K <= N
        ("style_tag", pa.string()),
        ("style_cluster", pa.int32()),
        ("palette_tags", pa.list_(pa.string())),
        ("source_tag", pa.string()),
        ("rating", pa.string()),
        ("rating_tag", pa.string()),
        ("source", pa.string()),  # where the image came from (site)
        ("characters", pa.list_(pa.string())),
        ("rank", pa.int32()),
    ]
)

TRAINING_COLUMNS = ("image_id", "image_uri", "width", "height", "captions", "special_tags", "tags", "prompt")

# The columns a training run reads, with their types: the smallest manifest the trainer accepts.
TRAINING_SCHEMA = pa.schema([SCHEMA.field(name) for name in TRAINING_COLUMNS])
