"""memplug client library: talk to memplugd over gRPC and take over region fds."""
