"""Workers: unprivileged processes that run one TLS handshake at a time."""
