"""gRPC services of the Pony Platform, one package each."""
