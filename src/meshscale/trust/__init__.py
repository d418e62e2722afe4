"""Who is who in a mesh: the cluster bundle (CA, gossip keyring, admin token), node and
client certificates with their roles, revocations, AES-256-GCM sealing of gossip and
replay windows. Shared by the node agent and the client; ``transport/`` builds its TLS
contexts from it."""
