"""The cloud's HTTP API (ECS 2014-05-26, RPC style) in front of the same
action handlers as the control socket: request signatures (signature.py),
access keys (keys.py), the server on trio with h11 (server.py)."""
