"""The sampler: text-to-image for app backends in front of Triton's `pony_v7` model.

`app.py` wires it; `servicer.py` is transport only; `service.py` (`SamplerService`) the logic: validation,
generation, the safety gate, jobs and versions; `model.py` (`SamplerModel`) the Triton lifecycle on the shared
`Model` base; `store.py` its catalog rows; `client.py` the typed `SamplerClient`; `cli.py` `ponyctl generate`."""
