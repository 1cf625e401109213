"""Style tagger service: style embeddings, artist-guarded style clusters, similar styles and palette tags.

app.py wires the gRPC service; servicer.py is transport only; service.py (`StyleTaggerService`) holds the logic;
model.py (`StyleTaggerModel`) loads the encoder (shared CLIP tower or a ViT) on the shared `Model` lifecycle;
store.py reads and writes the style tables; client.py (`StyleTaggerClient`) is how other deployables call it;
clusters.py, index.py and palette.py are the clustering, nearest-centroid search and colour naming.
"""
