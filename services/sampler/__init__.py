"""The sampler: text-to-image for app backends in front of Triton's `pony_v7` model (gRPC, jobs, versions)."""
