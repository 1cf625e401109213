"""What two or more deployables of Pony Platform share, and nothing else: settings (`config`), the gRPC bootstrap,
service factory, interceptors and the `ServiceClient` base (`grpc/`), domain errors, image decoding and refs,
blobs, the catalog base (`catalog/`), the Celery app and worker launcher, observability (logs, metrics,
tracing), Pony tag and prompt conventions, the model lifecycle base and shared model code (`models/`), the
`ponyctl` entry point (verbs come from the packages), and test helpers (`testing`). It imports no service:
the import contracts in `.importlinter` say so and the test suite checks them."""
