"""Transports: the gRPC servicer and its translation tables; no memory logic here."""
