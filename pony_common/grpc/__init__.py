"""gRPC transport shared by every service: the server bootstrap (`server.py`), the one service factory every
`app.py` wires through (`app.py`), the interceptors, and client channels with the `ServiceClient` base that every
service's typed `client.py` builds on (`client.py`)."""
