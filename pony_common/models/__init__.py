"""Model code two or more deployables share: the `Model` lifecycle base every service's model.py builds on
(`lifecycle.py`), the process-wide CLIP image tower (scorer, style tagger, safety), LAION-layout MLP heads,
the V7 AuraFlow pipeline (sampler, trainer), dtype names and the process-wide model-load lock."""
