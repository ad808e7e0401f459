"""The floor shared by the daemon and the client: the vocabulary both speak.

errors (the one exception hierarchy), status (its one table to gRPC codes),
sizes and ranges (bytes, as both read and print them), cancel (the token that
stops long work), paths (where the sockets are), memory (page sizes, huge-page
pools, MADV_POPULATE) and libc (the ctypes prototypes behind them). Nothing
here imports the daemon or the client.
"""
