"""Style tagger service: style embeddings, artist-guarded style clusters, similar styles and palette tags."""
