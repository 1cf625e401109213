"""The aesthetic scorer service (`pony.v1.Scorer`): CLIP embeddings + MLP head, score tags, Elo, head fits."""
