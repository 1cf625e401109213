"""A deterministic synthetic sample pool for the demo and the tests: images of the six content families with
sidecar tag files (booru `.txt` or `.json` with tags/characters/artist/category/source), plus corrupt files,
near-duplicates (re-encoded, resized copies), an exact duplicate, and images whose tags safety must block."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from services.curation.categories import CATEGORIES

# Per family: background colours, shape colours, a drawing style, content tags, characters, artists, site.
FAMILIES: dict[str, dict] = {
    "pony": {
        "bg": [(250, 215, 235), (210, 235, 250), (235, 225, 250)],
        "fg": [(170, 120, 220), (120, 200, 240), (250, 170, 200), (255, 230, 120)],
        "style": "soft",
        "tags": ["pony", "my little pony", "cutie mark", "wings", "horn", "mane", "smile", "sky", "cloud", "rainbow"],
        "characters": ["starlight meadow", "cobalt breeze", "honey gale"],
        "artists": ["pastelhoof", "mlpdoodles"],
        "site": "derpibooru",
    },
    "furry": {
        "bg": [(235, 220, 200), (200, 225, 200), (225, 210, 190)],
        "fg": [(190, 110, 50), (130, 90, 60), (230, 160, 90), (90, 70, 50)],
        "style": "fur",
        "tags": ["anthro", "fox", "wolf", "tail", "fur", "ears", "forest", "jacket", "smile", "standing"],
        "characters": ["rusty tailwind", "ember foxglove", "grey timber"],
        "artists": ["furrpaint", "tailsketch"],
        "site": "e621",
    },
    "western": {
        "bg": [(255, 255, 255), (255, 245, 200), (210, 240, 255)],
        "fg": [(230, 30, 30), (30, 90, 230), (250, 210, 0), (20, 20, 20)],
        "style": "flat",
        "tags": ["cartoon", "comic", "bold outlines", "flat colors", "city", "hero", "cape", "speech bubble"],
        "characters": ["captain crumb", "dotty dash", "mister bolt"],
        "artists": ["inkslinger", "saturdaytoons"],
        "site": "western-archive",
    },
    "anime": {
        "bg": [(255, 240, 245), (230, 240, 255), (245, 235, 255)],
        "fg": [(255, 120, 170), (90, 140, 255), (40, 40, 80), (255, 200, 210)],
        "style": "eyes",
        "tags": ["1girl", "long hair", "school uniform", "blue eyes", "cherry blossoms", "smile", "looking at viewer"],
        "characters": ["aoi hoshino", "rin takamura", "mika sorano"],
        "artists": ["sakuraline", "kiraboshi"],
        "site": "danbooru",
    },
    "realism": {
        "bg": [(120, 140, 160), (90, 110, 90), (150, 130, 110)],
        "fg": [(60, 70, 80), (180, 170, 150), (100, 120, 100), (200, 190, 180)],
        "style": "photo",
        "tags": ["realistic", "photorealistic", "portrait", "landscape", "depth of field", "natural lighting"],
        "characters": ["elena voss", "marcus hale"],
        "artists": ["lensworks", "truelight"],
        "site": "artstation",
    },
    "other": {
        "bg": [(30, 30, 30), (240, 240, 240), (60, 40, 80)],
        "fg": [(200, 200, 200), (255, 90, 0), (0, 200, 180), (120, 120, 120)],
        "style": "lines",
        "tags": ["abstract", "geometric", "pattern", "minimalism", "no humans", "pixel art"],
        "characters": [],
        "artists": ["vectorvoid", "glitchgarden"],
        "site": "misc",
    },
}

# A tag that reveals the family in a `.txt` sidecar (which has no category field).
HINT_TAGS = {"pony": "my little pony", "furry": "furry", "western": "cartoon", "anime": "anime", "realism": "realistic"}

# Tag sets the safety service's default tag rules block (`tags.blocked`): the pool's "must block" images.
BLOCKED_TAG_SETS = [["deepfake"], ["underage", "explicit"], ["deepfake", "nude"]]


@dataclass
class SamplePool:
    """What `write_sample_pool` wrote (paths relative to `root`)."""

    root: Path
    images: list[str] = field(default_factory=list)
    categories: dict[str, str] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)
    near_duplicates: list[tuple[str, str]] = field(default_factory=list)
    exact_duplicates: list[tuple[str, str]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def draw_image(category: str, rng: random.Random, size: int = 96) -> Image.Image:
    """A small picture in the family's look (palette and drawing style), varied by `rng`."""
    fam = FAMILIES[category]
    bg = rng.choice(fam["bg"])
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    style = fam["style"]
    if style in ("soft", "photo"):
        top, bottom = rng.choice(fam["bg"]), rng.choice(fam["fg"])
        for y in range(size):
            t = y / (size - 1)
            d.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    for _ in range(rng.randint(3, 7)):
        color = rng.choice(fam["fg"])
        x0, y0 = rng.randint(0, size - 20), rng.randint(0, size - 20)
        w, h = rng.randint(12, size // 2), rng.randint(12, size // 2)
        if style == "flat":
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=color, outline=(0, 0, 0), width=3)
        elif style == "lines":
            d.line([(x0, y0), (x0 + w, y0 + h)], fill=color, width=rng.randint(2, 6))
        elif style == "eyes":
            d.ellipse([x0, y0, x0 + w, y0 + w], fill=(255, 255, 255), outline=color, width=2)
            d.ellipse([x0 + w // 4, y0 + w // 4, x0 + 3 * w // 4, y0 + 3 * w // 4], fill=color)
        elif style == "fur":
            for _ in range(12):
                px, py = x0 + rng.randint(0, w), y0 + rng.randint(0, h)
                d.line([(px, py), (px + rng.randint(-4, 4), py + rng.randint(3, 8))], fill=color, width=2)
            d.ellipse([x0, y0, x0 + w, y0 + h], outline=color, width=2)
        else:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
    if style == "photo":
        grain = np.random.default_rng(rng.getrandbits(32)).normal(128, 40, (size, size)).clip(0, 255)
        noise = Image.fromarray(grain.astype(np.uint8), "L").convert("RGB")
        img = Image.blend(img, noise, 0.15).filter(ImageFilter.GaussianBlur(1))
    elif style == "soft":
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_sample_pool(
    root: str | Path,
    *,
    per_category: int = 9,
    near_duplicates: int = 4,
    corrupt: int = 3,
    blocked: int = 3,
    size: int = 96,
    seed: int = 0,
    categories: tuple[str, ...] = CATEGORIES,
) -> SamplePool:
    """Writes the pool into `root` (same arguments, same bytes). Default: 54 images across the six families
    (9 each; some with `.txt` booru sidecars, the rest `.json`), 4 near-duplicates, 1 exact duplicate,
    3 corrupt files (random bytes, a truncated PNG, an empty file) and 3 images tagged for safety to block."""
    rng = random.Random(seed)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    pool = SamplePool(root=out)
    originals: list[tuple[str, Image.Image, dict]] = []
    for category in categories:
        fam = FAMILIES[category]
        for i in range(per_category):
            img = draw_image(category, rng, size)
            tags = rng.sample(fam["tags"], k=min(len(fam["tags"]), rng.randint(3, 5)))
            chars = rng.sample(fam["characters"], k=1) if fam["characters"] and rng.random() < 0.7 else []
            meta = {
                "tags": tags,
                "characters": chars,
                "artist": rng.choice(fam["artists"]),
                "category": category,
                "source": fam["site"],
            }
            name = f"{category}/{category}_{i:03d}"
            fmt = "PNG" if i % 2 == 0 else "JPEG"
            path = out / f"{name}.{'png' if fmt == 'PNG' else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(img, fmt))
            if i % 3 == 2:
                # Booru style: comma-separated tags only (characters and family come from the tags).
                hint = [HINT_TAGS[category]] if HINT_TAGS.get(category) else []
                path.with_suffix(".txt").write_text(", ".join([*chars, *tags, *hint]) + "\n")
            else:
                path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
            rel = str(path.relative_to(out))
            pool.images.append(rel)
            pool.categories[rel] = category
            originals.append((rel, img, meta))
    # Images safety must block: a blocked tag rule hit, spread over families.
    step = max(1, len(originals) // max(1, blocked))
    picks = [originals[1 + k * step] for k in range(blocked) if 1 + k * step < len(originals)]
    for k, (rel, _, meta) in enumerate(picks):
        meta = {**meta, "tags": [*meta["tags"], *BLOCKED_TAG_SETS[k % len(BLOCKED_TAG_SETS)]]}
        (out / rel).with_suffix(".json").write_text(json.dumps(meta, indent=1))
        (out / rel).with_suffix(".txt").unlink(missing_ok=True)
        pool.blocked.append(rel)
    # Near-duplicates: the same picture resized and re-encoded (different bytes, close pHash).
    dup_dir = out / "duplicates"
    dup_dir.mkdir(exist_ok=True)
    for j, (rel, img, meta) in enumerate(originals[::7][:near_duplicates]):
        copy = img.resize((size * 3 // 4, size * 3 // 4)).resize((size, size))
        path = dup_dir / f"near_{j:02d}.jpg"
        path.write_bytes(_encode(copy, "JPEG", quality=70 + j))
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        pool.near_duplicates.append((rel, str(path.relative_to(out))))
    if originals:
        rel = originals[0][0]
        path = dup_dir / f"exact_00{Path(rel).suffix}"
        path.write_bytes((out / rel).read_bytes())
        path.with_suffix(".json").write_text(json.dumps(originals[0][2], indent=1))
        pool.exact_duplicates.append((rel, str(path.relative_to(out))))
    # Corrupt files: random bytes, a truncated PNG, an empty file.
    bad_dir = out / "corrupt"
    bad_dir.mkdir(exist_ok=True)
    makers = [
        lambda: rng.randbytes(512),
        lambda: _encode(draw_image("anime", rng, size), "PNG")[:200],
        lambda: b"",
    ]
    for j in range(corrupt):
        path = bad_dir / f"bad_{j:02d}.png"
        path.write_bytes(makers[j % len(makers)]())
        path.with_suffix(".txt").write_text("corrupt, test\n")
        pool.corrupt.append(str(path.relative_to(out)))
    return pool
