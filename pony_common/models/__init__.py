"""Model loading shared by the services: the registry of which model each service uses, tiny models, heads."""
