"""Trust and transport shared by the node agent and the client: the cluster bundle (CA,
gossip keyring, admin token), AES-256-GCM sealing, mutual TLS 1.3 and length-prefixed
frames. Neither ``runtime`` nor ``client`` owns it, so the client can talk to a node
without importing the node agent (DESIGN.md, Layers)."""
