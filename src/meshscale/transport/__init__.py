"""How a node and a client talk: length-prefixed frames over mutual TLS 1.3 with a
versioned greeting (``framing.py``, ``tls.py``), what a caller presents
(``credentials.py``), the RPC connection and its pipelining (``rpc.py``). Shared by the
node agent and the client, so neither imports the other (DESIGN.md, Layers). It builds
on ``trust/`` (bundles, certificates); ``trust/`` never imports it."""
