"""The aesthetic scorer service (`pony.v1.Scorer`): CLIP embeddings + MLP head, score tags, Elo, head fits.

app.py wires it; servicer.py is the transport; service.py (`ScorerService`) the logic; model.py (`ScorerModel`)
CLIP tower + hot-swappable head; store.py its tables and catalog reads/writes; client.py (`ScorerClient`) what
other deployables call; fit.py and preferences.py the head-training and Elo logic."""
